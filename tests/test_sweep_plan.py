"""Sweep policy without a cluster: resource requests and skip-if-finished."""

from __future__ import annotations

import json

import pytest

from farm.report import SweepReport, TenantOutcome, markdown
from farm.spec import ResourceSpec
from farm.sweep import finished_outcome
from farm.trainers import trainer_resources


def test_fractional_gpus_pack_small_jobs_and_multi_worker_jobs_get_whole_gpus():
    small = trainer_resources(ResourceSpec(workers=1, cpus_per_worker=2, gpus_per_worker=0.25))
    assert small.use_gpu and small.resources_per_worker == {"CPU": 2, "GPU": 0.25}
    assert small.torch_threads == 2
    cpu = trainer_resources(ResourceSpec(workers=2, cpus_per_worker=0.5))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 0.5} and cpu.torch_threads == 1
    with pytest.raises(ValueError, match="NCCL"):
        trainer_resources(ResourceSpec(workers=2, gpus_per_worker=0.5))
    typed = trainer_resources(ResourceSpec(gpus_per_worker=1, accelerator_type="A100"))
    assert typed.accelerator_type == "A100"


def test_only_a_complete_tenant_counts_as_finished(tmp_path):
    assert finished_outcome(tmp_path, "acme") is None
    (tmp_path / "acme" / "adapter").mkdir(parents=True)
    (tmp_path / "acme" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert finished_outcome(tmp_path, "acme") is None  # no result.json: publication not done
    (tmp_path / "acme" / "result.json").write_text(json.dumps({
        "steps": 3, "tokens": 10, "eval_loss_before": 2.0, "eval_loss_after": 1.0,
        "adapter_bytes": 1, "losses": [[1, 2.0]]}))
    done = finished_outcome(tmp_path, "acme")
    assert done is not None and done.status == "skipped" and done.ok


def test_markdown_report_escapes_errors():
    report = SweepReport("s", 1.0, [TenantOutcome("a", "failed", error="bad | pipe\nnewline")])
    text = markdown(report)
    assert "bad \\| pipe newline" in text and not report.ok


def test_the_terminal_report_shows_errors_as_text_never_as_markup():
    """A worker's gloo error quotes a path in brackets ("[/__w/pytorch/...]"), which rich would
    read as a closing tag and refuse: the sweep then crashed printing its report."""
    import io

    from rich.console import Console

    from farm.report import print_report

    error = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
             "[127.0.0.1]:3480: Connection reset by peer; [bold]not bold[/bold]")
    out = io.StringIO()
    print_report(SweepReport("s", 1.0, [TenantOutcome("a[red]", "failed", error=error)]),
                 Console(file=out, width=400, color_system=None))
    text = out.getvalue()
    assert "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537]" in text
    assert "[bold]not bold[/bold]" in text and "a[red]" in text


def test_a_collective_broken_by_a_dead_worker_is_the_groups_failure_not_the_tenants():
    import torch

    from farm.train.common import peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                        "peer [127.0.0.1]:21429. This is typically caused by a remote worker crashing.")
    assert peer_lost(gloo)  # what torch 2.13's gloo raised here when the other rank died (a plain RuntimeError)
    assert peer_lost(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1994, remote process exited"))
    if hasattr(torch.distributed, "DistError"):
        assert peer_lost(torch.distributed.DistError("store timed out"))
    assert not peer_lost(RuntimeError("CUDA out of memory"))  # the tenant's own failure
    assert not peer_lost(ValueError("tenant 'acme': line 3: bad record"))


def test_error_summary_names_the_lowest_failed_ranks_own_exception():
    """Ray Train's structured error (WorkerGroupError.worker_failures), not its traceback text."""
    import pydantic
    from ray.train import WorkerGroupError

    from farm.spec import TenantJob
    from farm.trainers import error_summary

    try:
        TenantJob.model_validate({})
    except pydantic.ValidationError as exc:
        invalid = exc
    failed = WorkerGroupError("rank 0: ...\nrank 1: ...", {1: ValueError("rank 1's own"), 0: invalid})
    summary = error_summary(failed)
    assert summary.startswith("pydantic_core._pydantic_core.ValidationError: ") and "validation error" in summary
    assert "Field required" in summary and "further information" not in summary
    assert error_summary(WorkerGroupError("x", {3: KeyError("acme")})) == "KeyError: 'acme'"
    wrapped = RuntimeError("could not start")
    wrapped.__cause__ = OSError("disk full")
    assert error_summary(wrapped) == "OSError: disk full"


def _job(base_model_dir, **train):
    from farm.spec import parse_spec

    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
           "defaults": {"train": {"batch_size": 8, **train}, "data": {"max_seq_len": 256},
                        "lora": {"rank": 8, "target_modules": "all-linear"}},
           "tenants": [{"name": "acme", "data": {"path": "x.jsonl"}}]}
    return parse_spec(raw).job("acme")


def test_planner_packs_lora_jobs_per_gpu_and_refuses_what_cannot_fit(base_model_dir):
    from farm.plan import GiB, PlanRequest, load_shape, plan_memory
    from farm.sizing import Capacity, DoesNotFit, size_adapter

    job = _job(base_model_dir)
    planned = plan_memory(load_shape(str(base_model_dir)), PlanRequest(
        method="lora", rank=8, batch=8, seq_len=256, precision="bf16", gradient_checkpointing=False)).total_bytes
    # auto: as many jobs per GPU as fit, capped at 8 (tiny jobs), each asking 1/k of a GPU
    big = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("gpu", 80 * GiB, 4, "spec"))
    assert big.resources.gpus_per_worker == 0.125 and big.planned_bytes == planned
    # a device that holds exactly three such jobs gets three
    three = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("gpu", 3 * planned + 1, 4, "spec"))
    assert three.resources.gpus_per_worker == round(1 / 3, 4)
    assert trainer_resources(three.resources).resources_per_worker["GPU"] == round(1 / 3, 4)
    # CPU clusters: no GPU, and Ray's memory resource reserves the plan plus the data pipeline
    from farm.data import pipeline_bytes

    cpu = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("cpu", 16 * GiB, 2, "ray"))
    assert trainer_resources(cpu.resources).resources_per_worker == {
        "CPU": 1.0, "memory": cpu.planned_bytes + pipeline_bytes(job.settings.data)}
    assert "data pipeline" in cpu.note
    # a job no device can hold is refused with the numbers
    with pytest.raises(DoesNotFit, match=r"tenant 'acme': a lora worker needs .* GB \(weights .*\), more than"):
        size_adapter(job, ResourceSpec(gpus_per_worker=1), Capacity("gpu", planned // 2, 4, "spec"))


def test_planner_picks_baseline_workers_and_refuses_a_baseline_that_cannot_fit(base_model_dir):
    from farm.plan import PlanRequest, load_shape, plan_memory
    from farm.sizing import Capacity, DoesNotFit, size_baseline
    from farm.spec import BaselineSpec

    job = _job(base_model_dir)
    shape = load_shape(str(base_model_dir))

    def per_worker(workers: int) -> int:
        return plan_memory(shape, PlanRequest(method="full", zero_stage=3, devices=workers, batch=8 // workers,
                                              seq_len=256, gradient_checkpointing=False,
                                              precision="bf16")).total_bytes

    baseline = BaselineSpec(tenants=["acme"], zero_stage=3)
    # room for the 4-worker partition but not the 2-worker one: the planner asks for 4
    device = (per_worker(2) + per_worker(4)) // 2
    workers, plan = size_baseline(job, baseline, Capacity("gpu", device, 8, "spec"))
    assert workers == 4 and plan.total_bytes == per_worker(4) <= device
    with pytest.raises(DoesNotFit, match="does not fit even on all 2 devices"):
        size_baseline(job, baseline, Capacity("gpu", device, 2, "spec"))


def test_spec_rejects_a_baseline_for_an_unknown_tenant(base_model_dir):
    from farm.spec import SpecError, parse_spec

    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
           "baseline": {"tenants": ["nobody"]}, "tenants": [{"name": "acme", "data": {"path": "x.jsonl"}}]}
    with pytest.raises(SpecError, match="'nobody' not among the spec's tenants"):
        parse_spec(raw)


# --- re-runs merge reports (issue 16) -------------------------------------------------------

def _earlier_report(folder):
    """What a first run of sweep S left: a and b trained, c failed."""
    from farm.report import merge_with_previous, write_report

    first = SweepReport("S", 30.0, [
        TenantOutcome("a", "trained", steps=5, losses=[(1, 2.0), (5, 1.0)]),
        TenantOutcome("b", "invalid", error="line 2: field 'text': expected a string"),
        TenantOutcome("c", "failed", error="RuntimeError: c ran out of retries | worker died")])
    write_report(merge_with_previous(first, folder), folder)


def test_a_rerun_of_some_tenants_keeps_the_others_latest_outcome_errors_included(tmp_path):
    from farm.report import merge_with_previous, write_report

    _earlier_report(tmp_path)
    again = SweepReport("S", 4.0, [TenantOutcome("a", "skipped", steps=5), TenantOutcome("b", "trained", steps=5)])
    merged = merge_with_previous(again, tmp_path)
    paths = write_report(merged, tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert [t["tenant"] for t in report["tenants"]] == ["a", "b", "c"]  # the earlier report's order
    assert by_name["a"]["status"] == "skipped" and by_name["b"]["status"] == "trained"  # this run's lines
    assert by_name["c"]["status"] == "failed" and by_name["c"]["error"].startswith("RuntimeError: c ran out")
    assert report["ok"] is False and report["this_run"] == ["a", "b"]
    assert all(t["reported_at"] for t in report["tenants"])
    assert merged.ran_ok and not merged.ok  # the job's exit code answers for a and b only
    text = (tmp_path / "report.md").read_text()
    assert "2 of 3 tenants succeeded" in text and "kept from earlier runs of this sweep id: c (failed" in text
    assert "| c | " in text and "RuntimeError: c ran out of retries \\| worker died" in text
    assert set(paths) >= {"json", "markdown"} and not list(tmp_path.glob(".*tmp*"))

    # a third run of c alone: its new line replaces the failure; a and b keep this run's lines
    third = merge_with_previous(SweepReport("S", 3.0, [TenantOutcome("c", "trained", steps=5)]), tmp_path)
    assert [(o.tenant, o.status) for o in third.outcomes] == [("a", "skipped"), ("b", "trained"), ("c", "trained")]
    assert third.ok and "3 of 3 tenants succeeded" in markdown(third)


def test_a_first_run_reports_as_before(tmp_path):
    from farm.report import merge_with_previous

    report = merge_with_previous(SweepReport("S", 12.0, [TenantOutcome("a", "trained")]), tmp_path)
    assert report.this_run == ["a"] and report.earlier == [] and report.notes == []
    assert "1 of 1 tenants succeeded in 12 s." in markdown(report)


@pytest.mark.parametrize("content", [b'{"sweep_id": "S", "tenants": [{"tenant": "c", "sta',  # cut short
                                     b"\xff\xfe\x00garbage",  # not UTF-8
                                     b'{"sweep_id": "S", "tenants": [{"tenant": "c"}]}',  # no status
                                     b'{"sweep_id": "S", "tenants": [{"tenant": "c", "status": "failed", '
                                     b'"steps": "many"}]}',  # a field of the wrong type
                                     b'["not", "a", "report"]'])
def test_an_unreadable_earlier_report_is_kept_aside_not_deleted_and_the_sweep_goes_on(tmp_path, content):
    from farm.report import merge_with_previous, write_report

    (tmp_path / "report.json").write_bytes(content)
    report = merge_with_previous(SweepReport("S", 1.0, [TenantOutcome("a", "trained")]), tmp_path)
    kept = list(tmp_path.glob("report.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == content
    assert not (tmp_path / "report.json").exists()
    assert [o.tenant for o in report.outcomes] == ["a"]
    assert len(report.notes) == 1 and kept[0].name in report.notes[0] and "could not be read" in report.notes[0]
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["notes"] == report.notes
    assert kept[0].name in (tmp_path / "report.md").read_text()
    # a second bad file later is kept next to the first, never over it
    (tmp_path / "report.json").write_bytes(content)
    merge_with_previous(SweepReport("S", 1.0, [TenantOutcome("a", "trained")]), tmp_path)
    assert len(list(tmp_path.glob("report.json.unreadable-*"))) == 2


def test_outcomes_load_from_older_and_newer_reports():
    old = {"tenant": "a", "status": "trained", "steps": 3, "losses": [[1, 2.5]], "eval_loss_after": 1.0}
    outcome = TenantOutcome.from_json(old)  # written before reported_at existed
    assert outcome.reported_at is None and outcome.losses == [(1, 2.5)] and outcome.ok
    newer = TenantOutcome.from_json({**old, "reported_at": "2030-01-01T00:00:00Z", "a_future_field": {"x": 1}})
    assert newer.reported_at == "2030-01-01T00:00:00Z"
    for bad in ({"status": "trained"}, {"tenant": "a", "status": "failed", "losses": [[1, "x"]]}, ["a"]):
        with pytest.raises(ValueError):
            TenantOutcome.from_json(bad)
    from dataclasses import asdict

    assert TenantOutcome.from_json(asdict(newer)) == newer  # the JSON shape round-trips


def test_a_report_file_is_replaced_whole_or_not_at_all(tmp_path):
    from farm.atomic import replace_file

    target = tmp_path / "report.json"
    target.write_text("the earlier report\n")

    def crash(path):
        path.write_text('{"half": ')
        raise KeyboardInterrupt  # the driver killed mid-write

    with pytest.raises(KeyboardInterrupt):
        replace_file(target, crash)
    assert target.read_text() == "the earlier report\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert replace_file(target, lambda p: p.write_text("new\n")) == target and target.read_text() == "new\n"
    assert replace_file(tmp_path / "none.png", lambda p: None) is None  # nothing drawn: nothing written


def test_comparison_rows_of_tenants_not_compared_this_time_are_kept(tmp_path):
    from farm.baseline import ComparisonRow
    from farm.report import merge_with_previous, write_report

    def row(tenant: str, run: str) -> ComparisonRow:
        return ComparisonRow(tenant, run, 1, 3, 2.0, 1.0, 5.0, 4.0, 100.0, 2**20, 2**20, 10, 2**10, [(1, 2.0)])

    first = SweepReport("S", 1.0, [TenantOutcome("a", "trained"), TenantOutcome("b", "trained")],
                        [row("a", "lora r8"), row("a", "full ZeRO-2"), row("b", "lora r8"), row("b", "full ZeRO-2")])
    write_report(merge_with_previous(first, tmp_path, compared=["a", "b"]), tmp_path)
    again = merge_with_previous(SweepReport("S", 1.0, [TenantOutcome("b", "skipped")], []), tmp_path, compared=["b"])
    assert [(r.tenant, r.run) for r in again.comparison] == [("a", "lora r8"), ("a", "full ZeRO-2")]
    assert again.comparison[0].losses == [(1, 2.0)]


# --- --max-concurrent counts tenants training at once (issue 16) -----------------------------

def _pack(name: str, tenants: tuple[str, ...], slots: int, co_train: bool = True):
    from farm.sizing import Pack

    return Pack(name, tenants, slots, 0, "", co_train=co_train)


def test_max_concurrent_counts_a_pool_as_the_tenants_it_trains_at_once():
    from farm.sweep import admit

    pack = _pack("pack-1", ("a", "b", "c", "d"), 3)
    e, f = _pack("pool-1", ("e",), 1, False), _pack("pool-2", ("f",), 1, False)
    queue = [pack, e, f]
    assert admit(queue, 0, 4) == [pack, e]  # 3 + 1 tenants training
    assert admit(queue, 4, 4) == [] and queue == [f]
    assert admit(queue, 3, 4) == [f] and queue == []
    # one at a time: a single-tenant pool waits while another trains
    a, b = _pack("pool-3", ("a",), 1, False), _pack("pool-4", ("b",), 1, False)
    queue = [a, b]
    assert admit(queue, 0, 1) == [a] and admit(queue, 1, 1) == []
    # first fit: a pack that does not fit yet lets a single-tenant pool behind it start
    z = _pack("pool-5", ("z",), 1, False)
    queue = [_pack("pack-2", ("x", "y"), 2), z]
    assert admit(queue, 1, 2) == [z]
    # a pool larger than the limit (the planner never makes one) starts alone rather than never
    queue = [_pack("pack-3", ("x", "y"), 2)]
    assert admit(queue, 1, 1) == [] and len(admit(queue, 0, 1)) == 1


def test_single_tenant_pools_group_by_shape_and_fit_the_cluster():
    from farm.sweep import plan_single_pools, pools_that_fit
    from farm.trainers import TrainerResources

    def shape(memory: int, gpus: float = 0, workers: int = 1) -> TrainerResources:
        per_worker = {"CPU": 1.0, "memory": memory, **({"GPU": gpus} if gpus else {})}
        return TrainerResources(workers, gpus > 0, per_worker, None, 1)

    cpu = {"CPU": 2.0, "memory": 16e9}
    resources = {"a": shape(100), "b": shape(300), "c": shape(200), "d": shape(100, gpus=0.25)}
    pools, asks = plan_single_pools(list(resources), resources, {**cpu, "GPU": 1.0}, None)
    # a, b and c share a shape: two pools (two CPUs), each asking for the group's largest memory
    cpu_pools = [p for p in pools if p.group == "alone-1"]
    assert [p.tenants for p in cpu_pools] == [("a", "c"), ("b",)]
    assert all(asks[p.name].resources_per_worker["memory"] == 300 and not p.co_train for p in cpu_pools)
    assert [p.tenants for p in pools if p.group == "alone-2"] == [("d",)]
    # --max-concurrent 1: one pool trains the group one after another
    pools, _ = plan_single_pools(["a", "b", "c"], resources, cpu, 1)
    assert [p.tenants for p in pools] == [("a", "b", "c")]
    # a cluster with no GPU yet (autoscaling from zero): the autoscaler decides, one pool per tenant
    assert pools_that_fit(shape(100, gpus=1.0), cpu) is None
    assert pools_that_fit(shape(100, gpus=1.0, workers=2), {**cpu, "GPU": 4.0, "CPU": 16.0}) == 2
    assert pools_that_fit(shape(100, gpus=0.25), {**cpu, "GPU": 1.0, "CPU": 16.0}) == 4


def test_packs_are_planned_within_max_concurrent(base_model_dir):
    from farm.plan import GiB
    from farm.sizing import Capacity, plan_packs
    from farm.spec import parse_spec

    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
           "defaults": {"train": {"batch_size": 2}, "data": {"max_seq_len": 64}},
           "tenants": [{"name": n, "data": {"path": "x.jsonl"}} for n in ("a", "b", "c", "d", "e")]}
    sweep = parse_spec(raw)
    jobs = [sweep.job(n) for n in sweep.jobs]
    capacity = Capacity("cpu", 16 * GiB, 4, "ray")

    def plan(limit):
        return [(p.slots, len(p.tenants)) for p in plan_packs(jobs, capacity, limit)]

    assert plan(None) == [(5, 5)]          # all five at once in one pack
    assert plan(1) == [(1, 5)]             # --max-concurrent 1: one pack training one tenant at a time
    assert plan(2) == [(2, 5)]             # one pack of two slots, not two packs that could not run together
    assert plan(3) == [(3, 5)]
    with pytest.raises(ValueError, match="at least 1"):
        plan_packs(jobs, capacity, 0)
    # more tenants than one pack's slots: two packs side by side, unless the limit allows one only
    many = [sweep.job("a").model_copy(update={"tenant": f"t{i}"}) for i in range(10)]
    assert [(p.slots, len(p.tenants)) for p in plan_packs(many, capacity)] == [(5, 5), (5, 5)]
    assert [(p.slots, len(p.tenants)) for p in plan_packs(many, capacity, 6)] == [(6, 10)]
    assert [(p.slots, len(p.tenants)) for p in plan_packs(many, capacity, 16)] == [(5, 5), (5, 5)]
    assert [(p.slots, len(p.tenants)) for p in plan_packs(many, capacity, 4)] == [(4, 10)]


def test_max_concurrent_must_be_at_least_one():
    from farm.sweep import SweepOptions

    with pytest.raises(ValueError, match="at least 1"):
        SweepOptions(sweep_id="s", max_concurrent=0)
    assert SweepOptions(sweep_id="s", max_concurrent=2).max_concurrent == 2


def test_a_group_queue_hands_each_tenant_to_one_pool_and_a_restarted_pool_gets_its_own_back():
    from farm.pools import TenantQueue

    queue = TenantQueue([{"tenant": t} for t in ("a", "b", "c", "d", "e")])
    assert [j["tenant"] for j in queue.take("pool-1", 2)] == ["a", "b"]
    assert [j["tenant"] for j in queue.take("pool-2", 2)] == ["c", "d"]
    queue.finish("a")
    queue.fail("d", "tenant 'd': bad data", "invalid")
    # pool-1's worker died: its restart resumes what it took and did not finish, then takes more
    assert [j["tenant"] for j in queue.resume("pool-1")] == ["b"]
    assert [j["tenant"] for j in queue.resume("pool-2")] == ["c"]
    assert [j["tenant"] for j in queue.take("pool-1", 5)] == ["e"] and queue.take("pool-2", 1) == []
    state = queue.state()
    assert sorted(state.pop("taken_at")) == ["a", "b", "c", "d", "e"]  # when each was taken (wall times)
    assert state == {"taken": {"a": "pool-1", "b": "pool-1", "c": "pool-2", "d": "pool-2", "e": "pool-1"},
                     "done": ["a"], "errors": {"d": "tenant 'd': bad data"}, "statuses": {"d": "invalid"},
                     "waiting": []}


def test_an_open_queue_takes_new_tenants_and_a_closed_one_refuses_them():
    import pytest

    from farm.pools import TenantQueue

    queue = TenantQueue([{"tenant": "a"}])
    assert [j["tenant"] for j in queue.take("pool-1", 2)] == ["a"] and not queue.is_closed()
    queue.add([{"tenant": "b"}])  # arrives while the pool runs
    with pytest.raises(ValueError, match="'b' is already in this queue"):
        queue.add([{"tenant": "b"}])
    assert [j["tenant"] for j in queue.take("pool-1", 2)] == ["b"]
    queue.close()
    with pytest.raises(ValueError, match="closed"):
        queue.add([{"tenant": "c"}])


def test_a_service_queue_names_jobs_by_run_id_cancels_and_forgets_them():
    """The fine-tuning service's jobs: one tenant has several (run_id names each); a cancel
    takes a waiting job out at once and flags a taken one for its pool; a finished job is
    forgotten so a long-running service's queue does not grow."""
    from farm.pools import TenantQueue

    queue = TenantQueue([{"tenant": "acme", "run_id": "ftjob-1"}, {"tenant": "acme", "run_id": "ftjob-2"},
                         {"tenant": "acme", "run_id": "ftjob-3"}])
    assert [j["run_id"] for j in queue.take("pool-1", 1)] == ["ftjob-1"]
    queue.cancel("ftjob-2")  # waiting: out of the queue at once, reported cancelled
    assert queue.state()["waiting"] == ["ftjob-3"] and queue.state()["statuses"]["ftjob-2"] == "cancelled"
    queue.cancel("ftjob-1")  # taken: its pool sees the flag at its next step
    assert queue.is_cancelled("ftjob-1") and "ftjob-1" not in queue.errors
    queue.fail("ftjob-1", "JobCancelled: cancelled after step 3", "cancelled")
    queue.forget("ftjob-3")  # still waiting: kept
    assert queue.state()["waiting"] == ["ftjob-3"]
    for job in ("ftjob-1", "ftjob-2"):
        queue.forget(job)
    state = queue.state()
    assert state["taken"] == {} and state["errors"] == {} and state["statuses"] == {} and list(queue.jobs) == ["ftjob-3"]
    assert not queue.is_cancelled("ftjob-1")


def test_the_planner_shards_a_base_that_fits_no_single_gpu_over_the_fewest_that_hold_it():
    from farm.plan import GiB
    from farm.sizing import Capacity, DoesNotFit, size_adapter
    from farm.spec import parse_spec

    def job(**train):
        raw = {"name": "s", "base_model": {"name_or_path": "llama-3.1-70b"},
               "defaults": {"train": {"batch_size": 1, "gradient_checkpointing": True, **train},
                            "data": {"max_seq_len": 512},
                            "lora": {"rank": 16, "target_modules": "all-linear"}},
               "tenants": [{"name": "big", "data": {"path": "x.jsonl"}},
                           {"name": "prompted", "method": "prompt", "data": {"path": "x.jsonl"}}]}
        return parse_spec(raw)

    eighty = Capacity("gpu", 80 * GiB, 8, "spec")
    sized = size_adapter(job().job("big"), ResourceSpec(gpus_per_worker="auto"), eighty)  # shard_base: auto
    assert sized.shard_base == "fsdp" and sized.resources.workers == 2 and sized.resources.gpus_per_worker == 1.0
    assert 70 * GiB < sized.planned_bytes < 80 * GiB  # half the 131 GB base, two layers gathered, the rest
    assert "base sharded over 2 GPUs (FSDP): one device would need 136.24 GB" in sized.note
    # one 200 GB device holds it whole: no sharding
    assert size_adapter(job().job("big"), ResourceSpec(gpus_per_worker="auto"),
                        Capacity("gpu", 200 * GiB, 8, "spec")).shard_base == "none"
    # shard_base: none keeps it whole, and so it does not fit; nor does a method that cannot shard
    with pytest.raises(DoesNotFit, match="tenant 'big'"):
        size_adapter(job(shard_base="none").job("big"), ResourceSpec(gpus_per_worker="auto"), eighty)
    with pytest.raises(DoesNotFit, match="tenant 'prompted'"):
        size_adapter(job().job("prompted"), ResourceSpec(gpus_per_worker="auto"), eighty)
