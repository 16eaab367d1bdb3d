"""Full fine-tuning baseline (DeepSpeed ZeRO on Ray Train) for some tenants, compared with LoRA.

    ray job submit --working-dir . -- python jobs/full_ft_baseline.py --config jobs/configs/demo.yaml \\
        --tenants acme --zero-stage 3 --workers 2
    make baseline      # the same on a fresh clone: local Ray, tiny base model, sample tenant acme

It runs the sweep of the given tenants with a ``baseline`` section set from the flags (over the
spec's own, if it has one): each tenant's LoRA adapter is trained first (or reused from an
earlier run of the same sweep id), then its full fine-tune on the same rows per step, in the
same order, for the same steps and seed. The sweep's summary then prints the comparison (eval
loss, wall time, tokens/s, peak memory per worker against the planner's estimate, trainable
parameters, bytes on disk) and writes it into report.json / report.md / lora_vs_full.png.
Every other flag is the sweep's (see jobs/tenant_sweep.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tenant_sweep  # noqa: E402  (the sibling job; jobs/ is not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
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
    return tenant_sweep.main(rest + ["--tenants", args.tenants], extra_overrides={"baseline": baseline})


if __name__ == "__main__":
    sys.exit(main())
