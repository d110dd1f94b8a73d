"""The one clock. Scripts take ``now`` in milliseconds as an argument, so time can be driven."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, as the pool sees it."""
        ...


class WallClock:
    """The machine's clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class OffsetClock:
    """The machine's clock moved by an offset measured once: an operator's command that runs
    transitions on the server's clock (TIME less this host's), not on a host's minutes off."""

    def __init__(self, offset_ms: int) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return WallClock().now_ms() + self.offset_ms


class ManualClock:
    """A clock that moves only when told to: tests and the replay benchmark drive it."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        if now_ms < self._now:
            raise ValueError("time does not go backwards")
        self._now = now_ms

    def advance(self, ms: int) -> int:
        self._now += ms
        return self._now


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, less if `stop` is set meanwhile; whether it is set (the loops' pause
    between tries, ticks and sends, which a shutdown must not wait out)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def server_now_ms(client: Any) -> int:
    """A Redis server's clock (TIME), in ms: what an operator's transition is stamped with, not
    the CLI host's, which may run ahead of the replicas' (a review: `drain --now` from a host
    five minutes ahead queued a user who then waited two minutes, measured as none). The
    replicas' clocks are measured against the server's (ProvisionerClockOffset)."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000
