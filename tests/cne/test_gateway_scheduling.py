"""The gateway's fair scheduler and rate limiter on their own (no processes): admission order, caps, limits."""

from __future__ import annotations

import asyncio

import pytest
from deepseek_cne.gateway.config import TenantSpec
from deepseek_cne.gateway.limits import RateLimiter
from deepseek_cne.gateway.scheduler import FairScheduler
from deepseek_core.serving.errors import OpenAIError


def _tenants(**specs: dict[str, object]) -> dict[str, TenantSpec]:
    return {name: TenantSpec(name=name, key_hashes=("0" * 64,), **kw) for name, kw in specs.items()}  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_least_served_tenant_goes_first() -> None:
    async def scenario() -> list[str]:
        sched = FairScheduler({"m": 4}, _tenants(a={"max_concurrent": 10}, b={"max_concurrent": 10}))
        held = [await sched.acquire("a", "m", 1) for _ in range(4)]  # a fills the model
        order: list[str] = []

        async def request(tenant: str) -> None:
            ticket = await sched.acquire(tenant, "m", 1)
            order.append(tenant)
            await asyncio.sleep(0)
            sched.release(ticket)

        tasks = [asyncio.ensure_future(request("a")) for _ in range(6)]
        await _settle()
        tasks.append(asyncio.ensure_future(request("b")))  # b arrives after six queued requests of a
        await _settle()
        assert sched.queued("a") == 6 and sched.queued("b") == 1
        sched.release(held.pop())  # one slot frees: b (nothing running) goes before a (3 running)
        await _settle()
        for ticket in held:
            sched.release(ticket)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order[0] == "b" and order.count("a") == 6


def test_max_concurrent_caps_a_tenant_but_not_others() -> None:
    async def scenario() -> None:
        sched = FairScheduler({"m": 16}, _tenants(a={"max_concurrent": 2}, b={"max_concurrent": 2}))
        first = [await sched.acquire("a", "m", 1) for _ in range(2)]
        waiting = asyncio.ensure_future(sched.acquire("a", "m", 1))
        await _settle()
        assert not waiting.done() and sched.running("a") == 2 and sched.queued("a") == 1
        b = await asyncio.wait_for(sched.acquire("b", "m", 1), 1)  # b is not held back by a's cap
        sched.release(first[0])
        third = await asyncio.wait_for(waiting, 1)
        assert sched.running("a") == 2
        for ticket in (first[1], third, b):
            sched.release(ticket)
        assert sched.used("m") == 0 and sched.running("a") == sched.running("b") == 0

    asyncio.run(scenario())


def test_capacity_counts_sequences_and_cancelled_waiters_leave() -> None:
    async def scenario() -> None:
        sched = FairScheduler({"m": 4}, _tenants(a={"max_concurrent": 10}, b={"max_concurrent": 10}))
        big = await sched.acquire("a", "m", 3)  # n=3
        assert sched.used("m") == 3
        clamped = asyncio.ensure_future(
            sched.acquire("b", "m", 100)
        )  # more than the model runs: clamped to 4
        await _settle()
        assert not clamped.done()
        small = asyncio.ensure_future(sched.acquire("a", "m", 1))
        await _settle()
        assert not small.done()  # b's head of line is served first when capacity frees; a waits behind it
        clamped.cancel()  # b's client goes away: it leaves the queue and a's request fits now
        await asyncio.wait_for(small, 1)
        assert sched.queued("b") == 0 and sched.used("m") == 4
        sched.release(big)
        sched.release(small.result())
        sched.release(small.result())  # idempotent
        assert sched.used("m") == 0

    asyncio.run(scenario())


def test_full_queue_is_429() -> None:
    async def scenario() -> None:
        sched = FairScheduler({"m": 1}, _tenants(a={"max_concurrent": 1, "max_queued": 2}))
        held = await sched.acquire("a", "m", 1)
        queued = [asyncio.ensure_future(sched.acquire("a", "m", 1)) for _ in range(2)]
        await _settle()
        with pytest.raises(OpenAIError) as info:
            await sched.acquire("a", "m", 1)
        assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
        for task in queued:
            task.cancel()
        sched.release(held)

    asyncio.run(scenario())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(_tenants(a={"requests_per_minute": 3}, b={}), clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(OpenAIError) as info:
        limiter.check("a")
    assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "20"
    assert "3 requests per minute" in info.value.message
    for _ in range(100):
        limiter.check("b")  # unlimited
    clock.now += 20.0
    limiter.check("a")  # one request accrued
    with pytest.raises(OpenAIError):
        limiter.check("a")


def test_tokens_per_minute_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(_tenants(a={"tokens_per_minute": 60}), clock=clock)
    limiter.check("a")
    limiter.charge_tokens("a", 50)
    limiter.check("a")  # 10 left: admitted
    limiter.charge_tokens("a", 50)  # now 40 in debt
    assert limiter.remaining("a")["tokens"] == 0
    with pytest.raises(OpenAIError) as info:
        limiter.check("a")
    assert info.value.headers["Retry-After"] == "40"  # 1 token per second repays the debt
    clock.now += 41
    limiter.check("a")
