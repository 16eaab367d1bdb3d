"""The sweep's command line: ``farm sweep`` (and ``jobs/tenant_sweep.py``), ``farm baseline``
(and ``jobs/full_ft_baseline.py``). The job scripts are thin wrappers, so an installed
package (the image) runs what it installed.

Train every tenant of a sweep spec concurrently on Ray Train.

    ray job submit --working-dir . -- python jobs/tenant_sweep.py --config jobs/configs/demo.yaml
    ray job submit -- farm sweep --config spec.yaml                  # an image with the farm installed
    farm sweep --config jobs/configs/demo.yaml                       # starts a local Ray instance

Under ``ray job submit`` it joins that cluster; run directly it connects to a running local
cluster (``ray start --head``) or starts one. Re-running with the same ``--sweep-id`` skips
finished tenants and resumes interrupted ones from their last checkpoint; its report keeps the
latest outcome of every tenant the sweep id has run, including those not asked for this time.
Exit code 0 means every tenant this run was asked for succeeded; 1 means at least one of them
is invalid or failed (see the report); 2 means the spec itself is invalid.

With ``--service URL`` the tenants go to a running ``farm service`` as fine-tuning jobs
instead (``farm.service.submit``); no Ray is needed here then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Train every tenant of a sweep spec concurrently on Ray "
                                     "Train (or submit them to a farm service).")
    parser.add_argument("--config", required=True, type=Path, help="sweep spec YAML")
    parser.add_argument("--tenants", help="comma-separated subset of the spec's tenants")
    parser.add_argument("--sweep-id", help="sweep id (default: the spec's name); reuse it to resume")
    parser.add_argument("--max-concurrent", type=_at_least_one, metavar="N",
                        help="at most N tenants training at once; a co-training pack counts as the tenants it "
                             "trains at once (its slots) and is planned with at most N (default: as many as "
                             "the cluster takes)")
    # On a cluster these come from the environment its definition sets (cluster/*.yaml).
    parser.add_argument("--storage", default=os.environ.get("FARM_STORAGE"),
                        help="Ray Train storage root shared by all nodes (folder or s3://...); default $FARM_STORAGE")
    parser.add_argument("--base-model", help="override base_model.name_or_path (hub id or folder)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--registry-store", default=os.environ.get("FARM_REGISTRY_STORE"),
                        help="override registry.store (folder or s3://...); default $FARM_REGISTRY_STORE")
    parser.add_argument("--registry-catalog", default=os.environ.get("FARM_REGISTRY_CATALOG"),
                        help="override registry.catalog (SQLAlchemy URL); default $FARM_REGISTRY_CATALOG")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="spec overrides after the flags, e.g. defaults.train.max_steps=10 "
                             "defaults.lora.rank=16 (values are YAML; tenants are a list: edit the file)")
    parser.add_argument("--changed-only", action="store_true",
                        help="train only the tenants whose base model, settings or dataset fingerprint differ from "
                             "their newest version's lineage; the others keep that version (needs a registry)")
    parser.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress updates")
    parser.add_argument("--service", metavar="URL",
                        help="submit the tenants as jobs to the farm service behind this gateway instead of training "
                             "them here (admin token in $FARM_SERVICE_TOKEN; see farm/service/submit.py)")
    parser.add_argument("--service-model", default=os.environ.get("FARM_SERVICE_MODEL"),
                        help="with --service: the gateway's base name to fine-tune (default $FARM_SERVICE_MODEL)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs and what the training workers print (default: the sweep's "
                             "progress, outcomes and report only; worker logs stay in Ray's session folder)")
    return parser.parse_args(argv)


def configure_logging(verbose: bool) -> None:
    """The farm's log records as plain lines on stdout (the job log); Ray's only when verbose."""
    farm = logging.getLogger("farm")
    if not any(getattr(h, "farm_sweep", False) for h in farm.handlers):  # main() may run twice in a process
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.farm_sweep = True
        farm.addHandler(handler)
    farm.setLevel(logging.INFO)
    farm.propagate = False
    for name in ("ray", "ray.train", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv: list[str] | None = None, extra_overrides: dict | None = None, prog: str | None = None) -> int:
    """Run the sweep; ``extra_overrides`` are deep-merged over the spec (after the flags')."""
    args = parse_args(argv, prog)
    from farm.spec import SpecError, deep_merge, load_spec, parse_overrides
    from farm.sweep import SweepOptions, run_sweep

    overrides: dict = {}
    if args.base_model:
        local = Path(args.base_model)
        overrides["base_model"] = {"name_or_path": str(local.resolve()) if local.exists() else args.base_model}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir if "://" in args.output_dir else str(Path(args.output_dir).resolve())
    if args.registry_store or args.registry_catalog:
        overrides["registry"] = {}
        if args.registry_store:
            store = args.registry_store
            overrides["registry"]["store"] = store if "://" in store else str(Path(store).resolve())
        if args.registry_catalog:
            overrides["registry"]["catalog"] = args.registry_catalog
    try:
        overrides = deep_merge(overrides, parse_overrides(args.overrides))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    overrides.update(extra_overrides or {})
    try:
        sweep = load_spec(args.config, overrides)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    tenants = tuple(t.strip() for t in args.tenants.split(",")) if args.tenants else None
    unknown = sorted(set(tenants or ()) - set(sweep.jobs))
    if unknown:
        print(f"{args.config}: unknown tenant(s) {', '.join(unknown)}; the spec has {', '.join(sweep.jobs)}",
              file=sys.stderr)
        return 2

    if args.service:
        if not args.service_model:
            print("--service needs --service-model (or $FARM_SERVICE_MODEL): the gateway's base to fine-tune",
                  file=sys.stderr)
            return 2
        from farm.service.submit import submit_to_service

        return submit_to_service(sweep, list(tenants or sweep.jobs), args.service, args.service_model)

    configure_logging(args.verbose)
    import ray

    # Workers' own output (library warnings, Ray Train's start-up chatter) stays in Ray's log
    # files unless asked for: every tenant's outcome and error reaches the report regardless.
    # A local instance this script starts runs without the dashboard: its dozen module processes
    # would compete with the pools' start-up for the cores (about 1.5 s of a sweep's fixed cost on
    # 2 cores); the sweep shows its own progress. `ray start --head` first for a dashboard.
    # (Ignored when joining a running cluster, which keeps its own.)
    ray.init(log_to_driver=args.verbose, logging_level=logging.INFO if args.verbose else logging.WARNING,
             include_dashboard=False)
    options = SweepOptions(sweep_id=args.sweep_id or sweep.spec.name, tenants=tenants,
                           max_concurrent=args.max_concurrent, storage=args.storage,
                           progress_every_s=args.progress_every, changed_only=args.changed_only)
    try:
        report = run_sweep(sweep, options)
    except SpecError as exc:  # refused up front (a method this cluster cannot run): nothing started
        print(exc, file=sys.stderr)
        return 2
    # report.ok covers every tenant of the sweep id, earlier runs' included; the exit code
    # answers for what this run was asked to do, so re-running the failed tenants can exit 0.
    return 0 if report.ran_ok else 1


BASELINE_DOC = """Full fine-tuning baseline (DeepSpeed ZeRO on Ray Train) for some tenants, compared with LoRA.

    ray job submit -- farm baseline --config jobs/configs/demo.yaml --tenants acme --zero-stage 3 --workers 2
    make baseline      # the same on a fresh clone: local Ray, tiny base model, sample tenant acme

It runs the sweep of the given tenants with a ``baseline`` section set from the flags (over the
spec's own, if it has one): each tenant's LoRA adapter is trained first (or reused from an
earlier run of the same sweep id), then its full fine-tune on the same rows per step, in the
same order, for the same steps and seed. The sweep's summary then prints the comparison (eval
loss, wall time, tokens/s, peak memory per worker against the planner's estimate, trainable
parameters, bytes on disk) and writes it into report.json / report.md / lora_vs_full.png.
Every other flag is the sweep's (``farm sweep --help``).
"""


def baseline_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the sweep of ``--tenants`` with a full fine-tuning baseline from the flags; the sweep's exit codes."""
    parser = argparse.ArgumentParser(description=BASELINE_DOC.splitlines()[0], add_help=False)
    parser.add_argument("--tenants", default="acme", help="comma-separated tenants to fine-tune fully")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="ZeRO stage (spec's or 2)")
    parser.add_argument("--offload", choices=["none", "cpu"], help="offload optimizer (and stage-3 weights) to host")
    parser.add_argument("--workers", type=int, help="data-parallel workers (default: the planner's choice, at least 2)")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate of the full fine-tune")
    args, rest = parser.parse_known_args(argv)
    baseline: dict = {"tenants": [t.strip() for t in args.tenants.split(",")]}
    for key in ("zero_stage", "offload", "workers", "learning_rate"):
        if getattr(args, key) is not None:
            baseline[key] = getattr(args, key)
    return main(rest + ["--tenants", args.tenants], extra_overrides={"baseline": baseline}, prog=prog)

