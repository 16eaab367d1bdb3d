"""Usage metering: what each tenant's requests cost, from vLLM's own ``usage`` figures.

Every finished request (completed, failed, or cut off mid-stream) is recorded once, in memory:
Prometheus counters for ``/metrics`` and per-hour sums that ``flush()`` adds to the catalog's
``usage`` table, where ``farm usage`` reads them. The gateway flushes every few seconds and on
shutdown; a crash loses at most that interval.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import datetime, timezone

from farm.registry.catalog import Catalog, UsageDelta

logger = logging.getLogger("farm.gateway.metering")


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


class Meter:
    """Per-tenant, per-model request, error and token counters (thread-safe)."""

    def __init__(self, catalog: Catalog, prometheus_registry):
        from prometheus_client import Counter

        self.catalog = catalog
        self._pending: dict[tuple[str, str, str, datetime], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._lock = threading.Lock()
        labels = ["tenant", "model", "base"]
        self.requests = Counter("farm_gateway_requests", "inference requests", labels + ["status"],
                                registry=prometheus_registry)
        self.tokens = Counter("farm_gateway_tokens", "tokens metered from vLLM's usage", labels + ["kind"],
                              registry=prometheus_registry)

    def record(self, tenant: str, model: str, base: str, status: int, prompt_tokens: int,
               completion_tokens: int, when: datetime | None = None) -> None:
        """Count one request that reached a backend (``status``: what the client got)."""
        error = status >= 400
        with self._lock:
            sums = self._pending[(tenant, model, base, _hour(when or datetime.now(timezone.utc)))]
            sums[0] += 1
            sums[1] += int(error)
            sums[2] += prompt_tokens
            sums[3] += completion_tokens
        self.requests.labels(tenant, model, base, str(status)).inc()
        if prompt_tokens:
            self.tokens.labels(tenant, model, base, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(tenant, model, base, "completion").inc(completion_tokens)

    def flush(self) -> int:
        """Add pending sums to the catalog; returns the rows written. Kept pending on failure."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0])
        if not pending:
            return 0
        deltas = [UsageDelta(tenant, model, base, hour, *sums)
                  for (tenant, model, base, hour), sums in pending.items()]
        try:
            self.catalog.add_usage(deltas)
        except Exception:
            logger.exception("could not write usage to the catalog; keeping it for the next flush")
            with self._lock:
                for key, sums in pending.items():
                    mine = self._pending[key]
                    for index, value in enumerate(sums):
                        mine[index] += value
            return 0
        return len(deltas)
