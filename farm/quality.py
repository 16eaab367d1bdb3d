"""Adapter quality: behaviour checks on greedy generations, eval loss side by side, the promotion
gate, and the cross-tenant eval-loss matrix.

Eval loss alone says an adapter fits its data; a platform also wants to know that it behaves as
the tenant asked (starts with their greeting, answers in JSON, ...) and that a new version is no
worse than the one serving now. Everything here scores adapters on one loaded base:

- ``held_out(job, tokenizer)``: the tenant's held-out prompts (its eval split, exactly as
  training split it) and a sample of its held-out rows;
- ``score_tenant``: greedy generations of the base, the new adapter and (when an alias points
  at one) the current version for those prompts, each check's pass rate, and the two
  adapters' eval loss on the same rows;
- ``decide``: the gate (``eval.promote``) on those figures: promote, or hold and say why;
- ``loss_matrix``: every adapter's eval loss on every tenant's sampled rows.

Generations run with transformers + PEFT (``model.generate``, greedy, batched with left
padding), which serves every method the farm trains, or with the serving engine, vLLM, where
it can load the adapter (``farm.quality_vllm``, ``eval.engine``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from farm.spec import EvalSpec, PromotionSpec, TenantJob

#: Plain-text examples have no prompt: generation starts from their first tokens instead.
TEXT_PROMPT_TOKENS = 4
SAMPLES_KEPT = 3  # generations kept per tenant for the report (base and adapter side by side)


@dataclass
class HeldOut:
    """A tenant's held-out prompts (token ids) and a sample of its held-out rows for eval loss."""

    tenant: str
    prompts: list[list[int]]
    text_like: list[bool]  # a plain-text example: its check applies to prompt + continuation
    rows: object           # farm.data.rows.Rows, one example per row (fits every method)


def prompt_of(ids: np.ndarray, trained: np.ndarray) -> tuple[list[int], bool]:
    """The prompt of one rendered example: everything before its last trained answer.

    A chat example ends with the answer its last assistant turn trains on, so the prompt is
    what precedes that run of trained tokens (ending with the template's generation prompt).
    An example trained throughout (plain text, or ``train_on: all``) has no prompt: its first
    tokens stand in, and the check judges the whole document.
    """
    flags = np.asarray(trained).astype(bool)
    if flags[1:].all():
        return [int(t) for t in ids[:1 + TEXT_PROMPT_TOKENS]], True
    start = len(flags)
    while start > 0 and flags[start - 1]:
        start -= 1
    if start == len(flags):  # no trained token at the end: the last run ends earlier
        end = int(np.flatnonzero(flags)[-1]) + 1
        start = end
        while start > 0 and flags[start - 1]:
            start -= 1
    return [int(t) for t in ids[:start]], False


def held_out(job: TenantJob, tokenizer, prompts: int, rows: int) -> HeldOut:
    """The tenant's first ``prompts`` held-out prompts and first ``rows`` held-out examples."""
    from farm.data import load_tenant_data
    from farm.data.rows import Rows

    data = load_tenant_data(job.tenant, job.settings.data, tokenizer)
    examples = [index for row in range(len(data.eval)) for index in data.eval.examples_in(row)]
    store = data.eval.store
    out_prompts, text_like = [], []
    for index in examples[:prompts]:
        ids, trained = store.example(index)
        prompt, is_text = prompt_of(ids, trained)
        out_prompts.append(prompt)
        text_like.append(is_text)
    sample = Rows(store, [np.array([index]) for index in examples[:rows]], data.eval.max_seq_len,
                  data.eval.pad_id, packed=False)
    return HeldOut(job.tenant, out_prompts, text_like, sample)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device,
             batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of each prompt (token ids, without the end-of-turn token)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = {tokenizer.eos_token_id}
    out: list[list[int]] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def answer_texts(tokenizer, held: HeldOut, continuations: list[list[int]]) -> list[str]:
    """What the checks judge: the answer, or for plain text the whole generated document."""
    texts = []
    for prompt, is_text, continuation in zip(held.prompts, held.text_like, continuations):
        tokens = prompt[1:] + continuation if is_text else continuation  # prompt[0] is bos
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def pass_rates(spec: EvalSpec, texts: list[str]) -> dict[str, float]:
    """Each check's share of ``texts`` that pass it."""
    return {check.label: round(sum(check.passes(t) for t in texts) / max(len(texts), 1), 4)
            for check in spec.checks}


@contextlib.contextmanager
def adapter_on(base, adapter_dir: str | Path):
    """``base`` wrapped with the adapter in ``adapter_dir`` for as long as the block runs; the
    base is given back as it was (``farm.models.unload_adapter``)."""
    from farm.models import load_adapter, unload_adapter

    model = load_adapter(base, adapter_dir).eval()
    try:
        yield model
    finally:
        unload_adapter(model)


def eval_loss(model, held: HeldOut, device) -> float:
    """Mean loss per target token of ``model`` on the tenant's sampled held-out rows."""
    from farm.train.common import evaluate

    return round(evaluate(model, held.rows, 8, device, None), 4)


@dataclass
class TenantQuality:
    """What ``score_tenant`` measured for one tenant (JSON-ready with ``asdict``)."""

    tenant: str
    prompts: int
    checks: list[dict] = field(default_factory=list)     # {check, base, adapter, incumbent}
    eval_loss: dict = field(default_factory=dict)        # {adapter, incumbent}
    samples: list[dict] = field(default_factory=list)    # a few {prompt, base, adapter}
    incumbent: str | None = None                         # serve name of the alias's current version
    decision: dict | None = None                         # the gate's, when the tenant has one
    engine: str = "transformers"                         # what generated the answers
    engine_note: str | None = None                       # why not vLLM, when auto chose transformers


def score_tenant(base, tokenizer, job: TenantJob, adapter_dir: str | Path, device,
                 incumbent_dir: str | Path | None = None, incumbent: str | None = None,
                 rows: int = 64, engine=None) -> TenantQuality:
    """Score a tenant's new adapter against the base and, if given, the alias's current version.

    Everything is measured on the same held-out prompts and rows, so the two versions'
    figures compare like for like whatever data the older one was trained on. ``engine``
    (``(prompts, max_new_tokens, adapter_dir or None) -> token ids``, a ``VllmGenerator``)
    generates the answers instead of transformers; eval losses are transformers' either way.
    """
    spec = job.settings.eval
    held = held_out(job, tokenizer, spec.prompts, rows)
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in held.prompts[:SAMPLES_KEPT]]

    def answers(model, adapter: str | Path | None) -> list[str]:
        ids = engine(held.prompts, spec.max_new_tokens, adapter) if engine is not None else \
            generate(model, tokenizer, held.prompts, spec.max_new_tokens, device)
        return answer_texts(tokenizer, held, ids)

    base_texts = answers(base, None)
    with adapter_on(base, adapter_dir) as model:
        new_texts = answers(model, adapter_dir)
        new_loss = eval_loss(model, held, device)
    quality = TenantQuality(job.tenant, len(held.prompts), eval_loss={"adapter": new_loss, "incumbent": None},
                            incumbent=incumbent)
    old_rates: dict[str, float] = {}
    if incumbent_dir is not None:
        with adapter_on(base, incumbent_dir) as model:
            old_texts = answers(model, incumbent_dir)
            quality.eval_loss["incumbent"] = eval_loss(model, held, device)
        old_rates = pass_rates(spec, old_texts)
    base_rates, new_rates = pass_rates(spec, base_texts), pass_rates(spec, new_texts)
    quality.checks = [{"check": label, "base": base_rates[label], "adapter": new_rates[label],
                       "incumbent": old_rates.get(label)} for label in new_rates]
    quality.samples = [{"prompt": p, "base": b, "adapter": a}
                       for p, b, a in zip(prompt_texts, base_texts, new_texts)]
    return quality


def score_on_engine(base, tokenizer, job: TenantJob, adapter_dir: str | Path, device,
                    incumbent_dir: str | Path | None = None, incumbent: str | None = None) -> TenantQuality:
    """``score_tenant`` with the generation engine ``eval.engine`` asks for: vLLM is used only
    when it can load every adapter scored (the new one and the incumbent: like for like)."""
    import json

    from farm.quality_vllm import VllmGenerator, choose_engine

    folders = [Path(adapter_dir), *([Path(incumbent_dir)] if incumbent_dir is not None else [])]
    name, note = choose_engine(job.settings.eval.engine, folders, job.base_model.name_or_path, job.settings.method)
    engine = None
    if name == "vllm":
        rank = max(json.loads((f / "adapter_config.json").read_text()).get("r") or 1 for f in folders)
        engine = VllmGenerator(job.base_model.name_or_path, rank,
                               job.settings.data.max_seq_len + job.settings.eval.max_new_tokens, tokenizer.eos_token_id)
    quality = score_tenant(base, tokenizer, job, adapter_dir, device, incumbent_dir, incumbent, engine=engine)
    quality.engine, quality.engine_note = name, note
    return quality


def decide(gate: PromotionSpec, quality: TenantQuality) -> dict:
    """The gate's decision on measured figures: ``promoted`` or ``held``, with the reason and
    the figures on both sides (what lineage and the report record)."""
    failing = [c for c in quality.checks if c["adapter"] < gate.min_pass_rate]
    new_loss, old_loss = quality.eval_loss["adapter"], quality.eval_loss.get("incumbent")
    figures = {"alias": gate.alias, "incumbent": quality.incumbent,
               "candidate": {"eval_loss": new_loss, "pass_rates": {c["check"]: c["adapter"] for c in quality.checks}},
               "current": None if quality.incumbent is None else
               {"eval_loss": old_loss, "pass_rates": {c["check"]: c["incumbent"] for c in quality.checks}},
               "gate": gate.model_dump()}
    if failing:
        worst = ", ".join(f"{c['check']} passed {c['adapter']:.0%}" for c in failing)
        return {"decision": "held", "reason": f"behaviour checks below {gate.min_pass_rate:.0%}: {worst}", **figures}
    passed = "every check passed" if quality.checks else "no behaviour checks declared"
    if quality.incumbent is None:
        return {"decision": "promoted", "reason": f"{passed}; no version held @{gate.alias} yet", **figures}
    needed = old_loss * (1 - gate.min_improvement)
    if new_loss > needed:
        margin = f" by {gate.min_improvement:.0%}" if gate.min_improvement else ""
        return {"decision": "held", "reason": f"eval loss {new_loss:.4f} does not beat {quality.incumbent}'s "
                                              f"{old_loss:.4f}{margin} (needs <= {needed:.4f})", **figures}
    return {"decision": "promoted", "reason": f"{passed}; eval loss {new_loss:.4f} vs "
                                              f"{quality.incumbent}'s {old_loss:.4f}", **figures}


def loss_matrix(base, tokenizer, jobs: dict[str, TenantJob], adapters: dict[str, str], device,
                rows: int) -> dict:
    """Every adapter's eval loss on every tenant's first ``rows`` held-out rows.

    Returns ``{"tenants": [...], "loss": {adapter_tenant: {data_tenant: loss}}, "own_best":
    {tenant: bool}}``: an adapter is best on its own tenant when no other adapter has a lower
    loss on that tenant's rows.
    """
    names = [name for name in jobs if name in adapters]
    held = {name: held_out(jobs[name], tokenizer, 0, rows) for name in names}
    loss: dict[str, dict[str, float]] = {}
    for adapter in names:
        with adapter_on(base, adapters[adapter]) as model:
            loss[adapter] = {data: eval_loss(model, held[data], device) for data in names}
    own_best = {data: min(names, key=lambda a: loss[a][data]) == data for data in names}
    return {"tenants": names, "loss": loss, "own_best": own_best, "rows": rows}


def load_base_for_eval(job: TenantJob, precision: str = "auto"):
    """Tokenizer, base model and device to score a tenant's adapters on (no trainable part)."""
    from farm.models import load_base_model, load_tokenizer, select_placement

    placement = select_placement(precision)
    tokenizer = load_tokenizer(job.base_model)
    base = load_base_model(job.base_model, placement)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return tokenizer, base.eval(), placement.device


def job_of_version(info) -> TenantJob:
    """The tenant job a published version was trained from, as its record gives it (base model,
    method settings, data and eval settings), to score it again."""
    from farm.spec import BaseModelSpec, JobSettings

    training = info.training or {}
    method = training.get("method") or info.method
    settings = JobSettings.model_validate({
        "method": method, method: training.get("method_settings") or {}, "train": training.get("train") or {},
        "data": training.get("data") or {}, "eval": training.get("eval") or {}})
    return TenantJob(tenant=info.tenant, adapter=info.adapter, base_model=BaseModelSpec(name_or_path=info.base_model),
                     settings=settings, output_dir=".")


def promote_if_better(backend, ref: str, gate: PromotionSpec, precision: str = "auto") -> dict:
    """``farm registry promote --if-better``: score the version ``ref`` and the version the
    gate's alias holds now on ``ref``'s held-out data (from its own training record), decide,
    and move the alias only when the gate passes. Returns the decision with both sides' figures.

    ``backend`` is the registry or a client of its server (``farm.registry.interface``).
    """
    import tempfile

    from farm.registry.client import RegistryError
    from farm.registry.core import NotFound

    candidate = backend.resolve(ref)
    job = job_of_version(candidate)
    if not job.settings.data.path:
        raise ValueError(f"{candidate.serve_name}: its record names no dataset to score it on")
    current = None
    try:
        current = backend.resolve(f"{candidate.tenant}.{candidate.adapter}@{gate.alias}")
    except NotFound:  # the registry itself: no version holds the alias yet
        pass
    except RegistryError as exc:  # its server says the same with a 404
        if exc.status != 404:
            raise
    if current is not None and current.version == candidate.version:
        return {"decision": "unchanged", "reason": f"{candidate.serve_name} already holds @{gate.alias}",
                "alias": gate.alias, "serve_name": candidate.serve_name}
    tokenizer, base, device = load_base_for_eval(job, precision)
    with tempfile.TemporaryDirectory(prefix="farm-promote-") as work:
        new_dir = Path(work) / "candidate"
        backend.download(candidate.serve_name, new_dir)
        old_dir = None
        if current is not None:
            old_dir = Path(work) / "current"
            backend.download(current.serve_name, old_dir)
        quality = score_on_engine(base, tokenizer, job, new_dir, device, old_dir,
                                  current.serve_name if current is not None else None)
    decision = decide(gate, quality)
    if decision["decision"] == "promoted":
        backend.set_alias(candidate.tenant, candidate.adapter, gate.alias, candidate.version,
                          note={"by": "farm registry promote --if-better", "serve_name": candidate.serve_name,
                                **decision})
    return {**decision, "serve_name": candidate.serve_name, "checks": quality.checks,
            "eval_loss": quality.eval_loss}
