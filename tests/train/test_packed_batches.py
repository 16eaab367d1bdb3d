"""Packed rows, as the trainers feed them to the model: examples never attend to each other.

``tests/test_data.py`` shows that the *model* keeps the examples of a packed row apart when it
is given the row's restarting position ids. That proves nothing about training: if the batches
a trainer builds dropped those position ids (or replaced them with 0..L-1), attention would
cross examples and every loss would quietly change. So these tests record the exact keyword
inputs of every forward call the trainers make (a forward pre-hook on the model the trainer
calls) and check, on those very batches:

* the position ids fed restart at 0 at every example boundary of each packed row (where the
  examples of a row begin is taken from the data pipeline's own rows, never from the batch);
* the logits the model gives for each example inside the row, fed exactly as training fed it,
  equal (fp32 rounding) the logits of that example run alone.

Three trainers build batches: the single-tenant recipe (``AdapterRecipe``), the co-trainer
(``CoTrainer``: several tenants' rows stacked into one forward) and the data-parallel path
(the sweep's single-tenant pool, ``ray_pool_loop``, under a real Ray Train ``TorchTrainer`` with
2 workers over gloo, each rank taking its own slice of every step's rows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from farm.data import Rows
from farm.spec import TenantJob, parse_spec
from farm.train.adapter import AdapterRecipe
from farm.train.cotrain import CoTrainer

from ..conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow

#: fp32 rounding between a row run packed and its examples run alone (observed: under 1e-6;
#: attention across examples changes them by about 1)
LOGIT_TOLERANCE = 1e-4


# -- recording what the trainer feeds the model ------------------------------------------------


@dataclass
class Forward:
    """One forward call a trainer made: its keyword inputs, copied to the CPU, and the mode."""

    inputs: dict[str, Any]
    training: bool
    positional: int  # positional arguments (the trainers pass keywords only)


class ForwardRecorder:
    """Records every forward call of ``model`` (a forward pre-hook, so nothing else changes)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[Forward] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.calls.append(Forward(inputs, module.training, len(args)))

    def close(self) -> None:
        """Stop recording (before the check runs the model itself)."""
        self._handle.remove()


# -- the check ---------------------------------------------------------------------------------


@dataclass
class PackingCheck:
    """What checking the recorded forwards found; ``findings`` lists every violation."""

    forwards: int = 0
    train_forwards: int = 0
    packed_rows: int = 0          # packed rows checked (training and eval forwards)
    train_rows: int = 0           # of which fed in training mode
    examples: int = 0             # examples compared with their run alone
    # Examples fed in training mode after the first of their row: the ones cross-example
    # attention would change (causal attention leaves a row's first example alone).
    train_exposed_examples: int = 0
    max_logit_difference: float = 0.0
    sources_per_forward: list[list[str]] = field(default_factory=list)  # tenant of each row, per forward
    train_row_indices: list[list[int]] = field(default_factory=list)    # row indices, per training forward
    findings: list[str] = field(default_factory=list)


def _segments(rows: Rows, index: int) -> list[tuple[int, int]]:
    """(start, end) of every example of packed row ``index``, as the data pipeline laid them
    out: an example starts where the row's own position ids restart at 0; the last one ends
    at the row's real length (the padding after it is no example)."""
    positions, length = rows.position_ids[index], rows.lengths[index]
    starts = [j for j in range(length) if positions[j] == 0]
    return list(zip(starts, starts[1:] + [length]))


def _row_lookup(tenants: dict[str, tuple[Rows, Rows]]) -> dict[tuple[int, ...], tuple[str, str, Rows, int]]:
    """Token ids of every row -> (tenant, split, rows, index), to tell which row a batch row is.

    Matching by content (not by re-deriving the trainer's data order) keeps the check
    independent of the code under test."""
    lookup: dict[tuple[int, ...], tuple[str, str, Rows, int]] = {}
    for tenant, (train, evaluation) in tenants.items():
        for split, rows in (("train", train), ("eval", evaluation)):
            for i in range(len(rows)):
                lookup.setdefault(tuple(rows.input_ids[i]), (tenant, split, rows, i))
    return lookup


@torch.no_grad()
def check_forwards(model: torch.nn.Module, calls: list[Forward],
                   tenants: dict[str, tuple[Rows, Rows]]) -> PackingCheck:
    """Check every packed row of every recorded forward of ``model``.

    Each recorded batch is run through ``model`` again exactly as it was fed (all its keyword
    inputs), in eval mode so that only attention, not dropout, can make logits differ; every
    example inside each packed row is then run alone (positions 0..n-1, no mask) and the two
    sets of logits must agree to fp32 rounding. With cross-example attention, every example
    after the first of a row sees tokens of its neighbours and its logits change by far more.
    """
    report = PackingCheck(forwards=len(calls))
    lookup = _row_lookup(tenants)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for number, call in enumerate(calls):
            where = f"forward {number} ({'train' if call.training else 'eval'})"
            if call.positional:
                report.findings.append(f"{where}: {call.positional} positional argument(s); "
                                       "the check only understands keyword inputs")
                continue
            ids = call.inputs["input_ids"]
            fed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.inputs.items()}
            logits = model(**fed).logits.float().cpu()
            logits = logits[:, -ids.shape[1]:]  # prompt-learning methods prepend virtual tokens
            positions = call.inputs.get("position_ids")
            report.train_forwards += call.training
            sources: list[str] = []
            train_indices: list[int] = []
            for b in range(ids.shape[0]):
                found = lookup.get(tuple(ids[b].tolist()))
                if found is None:
                    report.findings.append(f"{where}, row {b}: not a row of any tenant's data")
                    continue
                tenant, split, rows, index = found
                sources.append(tenant)
                if split == "train":
                    train_indices.append(index)
                if rows.attention_mask is not None:
                    continue  # an unpacked row: one example, nothing to keep apart
                label = f"{where}, row {b} ({tenant} {split} row {index})"
                segments = _segments(rows, index)
                report.packed_rows += 1
                report.train_rows += call.training
                if call.training:
                    report.train_exposed_examples += len(segments) - 1
                if positions is None:
                    report.findings.append(f"{label}: fed without position_ids")
                for start, end in segments:
                    if positions is not None:
                        fed_positions = positions[b, start:end].tolist()
                        if fed_positions != list(range(end - start)):
                            report.findings.append(
                                f"{label}: example at {start}..{end} fed position ids "
                                f"{fed_positions[:4]}..., not restarting at 0")
                    alone = model(input_ids=ids[b:b + 1, start:end].to(device), use_cache=False).logits
                    alone = alone.float().cpu()[0, -(end - start):]
                    difference = float((logits[b, start:end] - alone).abs().max())
                    report.examples += 1
                    report.max_logit_difference = max(report.max_logit_difference, difference)
                    if difference > LOGIT_TOLERANCE * max(1.0, float(alone.abs().max())):
                        report.findings.append(f"{label}: example at {start}..{end} attends outside "
                                               f"itself (logits differ from it alone by {difference:.3g})")
            report.sources_per_forward.append(sources)
            if call.training:
                report.train_row_indices.append(train_indices)
    finally:
        model.train(was_training)
    return report


def assert_examples_kept_apart(report: PackingCheck, min_train_rows: int) -> None:
    """The check ran on real packed training rows of several examples and found nothing."""
    if report.findings:
        # Training forwards first: they are what the issue is about (eval shares make_batch).
        ordered = sorted(report.findings, key=lambda finding: "(train)" not in finding)
        pytest.fail(f"{len(report.findings)} finding(s) in {report.packed_rows} packed rows "
                    f"({report.train_rows} fed in training):\n" + "\n".join(ordered[:12]))
    # A check that looked at nothing proves nothing: rows were packed, trained on, compared.
    assert report.train_rows >= min_train_rows, report
    # Rows really packed: on average at least two examples per training row (128-token rows
    # of the sample data hold 3 or 4; the last rows of a packing may hold fewer).
    assert report.train_exposed_examples >= report.train_rows, report


# -- jobs and recording trainers --------------------------------------------------------------


class Quiet:
    """Progress sink that prints nothing."""

    def on_step(self, event) -> None:
        pass


def _jobs(root: Path, base_model_dir: Path, tenants: list[str]) -> dict[str, TenantJob]:
    """Tiny fp32 LoRA jobs on the sample data, packed into 128-token rows (3 to 4 examples
    each); 2 steps of 2 rows. fp32 and no dropout: logits then differ only by rounding."""
    raw = {"name": "pk", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
           "defaults": {"lora": {"rank": 4, "dropout": 0.0},
                        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 3e-3, "seed": 7,
                                  "checkpoint_every": 100, "log_every": 100, "precision": "fp32"},
                        "data": {"max_seq_len": 128, "packing": True}},
           "tenants": [{"name": name, "data": {"path": str(SAMPLE_DATA / f"{name}.jsonl")}} for name in tenants]}
    return dict(parse_spec(raw).jobs)


class RecordingRecipe(AdapterRecipe):
    """``AdapterRecipe`` that records its model's forwards and checks them after training.

    Only bookkeeping is added: the recipe's own setup, batches, steps and save run unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recorder: ForwardRecorder | None = None
        self.packing_check: PackingCheck | None = None

    def evaluate(self) -> float:
        # setup() evaluates right after building the model (and DDP around it): recording
        # starts there, so its eval batches are checked as well as the training ones.
        if self.recorder is None:
            self.recorder = ForwardRecorder(self.model)
        return super().evaluate()

    def train(self) -> "RecordingRecipe":
        super().train()
        self.recorder.close()
        self.packing_check = check_forwards(self.model, self.recorder.calls,
                                            {self.job.tenant: (self.data.train, self.data.eval)})
        return self


class RecordingCoTrainer(CoTrainer):
    """``CoTrainer`` that records the shared model's forwards and keeps every tenant's rows."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recorder: ForwardRecorder | None = None
        self.rows: dict[str, tuple[Rows, Rows]] = {}  # tenant -> (train, eval) rows

    def _admit(self, job: TenantJob):
        slot = super()._admit(job)
        # A finished tenant's slot (and its data) is dropped; the check still needs its rows.
        self.rows[job.tenant] = (slot.data.train, slot.data.eval)
        return slot

    def _evaluate(self, slot) -> float:
        # The shared PEFT model exists once the first tenant is admitted, which evaluates it.
        if self.recorder is None:
            self.recorder = ForwardRecorder(self.model)
        return super()._evaluate(slot)


# -- the three trainers --------------------------------------------------------------------------


def test_single_tenant_batches_keep_packed_examples_apart(tmp_path, base_model_dir):
    job = _jobs(tmp_path, base_model_dir, ["hooli"])["hooli"]
    recipe = RecordingRecipe(job, progress=Quiet(), resume=False).setup().train()
    spec = job.settings.train
    assert recipe.packing_check.train_forwards == spec.max_steps * spec.grad_accum, recipe.packing_check
    assert_examples_kept_apart(recipe.packing_check,
                               min_train_rows=spec.max_steps * spec.grad_accum * spec.batch_size)


def test_co_training_batches_keep_packed_examples_apart(tmp_path, base_model_dir):
    """Two tenants' rows stacked into one forward per step; each row's examples stay apart."""
    jobs = _jobs(tmp_path, base_model_dir, ["hooli", "acme"])
    trainer = RecordingCoTrainer(list(jobs.values()), slots=2, progress=Quiet(), resume=False).setup()
    results = trainer.run()
    steps, batch = 2, 2
    assert all(results[name].steps == steps for name in jobs), results
    trainer.recorder.close()
    # The check runs the shared model outside the router, so whichever adapter PEFT has active
    # adds its update to every row: adapters change values, not which tokens attend to which.
    report = check_forwards(trainer.model, trainer.recorder.calls, trainer.rows)
    assert report.train_forwards == steps, report  # one shared forward per step
    # Every training forward is the co-trainer's stacked batch: both tenants' rows in it.
    stacked = [sources for sources in report.sources_per_forward if sorted(set(sources)) == ["acme", "hooli"]]
    assert len(stacked) == steps, report.sources_per_forward
    assert_examples_kept_apart(report, min_train_rows=steps * batch * len(jobs))


# -- data parallel: ray_pool_loop under a real Ray Train TorchTrainer, 2 workers on gloo -------


def _data_parallel_worker(config: dict) -> dict:
    """Ray Train worker: the sweep's own single-tenant pool loop with the recording recipe
    swapped in; writes this rank's check to ``report_dir`` (the workers run on this machine)."""
    import farm.train.adapter as adapter

    class ReportingRecipe(RecordingRecipe):
        def train(self) -> "ReportingRecipe":
            super().train()
            report = {"rank": self.rank, "world": self.world, **asdict(self.packing_check)}
            Path(config["report_dir"], f"rank{self.rank}.json").write_text(json.dumps(report))
            return self

    original = adapter.AdapterRecipe
    adapter.AdapterRecipe = ReportingRecipe  # ray_pool_loop looks the class up when it runs
    try:
        return adapter.ray_pool_loop(config)
    finally:
        adapter.AdapterRecipe = original


def test_data_parallel_batches_keep_packed_examples_apart(tmp_path, base_model_dir, local_ray):
    """The recipe with 2 workers (DDP over gloo) in a single-tenant pool, started as the sweep
    starts it: rank 0 takes the tenant from the pool's queue and both ranks train it."""
    from .pool_runs import fit_pool

    job = _jobs(tmp_path / "runs", base_model_dir, ["hooli"])["hooli"]
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    returned = fit_pool(_data_parallel_worker, [job], tmp_path, workers=2, extra={"report_dir": str(reports_dir)})
    assert returned["errors"] == {}
    assert (tmp_path / "pooled" / "hooli" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    reports = [json.loads((reports_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    spec = job.settings.train
    for report in reports:
        assert report["world"] == 2, report
        assert report["train_forwards"] == spec.max_steps * spec.grad_accum, report
        check = PackingCheck(**{k: v for k, v in report.items() if k in PackingCheck.__dataclass_fields__})
        assert_examples_kept_apart(check, min_train_rows=spec.max_steps * spec.grad_accum * spec.batch_size)
    # Each rank trained on its own slice of every step's rows: no row fed to both in one step.
    for step, (mine, theirs) in enumerate(zip(reports[0]["train_row_indices"], reports[1]["train_row_indices"])):
        assert len(mine) == len(theirs) == spec.batch_size and not set(mine) & set(theirs), (step, mine, theirs)
