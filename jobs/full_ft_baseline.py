"""Full fine-tuning baseline (DeepSpeed ZeRO on Ray Train) for some tenants, compared with LoRA
(``farm baseline`` does the same).

    ray job submit --working-dir . -- python jobs/full_ft_baseline.py --config jobs/configs/demo.yaml \\
        --tenants acme --zero-stage 3 --workers 2
    make baseline      # the same on a fresh clone: local Ray, tiny base model, sample tenant acme

The command line lives in ``farm/sweep_command.py`` (``baseline_main``); every other flag is the sweep's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's farm package

from farm.sweep_command import baseline_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(baseline_main())
