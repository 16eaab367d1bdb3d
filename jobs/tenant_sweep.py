"""Train every tenant of a sweep spec concurrently on Ray Train (``farm sweep`` does the same).

    ray job submit --working-dir . -- python jobs/tenant_sweep.py --config jobs/configs/demo.yaml
    python jobs/tenant_sweep.py --config jobs/configs/demo.yaml      # starts a local Ray instance
    python jobs/tenant_sweep.py --help                               # every flag

The command line lives in ``farm/sweep_command.py``; this script runs it from a checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's farm package

from farm.sweep_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
