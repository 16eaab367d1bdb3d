"""Per-tenant admission: requests and tokens per minute, requests in flight (plain objects).

Each tenant has two token buckets that refill continuously (a minute's allowance as capacity)
and a counter of requests in flight. A request is admitted when its tenant has a request to
spend, tokens for its estimated cost (prompt estimate + ``max_tokens``) and a free concurrent
slot; its cost is then debited at once, and corrected with vLLM's own ``usage`` when it ends.
Refusals say which limit and how long to wait (``Retry-After``). Nothing here does I/O: the
gateway calls it, and tests drive it with their own clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from farm.serving.gateway_config import LimitsConfig, TenantLimits


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and after how many whole seconds to retry."""

    limit: str
    retry_after_s: int
    message: str


class _Bucket:
    """A token bucket holding at most ``capacity``, refilled at ``capacity`` per minute."""

    def __init__(self, capacity: int, now: float):
        self.capacity, self.level, self.stamp = float(capacity), float(capacity), now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now)."""
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


class _TenantState:
    def __init__(self, limits: TenantLimits, now: float):
        self.limits = limits
        self.requests = _Bucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = _Bucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.in_flight = 0


class Limiter:
    """Admission control for every tenant of one gateway process (thread-safe)."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self._tenants: dict[str | None, _TenantState] = {}
        self._limits: dict[str | None, TenantLimits] = {}
        self._lock = threading.Lock()

    def limits_of(self, tenant: str | None) -> TenantLimits:
        """The tenant's effective limits (the default filling what it leaves out), memoised."""
        limits = self._limits.get(tenant)
        if limits is None:
            limits = self._limits[tenant] = self.config.for_tenant(tenant)
        return limits

    def _state(self, tenant: str | None, now: float) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState(self.limits_of(tenant), now)
        return state

    def admit(self, tenant: str | None, estimated_tokens: int) -> Refusal | None:
        """Debit one request and ``estimated_tokens``; a ``Refusal`` (nothing debited) if over."""
        now = self.clock()
        with self._lock:
            state = self._state(tenant, now)
            limits = state.limits
            if limits.concurrent_requests and state.in_flight >= limits.concurrent_requests:
                return Refusal("concurrent_requests", 1,
                               f"{state.in_flight} requests in flight, the limit is {limits.concurrent_requests}")
            waits = []
            if state.requests is not None:
                state.requests.refill(now)
                waits.append(("requests_per_minute", state.requests.wait_for(1),
                              f"over {limits.requests_per_minute} requests per minute"))
            if state.tokens is not None:
                state.tokens.refill(now)
                waits.append(("tokens_per_minute", state.tokens.wait_for(estimated_tokens),
                              f"over {limits.tokens_per_minute} tokens per minute "
                              f"(this request may use {estimated_tokens})"))
            for limit, wait, message in waits:
                if wait > 0:
                    return Refusal(limit, max(1, math.ceil(wait)), message)
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= estimated_tokens
            state.in_flight += 1
            return None

    def release(self, tenant: str | None, estimated_tokens: int, used_tokens: int | None) -> None:
        """End an admitted request: free its slot, and replace its estimate by what it used."""
        with self._lock:
            state = self._tenants[tenant]
            state.in_flight -= 1
            if state.tokens is not None and used_tokens is not None:
                # may go below zero (a debt) when the estimate was low; refill pays it back
                state.tokens.level = min(state.tokens.capacity,
                                         state.tokens.level + estimated_tokens - used_tokens)
