"""Fair admission of requests into each model's engine, so that one tenant's flood cannot starve another.

Every model has a capacity: the sequences its engine runs at once (max_num_seqs). The gateway never sends it
more, so the engine's own first-come-first-served queue stays empty and the order of service is decided
here. Requests that cannot start at once wait in per-tenant FIFO queues. Whenever capacity frees up, the
next request comes from the waiting tenant with the FEWEST sequences running on that model (ties: the
tenant served least recently), and never from a tenant already at its `max_concurrent` requests (counted
over all models). So a tenant sending its first request goes ahead of one that already runs many, and a
tenant's queue can only delay that tenant.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from deepseek_core.serving.errors import OpenAIError

from .config import TenantSpec


@dataclass(eq=False)
class Ticket:
    """One request's claim on a model: `cost` sequences while admitted."""

    tenant: str
    model: str
    cost: int
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    released: bool = False
    future: asyncio.Future[None] | None = None

    @property
    def queue_time(self) -> float:
        """Seconds spent waiting for admission."""
        return (self.admitted or time.perf_counter()) - self.enqueued


class FairScheduler:
    """Per-model capacity, per-tenant concurrency caps, and least-served-first admission."""

    def __init__(self, capacities: dict[str, int], tenants: dict[str, TenantSpec]) -> None:
        self._capacity = dict(capacities)
        self._tenants = tenants
        self._used: dict[str, int] = {m: 0 for m in capacities}
        self._running: dict[str, int] = defaultdict(int)  # tenant -> admitted requests (all models)
        self._seqs: dict[tuple[str, str], int] = defaultdict(int)  # (tenant, model) -> admitted sequences
        self._queues: dict[str, dict[str, deque[Ticket]]] = {m: {} for m in capacities}
        self._last_served: dict[tuple[str, str], int] = {}
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------ requests
    async def acquire(self, tenant: str, model: str, cost: int) -> Ticket:
        """Wait until `tenant` may run `cost` sequences on `model`; 429 when its queue is full.

        Cancelling the waiting task removes the request from the queue (or releases it when it was just
        admitted).
        """
        spec = self._tenants[tenant]
        ticket = Ticket(tenant, model, max(1, min(int(cost), self._capacity[model])))
        if self.queued(tenant) >= spec.max_queued and not self._can_start_now(ticket):
            raise OpenAIError(
                429,
                f"tenant {tenant!r} has {self.queued(tenant)} requests waiting (max_queued {spec.max_queued}); "
                "retry later",
                code="too_many_queued_requests",
                headers={"Retry-After": "1"},
            )
        ticket.future = asyncio.get_running_loop().create_future()
        self._queues[model].setdefault(tenant, deque()).append(ticket)
        self._dispatch()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.admitted is not None:
                self.release(ticket)
            else:
                self._remove(ticket)
            raise
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give back an admitted ticket's capacity (idempotent) and admit whoever is next."""
        if ticket.admitted is None or ticket.released:
            return
        ticket.released = True
        self._used[ticket.model] -= ticket.cost
        self._running[ticket.tenant] -= 1
        self._seqs[(ticket.tenant, ticket.model)] -= ticket.cost
        self._dispatch()

    # ------------------------------------------------------------------ views
    def queued(self, tenant: str, model: str | None = None) -> int:
        """Requests of `tenant` waiting (for one model, or all)."""
        models = [model] if model is not None else list(self._queues)
        return sum(len(self._queues[m].get(tenant, ())) for m in models)

    def running(self, tenant: str) -> int:
        """Admitted requests of `tenant` (all models)."""
        return self._running[tenant]

    def sequences(self, tenant: str, model: str) -> int:
        """Sequences `tenant` has admitted on `model`."""
        return self._seqs[(tenant, model)]

    def used(self, model: str) -> int:
        """Sequences admitted on `model`."""
        return self._used[model]

    # ------------------------------------------------------------------ admission
    def _can_start_now(self, ticket: Ticket) -> bool:
        spec = self._tenants[ticket.tenant]
        return (
            not any(self._queues[ticket.model].values())
            and self._running[ticket.tenant] < spec.max_concurrent
            and self._used[ticket.model] + ticket.cost <= self._capacity[ticket.model]
        )

    def _remove(self, ticket: Ticket) -> None:
        queue = self._queues[ticket.model].get(ticket.tenant)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._queues[ticket.model][ticket.tenant]
        self._dispatch()  # the removed ticket may have blocked the head of the line

    def _dispatch(self) -> None:
        """Admit waiting requests while capacity and the tenants' caps allow, least-served tenant first."""
        for model, queues in self._queues.items():
            while queues:
                for tenant in list(queues):
                    queue = queues[tenant]
                    while queue and queue[0].future is not None and queue[0].future.done():
                        queue.popleft()  # cancelled while waiting
                    if not queue:
                        del queues[tenant]
                eligible = [
                    t for t, q in queues.items() if q and self._running[t] < self._tenants[t].max_concurrent
                ]
                if not eligible:
                    break
                tenant = min(
                    eligible, key=lambda t: (self._seqs[(t, model)], self._last_served.get((model, t), 0))
                )
                ticket = queues[tenant][0]
                if self._used[model] + ticket.cost > self._capacity[model]:
                    break  # the chosen tenant gets the next capacity that frees up
                queues[tenant].popleft()
                if not queues[tenant]:
                    del queues[tenant]
                self._admit(ticket)

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted = time.perf_counter()
        self._used[ticket.model] += ticket.cost
        self._running[ticket.tenant] += 1
        self._seqs[(ticket.tenant, ticket.model)] += ticket.cost
        self._last_served[(ticket.model, ticket.tenant)] = next(self._counter)
        assert ticket.future is not None
        ticket.future.set_result(None)
