"""`bench soak`: the local stack under steady traffic for a long while, sampled as it runs.

The tests and the replays say each transition is right; they do not say the state stays
bounded when the service runs for hours. This starts what `make run` starts (a private server,
the mock Node API, N replicas, the simulator) with no view, and every `every` seconds records
what would grow if something leaked: the server's memory and key count, the size of every
structure of the pool, the per-user and per-node keys, each process's resident memory, and
whether the pool's invariants hold (`view.check_invariants`, as `provisioner check`). At the end
it counts the tracebacks, errors and warnings in every process's log and names any process
that stopped early.

What it reports is growth, not a verdict on it: the first half of a run fills the pool's
windows and the model, so a leak shows as a slope over the second half. The run fails (exit 1)
only on what is wrong whatever the figures: a process that stopped, an invariant broken, a
traceback in a log.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import redis.asyncio as aioredis

from provisioner import view
from provisioner.devstack import stack
from provisioner.keys import POOL_KEY_ORDER, PoolKeys
from provisioner.redis_server import server_label

POOL = "default"
#: The pool's entries that are key prefixes, not keys (their keys are counted by a SCAN).
PREFIXES = {"node_prefix": "node", "acts_prefix": "acts", "seen_prefix": "seen"}
#: What `check_invariants` says when writers kept changing the pool under every read: the
#: check did not run, nothing was found broken.
UNCHECKED = "the pool changed during each of"
STATS = ("connects", "hits", "misses", "activities", "releases")
LOG_MARKS = {"traceback": "Traceback (most recent call last)", "error": " ERROR ",
             "warning": " WARNING "}


@dataclass(frozen=True)
class Sample:
    """One reading of the running stack."""

    t_s: float  # seconds since traffic started
    memory_mb: float  # the server's used_memory
    keys: int  # DBSIZE
    sizes: dict[str, int]  # each pool structure's length, and the per-user/per-node key counts
    rss_mb: dict[str, float]  # resident memory: the server's (INFO), each process's (Linux's /proc)
    stats: dict[str, int]  # the pool's counters (connects, hits, misses, ...)
    problems: list[str]  # invariants broken at that instant
    checked: bool  # False when writers changed the pool under every read of the check


@dataclass
class SoakResult:
    server: str
    replicas: int
    samples: list[Sample] = field(default_factory=list)
    exited: dict[str, int] = field(default_factory=dict)  # process -> exit code, if it stopped
    logs: dict[str, dict[str, int]] = field(default_factory=dict)  # process -> mark -> lines
    logdir: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # process -> its pid, while it ran

    @property
    def failed(self) -> list[str]:
        """What is wrong whatever the figures: stopped processes, broken invariants,
        tracebacks."""
        wrong = [f"{name} stopped (exit {code})" for name, code in self.exited.items()]
        broken = [s for s in self.samples if s.problems]
        if broken:
            wrong.append(f"invariants broken in {len(broken)} of {len(self.samples)} samples, "
                         f"first at {broken[0].t_s:.0f} s: {broken[0].problems[0]}")
        wrong += [f"{name}: {marks['traceback']} traceback(s) in its log"
                  for name, marks in self.logs.items() if marks.get("traceback")]
        return wrong

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "failed": self.failed}


def rss_mb(pid: int) -> float | None:
    """A process's resident memory from /proc (None where there is no /proc, or it ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found[1]) / 1024 if found else None


def pool_sizes(client: redis.Redis, keys: PoolKeys) -> dict[str, int]:
    """The length of every structure of the pool by its type, and how many per-user and
    per-node keys there are (one SCAN of the database; `other` counts keys outside the pool)."""
    names = [n for n in POOL_KEY_ORDER if n not in PREFIXES]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.type(keys.key(name))
    types = pipe.execute()
    length = {"list": pipe.llen, "hash": pipe.hlen, "zset": pipe.zcard, "stream": pipe.xlen,
              "set": pipe.scard}
    measured = []
    for name, kind in zip(names, types, strict=True):
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind in length:
            length[kind](keys.key(name))
            measured.append(name)
    sizes = dict(zip(measured, (int(n) for n in pipe.execute()), strict=True))
    prefixes = {keys.key(prefix): label for prefix, label in PREFIXES.items()}
    counted: Counter[str] = Counter({label: 0 for label in PREFIXES.values()})
    for raw in client.scan_iter(count=1000):
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        label = next((lb for pre, lb in prefixes.items() if name.startswith(pre)), None)
        if label is None and not name.startswith(keys.base):
            label = "other"
        if label:
            counted[label] += 1
    sizes.update({f"{label} keys": n for label, n in counted.items()})
    return sizes


def take_sample(client: redis.Redis, url: str, t_s: float,
                processes: dict[str, int]) -> Sample:
    keys = PoolKeys(POOL)
    memory = client.info("memory")
    raw_stats = client.hgetall(keys.key("stats"))
    stats = {}
    for field_name in STATS:
        value = raw_stats.get(field_name.encode(), b"0")
        stats[field_name] = int(value) if value.isdigit() else -1

    async def check() -> list[str]:
        async_client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await view.check_invariants(async_client, POOL)
        finally:
            await async_client.aclose()

    problems = asyncio.run(check())
    checked = not (problems and problems[0].startswith(UNCHECKED))
    resident = {"server": int(memory["used_memory_rss"]) / 2**20}
    resident.update((name, mb) for name, pid in processes.items()
                    if (mb := rss_mb(pid)) is not None)
    return Sample(t_s=t_s, memory_mb=int(memory["used_memory"]) / 2**20,
                  keys=int(client.dbsize()), sizes=pool_sizes(client, keys), rss_mb=resident,
                  stats=stats, problems=problems if checked else [], checked=checked)


def count_log_marks(path: Path) -> dict[str, int]:
    counts = dict.fromkeys(LOG_MARKS, 0)
    with path.open(errors="replace") as log:
        for line in log:
            for mark, text in LOG_MARKS.items():
                if text in line:
                    counts[mark] += 1
    return counts


def run(minutes: float, every: float, replicas: int, boot_delay: str, arrival_rate: float,
        simulate: list[str], on_sample: Callable[[Sample], None] = lambda s: None,
        say: Callable[[str], None] = print) -> SoakResult:
    """Run the stack for `minutes`, sampling every `every` seconds; Ctrl-C ends it early and
    still reports what was sampled."""
    with stack(None, replicas, boot_delay, arrival_rate, simulate, say=say) as running:
        client = redis.Redis.from_url(running.redis_url)
        result = SoakResult(server=server_label(client.info("server")), replicas=replicas,
                            logdir=str(running.logdir))
        started = time.monotonic()
        processes = {c.name: c.process.pid for c in running.children}
        result.pids = processes
        try:
            while True:
                elapsed = time.monotonic() - started
                sample = take_sample(client, running.redis_url, elapsed, processes)
                result.samples.append(sample)
                on_sample(sample)
                stopped = {c.name: c.process.returncode for c in running.children
                           if not c.alive()}
                if stopped or elapsed >= minutes * 60:
                    result.exited = {n: code for n, code in stopped.items() if code is not None}
                    break
                time.sleep(min(every, max(0.0, minutes * 60 - elapsed)))
        except KeyboardInterrupt:
            say("stopped early by Ctrl-C; reporting what was sampled")
        finally:
            client.close()
    result.logs = {c.name: count_log_marks(c.log_path) for c in running.children}
    return result


def slope_per_hour(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    """The least-squares slope of a reading over the second half of the run, per hour."""
    half = [s for s in samples if s.t_s >= samples[-1].t_s / 2]
    if len(half) < 2:
        return 0.0
    mean_t = sum(s.t_s for s in half) / len(half)
    mean_v = sum(value(s) for s in half) / len(half)
    spread = sum((s.t_s - mean_t) ** 2 for s in half)
    if spread == 0:
        return 0.0
    return sum((s.t_s - mean_t) * (value(s) - mean_v) for s in half) / spread * 3600


@dataclass(frozen=True)
class Reading:
    name: str
    values: tuple[float, float, float]  # at the first sample, nearest half-way, the last
    slope_per_hour: float  # over the second half
    whole: bool  # a count, not a size in MB


def soak_summary(samples: list[Sample]) -> list[Reading]:
    """Every reading of a run: server memory, keys, each pool structure, each process's
    memory, at the start, the half and the end, with its slope over the second half."""
    last = samples[-1]
    half = min(samples, key=lambda s: abs(s.t_s - last.t_s / 2))
    readings: list[tuple[str, Callable[[Sample], float], bool]] = [
        ("server memory (MB)", lambda s: s.memory_mb, False), ("keys", lambda s: s.keys, True)]
    def size(name: str) -> Callable[[Sample], float]:
        return lambda s: s.sizes.get(name, 0)

    def resident(name: str) -> Callable[[Sample], float]:
        return lambda s: s.rss_mb.get(name, 0.0)

    readings += [(name, size(name), True) for name in last.sizes]
    readings += [(f"{name} RSS (MB)", resident(name), False) for name in last.rss_mb]
    return [Reading(name, (value(samples[0]), value(half), value(last)),
                    slope_per_hour(samples, value), whole)
            for name, value, whole in readings]
