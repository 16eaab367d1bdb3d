"""The ``farm`` command: one entry point, one sub-command per task.

    farm base-model build --out .farm/base-model
    farm samples build --out jobs/data
    farm spec validate jobs/configs/demo.yaml
    farm data check jobs/configs/demo.yaml
    farm train --spec jobs/configs/demo.yaml --tenant acme
    farm plan --model llama-3.1-8b --method lora --rank 16 --batch 1 --grad-accum 4 --gpu 24GB
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from farm.cli_common import EXIT_BAD_INPUT, console, fail, json_option, print_json
from farm.base_model import PretrainConfig

app = typer.Typer(help="Adapter farm: one PEFT adapter per tenant on a shared base model.",
                  no_args_is_help=True, add_completion=False)
base_model_app = typer.Typer(help="Build or inspect base models.", no_args_is_help=True)
samples_app = typer.Typer(help="Sample tenant datasets.", no_args_is_help=True)
spec_app = typer.Typer(help="Sweep specs.", no_args_is_help=True)
data_app = typer.Typer(help="Tenant datasets.", no_args_is_help=True)
cluster_app = typer.Typer(help="Cluster definitions (cluster/*.yaml).", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from farm import __version__

        print(f"farm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the farm's version and exit")) -> None:
    """Adapter farm: one PEFT adapter per tenant on a shared base model."""


app.add_typer(base_model_app, name="base-model")
app.add_typer(samples_app, name="samples")
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(cluster_app, name="cluster")
from farm.registry_cli import export_app, registry_app  # noqa: E402
app.add_typer(registry_app, name="registry")
app.add_typer(export_app, name="export")
from farm.serving.cli import gateway_cmd, serve_cmd, usage_cmd  # noqa: E402
app.command("serve")(serve_cmd)
app.command("gateway")(gateway_cmd)
app.command("usage")(usage_cmd)


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("sweep", context_settings=_PASS_THROUGH, add_help_option=False)
def sweep_cmd(ctx: typer.Context) -> None:
    """Run a sweep on Ray: every tenant of a spec (flags: farm sweep --help)."""
    from farm.sweep_command import main

    raise typer.Exit(main(list(ctx.args), prog="farm sweep"))


@app.command("baseline", context_settings=_PASS_THROUGH, add_help_option=False)
def baseline_cmd(ctx: typer.Context) -> None:
    """Full fine-tuning baseline of some tenants, compared with LoRA (flags: farm baseline --help)."""
    from farm.sweep_command import baseline_main

    raise typer.Exit(baseline_main(list(ctx.args), prog="farm baseline"))


@app.command("service")
def service(config: Path = typer.Option(..., "--config", help="service YAML (base, registry, pools, defaults)"),
            verbose: bool = typer.Option(False, help="also show Ray's logs and the workers' output")) -> None:
    """Run the fine-tuning service: warm pools training the jobs `farm gateway`'s API takes in."""
    from farm.service.runner import service_cmd

    raise typer.Exit(service_cmd(config, verbose))


@base_model_app.command("build")
def base_model_build(
    out: Path = typer.Option(..., help="folder to write the model into"),
    layers: int = typer.Option(2, help="transformer blocks"),
    hidden: int = typer.Option(256, help="model width (64 x heads)"),
    heads: int = typer.Option(4, help="attention heads (head_dim is 64)"),
    vocab: int = typer.Option(1024, help="tokenizer vocabulary size"),
    seed: int = typer.Option(0, help="weight initialisation seed"),
    random: bool = typer.Option(False, "--random", help="keep the random initial weights (fast; for tests)"),
    steps: int = typer.Option(PretrainConfig.steps, help="pretraining steps"),
) -> None:
    """Build a tiny Llama-architecture base model offline: tokenizer trained locally, weights
    pretrained on simple English from a grammar (a few minutes on 2 CPU cores), or random."""
    from farm.base_model import TinyModelConfig, build_base_model

    config = TinyModelConfig(layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
                             intermediate=2 * hidden, vocab=vocab, seed=seed)
    pretrain = None if random else PretrainConfig(steps=steps)
    try:
        config.validate()
        if pretrain is not None:
            pretrain.validate()
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    path = build_base_model(out, config, pretrain)
    record = json.loads((path / "farm_base_model.json").read_text())
    trained = "random weights" if pretrain is None else \
        (f"pretrained {steps} steps in {record['pretrain']['seconds']:.0f} s, final loss "
         f"{record['pretrain']['final_loss']:.3f}, held-out prose loss "
         f"{record['pretrain']['heldout_prose_loss']['before']:.2f} -> {record['pretrain']['heldout_prose_loss']['after']:.2f}")
    console.print(f"base model written to [bold]{path}[/bold] "
                  f"({layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}; {trained})")


@samples_app.command("build")
def samples_build(out: Path = typer.Option(Path("jobs/data"), help="folder to write into"),
                  seed: int = typer.Option(1234, help="generator seed")) -> None:
    """Generate the sample tenants' datasets deterministically."""
    from farm.samples import SAMPLE_TENANTS, build_samples

    written = build_samples(out, seed)
    table = Table("tenant", "format", "examples", "file")
    for tenant in SAMPLE_TENANTS:
        table.add_row(tenant.name, tenant.format, str(tenant.examples), str(written[tenant.name]))
    console.print(table)


def _load(spec_file: Path, overrides: list[str] | None = None, code: int = EXIT_BAD_INPUT):
    """The spec, or exit with ``code`` naming every problem (``spec validate``: 1, its finding)."""
    from farm.spec import SpecError, load_spec, parse_overrides

    try:
        return load_spec(spec_file, parse_overrides(overrides or []))
    except SpecError as exc:
        fail(str(exc), code)
    except ValueError as exc:  # an override that is not KEY=VALUE
        fail(str(exc), code=2)


@spec_app.command("validate")
def spec_validate(spec_file: Path = typer.Argument(..., help="sweep spec YAML"),
                  as_json: bool = json_option()) -> None:
    """Validate a sweep spec; every problem is printed with its key path (exit code 1)."""
    sweep = _load(spec_file, code=1)
    from farm.baseline import method_label

    if as_json:
        print_json({"spec": str(spec_file), "ok": True, "tenants": [
            {"tenant": name, "method": job.settings.method, "label": method_label(job),
             "steps": job.settings.train.max_steps, "data": job.settings.data.path}
            for name, job in sweep.jobs.items()]})
        return
    table = Table("tenant", "method", "steps", "data")
    for name, job in sweep.jobs.items():
        table.add_row(name, method_label(job),
                      str(job.settings.train.max_steps), job.settings.data.path)
    console.print(table)
    console.print(f"[green]ok[/green]: {spec_file} ({len(sweep.jobs)} tenants)")


@data_app.command("check")
def data_check(spec_file: Path = typer.Argument(..., help="sweep spec YAML"),
               tenant: Optional[str] = typer.Option(None, help="only this tenant"),
               as_json: bool = typer.Option(False, "--json", help="print each tenant's data report as JSON")) -> None:
    """Read, validate and tokenize every tenant's data: what was read, used, skipped and why.

    Exit code 1 when any tenant's data cannot be used.
    """
    from rich.text import Text

    from farm.data import DataError, DataReport, load_tenant_data
    from farm.models import load_tokenizer

    sweep = _load(spec_file)
    try:
        names = [sweep.job(tenant).tenant] if tenant else list(sweep.jobs)
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_BAD_INPUT)
    tokenizer = load_tokenizer(sweep.spec.base_model)
    table = Table("tenant", "status", *DataReport.COLUMNS, "padding", "detail")
    reports: dict[str, dict] = {}
    failed = 0
    for name in names:
        try:
            data = load_tenant_data(name, sweep.job(name).settings.data, tokenizer)
        except DataError as exc:
            failed += 1
            reports[name] = {"tenant": name, "error": str(exc)}
            table.add_row(name, "[red]error[/red]", *[""] * (len(DataReport.COLUMNS) + 1), Text(str(exc)))
            continue
        report = data.report
        reports[name] = report.to_json()
        detail = "; ".join(f"{b.location}: {f'{b.field}: ' if b.field else ''}{b.reason}" for b in report.bad[:3])
        cells = report.columns()
        table.add_row(name, "[green]ok[/green]", *[cells[c] for c in DataReport.COLUMNS],
                      f"{data.train.padding_share:.1%}", Text(detail))
    if as_json:
        print(json.dumps(list(reports.values()), indent=2))
    else:
        console.print(table)
    if failed:
        raise typer.Exit(1)


@data_app.command("preview")
def data_preview(spec_file: Path = typer.Argument(..., help="sweep spec YAML"),
                 tenant: str = typer.Option(..., help="the tenant whose data to show"),
                 count: int = typer.Option(3, "-n", "--count", min=1, max=100, help="examples to show"),
                 as_json: bool = typer.Option(False, "--json", help="token ids and the trained mask, as JSON")) -> None:
    """Show the first examples exactly as training sees them, trained spans marked ⟦like this⟧."""
    from rich.text import Text

    from farm.data import IGNORE_INDEX, DataError, preview_examples
    from farm.models import load_tokenizer

    sweep = _load(spec_file)
    try:
        job = sweep.job(tenant)
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_BAD_INPUT)
    tokenizer = load_tokenizer(sweep.spec.base_model)
    try:
        examples = preview_examples(tenant, job.settings.data, tokenizer, count)
    except DataError as exc:
        fail(str(exc))
    out = []
    for location, example in examples:
        trained = [label != IGNORE_INDEX for label in example.labels]
        spans = _spans(example.input_ids, trained)
        out.append({"location": location, "tokens": len(example.input_ids), "trained_tokens": sum(trained),
                    "input_ids": example.input_ids, "trained": [int(t) for t in trained],
                    "text": tokenizer.decode(example.input_ids, skip_special_tokens=False),
                    "trained_spans": [tokenizer.decode(ids, skip_special_tokens=False) for ids, on in spans if on]})
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for entry, (_, example) in zip(out, examples):
        console.rule(f"{entry['location']}: {entry['tokens']} tokens, {entry['trained_tokens']} trained", style="dim")
        text = Text()
        for ids, on in _spans(example.input_ids, [int(t) for t in entry["trained"]]):
            piece = tokenizer.decode(ids, skip_special_tokens=False)
            text.append(f"⟦{piece}⟧" if on else piece, style="bold green" if on else "")
        console.print(text)
    if not examples:
        console.print(f"tenant {tenant!r}: no usable example")


def _spans(ids: list[int], trained: list) -> list[tuple[list[int], bool]]:
    """Consecutive runs of tokens with the same trained flag."""
    spans: list[tuple[list[int], bool]] = []
    for token, on in zip(ids, trained):
        if spans and spans[-1][1] == bool(on):
            spans[-1][0].append(token)
        else:
            spans.append(([token], bool(on)))
    return spans


@cluster_app.command("validate")
def cluster_validate(files: list[Path] = typer.Argument(..., help="Ray launcher configs or KubeRay RayCluster manifests"),
                     as_json: bool = json_option()) -> None:
    """Validate cluster files: Ray's schema, then scale to zero, token auth, private dashboard.

    Exit code 1 when any file has a problem.
    """
    from rich.text import Text

    from farm.cluster_files import check_cluster_file

    reports = [check_cluster_file(path) for path in files]
    if as_json:
        print_json([{"file": str(r.path), "kind": r.kind, "ok": r.ok, "problems": list(r.problems)} for r in reports])
        if not all(report.ok for report in reports):
            raise typer.Exit(1)
        return
    table = Table("file", "kind", "status", "problems")
    for report in reports:
        prefix = f"{report.path}: "
        # The table's file column already names the file: show the rest of each problem.
        problems = "\n".join(p[len(prefix):] if p.startswith(prefix) else p for p in report.problems)
        status = "[green]ok[/green]" if report.ok else f"[red]{len(report.problems)} problem(s)[/red]"
        table.add_row(str(report.path), report.kind, status, Text(problems))  # Text: no markup in problems
    console.print(table)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@app.command("train")
def train(
    spec_file: Path = typer.Option(..., "--spec", help="sweep spec YAML"),
    tenant: str = typer.Option(..., help="tenant to train"),
    output_dir: Optional[Path] = typer.Option(None, help="override the tenant's output folder"),
    fresh: bool = typer.Option(False, help="ignore existing checkpoints and start over"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="spec overrides, e.g. defaults.train.max_steps=10"),
) -> None:
    """Train one tenant's adapter in this process, with progress; resumes from checkpoints."""
    from farm.data import DataError
    from farm.train.adapter import train_tenant

    sweep = _load(spec_file, overrides)
    try:
        job = sweep.job(tenant)
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_BAD_INPUT)
    if output_dir is not None:
        job = job.model_copy(update={"output_dir": str(output_dir.resolve())})
    from farm.methods import method_info

    needs = method_info(job.settings.method).needs_cuda
    if needs:
        import torch

        if not torch.cuda.is_available():  # refused before any data is read
            fail(f"tenant {tenant!r}: method {job.settings.method}: {needs}; this host has none")
    if job.settings.train.init_from:  # resolved against the registry by sweeps only
        console.print(f"note: train.init_from {job.settings.train.init_from!r} applies to `farm sweep` (which "
                      "resolves it in the registry); `farm train` starts from a fresh adapter", markup=False)
    try:
        result = train_tenant(job, resume=not fresh)
    except DataError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(asdict(result), indent=2))
        return
    table = Table("tenant", "steps", "tokens", "tok/s", "eval before", "eval after", "trainable", "adapter")
    table.add_row(result.tenant, str(result.steps), f"{result.tokens:,}", f"{result.tokens_per_s:,.0f}",
                  f"{result.eval_loss_before:.4f}", f"{result.eval_loss_after:.4f}",
                  f"{result.trainable_params:,}", result.adapter_dir)
    console.print(table)
    console.print(f"eval loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} "
                  f"({result.eval_loss_after / result.eval_loss_before:.2f}x)")


@app.command("cotrain")
def cotrain_cmd(
    spec_file: Path = typer.Option(..., "--spec", help="sweep spec YAML"),
    tenants: str = typer.Option(..., help="comma-separated tenants to co-train (one pack)"),
    slots: int = typer.Option(4, help="tenants trained at once on the shared base"),
    fresh: bool = typer.Option(False, help="ignore existing checkpoints and start over"),
    as_json: bool = json_option(),
) -> None:
    """Co-train several tenants' adapters on one base in this process, with progress."""
    from farm.train.cotrain import cotrain

    sweep = _load(spec_file)
    try:
        jobs = [sweep.job(name.strip()) for name in tenants.split(",")]
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_BAD_INPUT)
    try:
        results = cotrain(jobs, slots, resume=not fresh)
    except ValueError as exc:  # the tenants cannot share a pack (method, base, layout)
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        print_json({name: {"status": "failed", "error": result} if isinstance(result, str) else
                    {"status": "trained", **asdict(result)} for name, result in results.items()})
        if any(isinstance(result, str) for result in results.values()):
            raise typer.Exit(1)
        return
    table = Table("tenant", "status", "steps", "eval before", "eval after", "adapter / error")
    for name, result in results.items():
        if isinstance(result, str):
            table.add_row(name, "[red]failed[/red]", "", "", "", result)
        else:
            table.add_row(name, "[green]trained[/green]", str(result.steps), f"{result.eval_loss_before:.4f}",
                          f"{result.eval_loss_after:.4f}", result.adapter_dir)
    console.print(table)
    if any(isinstance(result, str) for result in results.values()):
        raise typer.Exit(1)


@app.command("plan")
def plan(
    model: str = typer.Option(..., help="preset (llama-3.1-8b, llama-3.1-70b) or a config.json / model folder"),
    method: str = typer.Option("lora", help="full, or a PEFT method: lora, dora, ia3, prefix, prompt, qlora"),
    rank: int = typer.Option(16, help="rank (lora, dora, qlora)"),
    targets: str = typer.Option("all-linear", help="target modules (lora, dora, qlora): all-linear or a comma-separated list"),
    virtual_tokens: int = typer.Option(16, help="virtual tokens (prefix, prompt)"),
    batch: int = typer.Option(1, help="sequences per micro-batch per device"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step (does not change memory)"),
    zero_stage: int = typer.Option(0, help="DeepSpeed ZeRO stage for full fine-tuning (0-3)"),
    offload: str = typer.Option("none", help="none or cpu (ZeRO-Offload)"),
    devices: int = typer.Option(1, help="data-parallel devices ZeRO (full) or --shard-base (adapters) partitions over"),
    shard_base: bool = typer.Option(False, help="adapters: shard the frozen base and the adapter over --devices "
                                                "(train.shard_base: fsdp)"),
    precision: str = typer.Option("bf16", help="bf16 (GPUs) or fp32 (CPU runs)"),
    optimizer: str = typer.Option("adamw", help="adamw (mixed precision, 16 B/param) or adamw-bf16 (8 B/param)"),
    gradient_checkpointing: bool = typer.Option(True, help="recompute activations in backward"),
    gpu: Optional[str] = typer.Option(None, help="device memory to check against, for example 24GB or 80G"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON (per-device total under total_gb)"),
) -> None:
    """Estimate per-device memory of a fine-tune before running it, and say whether it fits.

    Exit code 1 when --gpu is given and the plan does not fit.
    """
    from pydantic import ValidationError

    from farm.methods import method_info, planner_fields
    from farm.plan import GiB, PlanError, PlanRequest, devices_needed, load_shape, parse_size, plan_memory, render_table

    try:
        shape = load_shape(model)
        if method == "full":
            method_fields: dict = {"method": "full"}
        else:  # the method's own settings, as a spec would give them, and its planner view
            info = method_info(method)
            given = {"rank": rank, "target_modules": targets if targets == "all-linear" else
                     [t.strip() for t in targets.split(",")], "num_virtual_tokens": virtual_tokens}
            if "rank" not in info.settings.model_fields and targets == "all-linear":
                del given["target_modules"]  # IA3 keeps its own default targets
            settings = info.settings.model_validate({k: v for k, v in given.items() if k in info.settings.model_fields})
            method_fields = planner_fields(method, settings, shape)
        request = PlanRequest(
            **method_fields, zero_stage=zero_stage, offload=offload, devices=devices,
            batch=batch, seq_len=seq_len, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing,
            precision=precision, optimizer=optimizer, shard_base=shard_base)
        result = plan_memory(shape, request)
        device = parse_size(gpu) if gpu else None
    except (PlanError, ValueError, KeyError, ValidationError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    fits = result.fits(device) if device is not None else None
    # For a full fine-tune that does not fit: how many ZeRO-3 devices would.
    zero3 = devices_needed(shape, PlanRequest(**{**request.__dict__, "zero_stage": 3}), device) \
        if fits is False and method == "full" else None
    # For an adapter that does not fit: the fewest devices over which a sharded base fits, and
    # QLoRA (a 4-bit base) on one device with the same rank, side by side.
    sharded = qlora = None
    if fits is False and method not in ("full", "qlora") and not method_info(method).no_sharded_base:
        sharded = devices_needed(shape, PlanRequest(**{**request.__dict__, "shard_base": True}), device)
    if fits is False and method in ("lora", "dora"):
        from farm.methods import QLoraSettings

        fields = planner_fields("qlora", QLoraSettings(rank=rank, target_modules=given["target_modules"]), shape)
        qlora = plan_memory(shape, PlanRequest(**{**request.__dict__, **fields, "devices": 1, "shard_base": False}))
    if as_json:
        data = result.to_json()
        if device is not None:
            data.update(device_gb=round(device / GiB, 2), fits=fits, zero3_devices_needed=zero3,
                        sharded_base_devices_needed=sharded,
                        qlora_one_device_gb=round(qlora.total_gb, 2) if qlora else None,
                        qlora_one_device_fits=qlora.fits(device) if qlora else None)
        print(json.dumps(data, indent=2))
    else:
        console.print(render_table(result, device))
        for note in result.assumptions:
            console.print(f"  - {note}", highlight=False, markup=False)
        if fits is not None:
            verdict = "[green]fits[/green]" if fits else "[red]does not fit[/red]"
            console.print(f"{result.total_gb:.2f} GB per device on a {device / GiB:.0f} GB device: {verdict}")
            if zero3:
                console.print(f"a ZeRO-3 full fine-tune fits on {zero3} such devices")
            if fits is False and method not in ("full", "qlora"):
                console.print("with the base sharded (--shard-base, train.shard_base: fsdp): "
                              + (f"fits on {sharded} such devices" if sharded else "fits on no number of them"))
            if qlora is not None:
                console.print(f"QLoRA (4-bit base) on one device: {qlora.total_gb:.2f} GB, "
                              + ("fits" if qlora.fits(device) else "does not fit"))
    if fits is False:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
