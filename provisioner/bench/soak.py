"""`bench soak`: the local stack under steady traffic for a long while, sampled as it runs.

The tests and the replays say each transition is right; they do not say the state stays
bounded when the service runs for hours. This starts what `make run` starts (a private server,
the mock Node API, N replicas, the simulator) with no view, and every `every` seconds records
what would grow if something leaked: the server's memory and key count, the size of every
structure of the pool, the per-user and per-node keys, each process's resident memory, and
whether the pool's invariants hold (`view.check_invariants`, as `provisioner check`). At the end
it counts the tracebacks, errors and warnings in every process's log and names any process
that stopped early. Each sample also sets the nodes the Node API runs against the nodes the pool
knows: a node that one of them has and the other lacks for longer than reconciliation takes to
notice (`LASTING_S`) is one the pool pays for without using, or one it counts on that is gone.
With `kill_every`, a replica is killed (SIGKILL, as a crash) and started again that often, in
turn, so the same checks run across crashes in the middle of transitions. With
`refuse_writes`, the server refuses every write for a while (`CONFIG SET maxmemory 1`, as a
server out of memory does), and the run reports the events each replica dropped meanwhile
(its `provisioner_errors_total{where="event"}` at the end; a replica killed and started again
counts from its restart).

What it reports is growth, not a verdict on it: the first half of a run fills the pool's
windows and the model, so a leak shows as a slope over the second half. The run fails (exit 1)
only on what is wrong whatever the figures: a process that stopped, an invariant broken, a
traceback in a log, a node the API and the pool disagree on for `LASTING_S`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis

from provisioner import view
from provisioner.config import RECONCILE_INTERVAL_S
from provisioner.devstack import Child, stack
from provisioner.keys import POOL_KEY_ORDER, PoolKeys
from provisioner.redis_server import server_label

POOL = "default"
#: The pool's entries that are key prefixes, not keys (their keys are counted by a SCAN).
PREFIXES = {"node_prefix": "node", "acts_prefix": "acts", "seen_prefix": "seen"}
#: What `check_invariants` says when writers kept changing the pool under every read: the
#: check did not run, nothing was found broken.
UNCHECKED = "the pool changed during each of"
STATS = ("connects", "hits", "misses", "activities", "releases")
#: How long the API and the pool may disagree on a node: a create's answer or a status can be
#: lost (a replica killed between the request and the script), and reconciliation, every
#: `reconcile_interval_s` (30 s by default), repairs it; twice that, and it was not repaired.
LASTING_S = 2 * RECONCILE_INTERVAL_S
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
    api_nodes: int = -1  # nodes the Node API runs (booting, ready, terminating); -1: no answer
    unknown_to_pool: list[str] = field(default_factory=list)  # the API runs them; pool lacks
    unknown_to_api: list[str] = field(default_factory=list)  # the pool has them; API does not


@dataclass
class SoakResult:
    server: str
    replicas: int
    samples: list[Sample] = field(default_factory=list)
    exited: dict[str, int] = field(default_factory=dict)  # process -> exit code, if it stopped
    logs: dict[str, dict[str, int]] = field(default_factory=dict)  # process -> mark -> lines
    logdir: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # process -> its last pid
    kills: int = 0  # replicas killed and started again
    refused: list[float] = field(default_factory=list)  # when writes were refused: from, to (s)
    dropped: dict[str, int] = field(default_factory=dict)  # replica -> events it dropped
    replicas_from: str = ""  # the checkout the replicas ran from, if not this one

    def lasting_disagreements(self) -> list[str]:
        """Nodes the API and the pool disagreed on for `LASTING_S` or longer."""
        first: dict[tuple[str, str], float] = {}
        lasting: dict[tuple[str, str], float] = {}
        for sample in self.samples:
            now = {("pool", n) for n in sample.unknown_to_pool}
            now |= {("API", n) for n in sample.unknown_to_api}
            first = {k: first.get(k, sample.t_s) for k in now}
            lasting.update((k, sample.t_s - t) for k, t in first.items()
                           if sample.t_s - t >= LASTING_S)
        return [f"node {node} unknown to the {side} for {seconds:.0f} s"
                for (side, node), seconds in sorted(lasting.items())]

    @property
    def broken(self) -> list[Sample]:
        """The samples in which an invariant was broken."""
        return [s for s in self.samples if s.problems]

    @property
    def disagreed(self) -> list[Sample]:
        """The samples in which the API and the pool disagreed on a node (for any time)."""
        return [s for s in self.samples if s.unknown_to_pool or s.unknown_to_api]

    @property
    def failed(self) -> list[str]:
        """What is wrong whatever the figures: stopped processes, broken invariants,
        tracebacks, nodes the API and the pool lastingly disagree on."""
        wrong = [f"{name} stopped (exit {code})" for name, code in self.exited.items()]
        broken = self.broken
        if broken:
            wrong.append(f"invariants broken in {len(broken)} of {len(self.samples)} samples, "
                         f"first at {broken[0].t_s:.0f} s: {broken[0].problems[0]}")
        wrong += [f"{name}: {marks['traceback']} traceback(s) in its log"
                  for name, marks in self.logs.items() if marks.get("traceback")]
        wrong += self.lasting_disagreements()
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
    per-node keys there are (one SCAN of the database; `other` counts keys outside the pool).
    `client` decodes responses."""
    names = [n for n in POOL_KEY_ORDER if n not in PREFIXES]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.type(keys.key(name))
    types = pipe.execute()
    length = {"list": pipe.llen, "hash": pipe.hlen, "zset": pipe.zcard, "stream": pipe.xlen,
              "set": pipe.scard}
    measured = []
    for name, kind in zip(names, types, strict=True):
        if kind in length:
            length[kind](keys.key(name))
            measured.append(name)
    sizes = dict(zip(measured, (int(n) for n in pipe.execute()), strict=True))
    prefixes = {keys.key(prefix): label for prefix, label in PREFIXES.items()}
    counted: Counter[str] = Counter({label: 0 for label in PREFIXES.values()})
    for name in client.scan_iter(count=1000):
        label = next((lb for pre, lb in prefixes.items() if name.startswith(pre)), None)
        if label is None and not name.startswith(keys.base):
            label = "other"
        if label:
            counted[label] += 1
    sizes.update({f"{label} keys": n for label, n in counted.items()})
    return sizes


def api_node_ids(api_url: str) -> set[str] | None:
    """The nodes the Node API runs (all but the terminated), or None if it did not answer."""
    try:
        answer = httpx.get(f"{api_url}/api/nodes", timeout=5.0)
        answer.raise_for_status()
        return {n["id"] for n in answer.json()["nodes"] if n["state"] != "terminated"}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def take_sample(client: redis.Redis, check: Callable[[], list[str]], api_url: str, t_s: float,
                processes: dict[str, int]) -> Sample:
    """One reading; `check` runs the invariants' check (`view.check_invariants`)."""
    keys = PoolKeys(POOL)
    api = api_node_ids(api_url)
    known = {str(m) for name in ("nodes", "unclaimed")
             for m in client.zrange(keys.key(name), 0, -1)}
    memory = client.info("memory")
    raw_stats = client.hgetall(keys.key("stats"))
    stats = {}
    for field_name in STATS:
        value = str(raw_stats.get(field_name, "0"))
        stats[field_name] = int(value) if value.isdigit() else -1
    problems = check()
    checked = not (problems and problems[0].startswith(UNCHECKED))
    resident = {"server": int(memory["used_memory_rss"]) / 2**20}
    resident.update((name, mb) for name, pid in processes.items()
                    if (mb := rss_mb(pid)) is not None)
    return Sample(t_s=t_s, memory_mb=int(memory["used_memory"]) / 2**20,
                  keys=int(client.dbsize()), sizes=pool_sizes(client, keys), rss_mb=resident,
                  stats=stats, problems=problems if checked else [], checked=checked,
                  api_nodes=-1 if api is None else len(api),
                  unknown_to_pool=[] if api is None else sorted(api - known),
                  unknown_to_api=[] if api is None else sorted(known - api))


def count_log_marks(path: Path) -> dict[str, int]:
    counts = dict.fromkeys(LOG_MARKS, 0)
    with path.open(errors="replace") as log:
        for line in log:
            for mark, text in LOG_MARKS.items():
                if text in line:
                    counts[mark] += 1
    return counts


def replica_metrics(port: int) -> str | None:
    """A replica's /metrics text on this host, or None if it did not answer."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
        answer.raise_for_status()
    except httpx.HTTPError:
        return None
    return answer.text


def events_dropped(port: int) -> int | None:
    """The events a replica dropped (`provisioner_errors_total{where="event"}` on its
    /metrics), or None if it did not answer."""
    text = replica_metrics(port)
    if text is None:
        return None
    found = re.search(r'^provisioner_errors_total\{where="event"\} (\S+)$', text, re.M)
    return int(float(found[1])) if found else 0


class _Refusal:
    """The server's refusal of writes over `[at, at + seconds)` of the run: `CONFIG SET
    maxmemory 1`, then the value it had."""

    def __init__(self, client: redis.Redis, at: float, seconds: float, started: float) -> None:
        self.client = client
        self.starts = started + at if seconds > 0 else float("inf")
        self.ends = self.starts + seconds
        self.before: str | None = None
        self.started = started
        self.spans: list[float] = []

    def next_change(self) -> float:
        return self.starts if self.before is None else self.ends

    def turn(self, now: float) -> None:
        if self.before is None and self.starts <= now:
            # First looked at past its start (a slow sample, a restart): its full length from
            # now, not skipped when past its end, which left next_change in the past and the
            # run's loop sleeping 0 s a turn.
            self.ends = now + (self.ends - self.starts)
            self.before = str(self.client.config_get("maxmemory")["maxmemory"])
            self.client.config_set("maxmemory", 1)
            self.spans.append(now - self.started)
        elif self.before is not None and now >= self.ends:
            self.end(now)

    def end(self, now: float) -> None:
        if self.before is not None:
            self.client.config_set("maxmemory", self.before)
            self.before = None
            self.starts = self.ends = float("inf")
            self.spans.append(now - self.started)


def run(minutes: float, every: float, replicas: int, boot_delay: str, arrival_rate: float,
        simulate: list[str], kill_every: float = 0.0,
        on_sample: Callable[[Sample], None] = lambda s: None,
        say: Callable[[str], None] = print, mock: Sequence[str] = (),
        refuse_writes: tuple[float, float] = (0.0, 0.0),
        replicas_from: Path | None = None) -> SoakResult:
    """Run the stack for `minutes`, sampling every `every` seconds and, if `kill_every`, killing
    and restarting a replica that often, in turn; `mock`: further options of the mock Node API;
    `refuse_writes`: (at, seconds) of the run the server refuses writes, (0, 0) never;
    `replicas_from`: a checkout to run the replicas from. Ctrl-C ends it early and still
    reports what was sampled."""
    source = replicas_from.resolve() if replicas_from is not None else None
    with (stack(None, replicas, boot_delay, arrival_rate, simulate, say=say,
                mock=mock, replicas_from=source) as running,
          asyncio.Runner() as loop):
        client = redis.Redis.from_url(running.redis_url, decode_responses=True)
        # The check is the CLI's (async); one loop and one client serve every sample.
        async_client = aioredis.Redis.from_url(running.redis_url, decode_responses=True)

        def check() -> list[str]:
            return loop.run(view.check_invariants(async_client, POOL))

        api_url = f"http://127.0.0.1:{running.api_port}"
        result = SoakResult(server=server_label(client.info("server")), replicas=replicas,
                            logdir=str(running.logdir), replicas_from=str(source or ""))
        victims = [c for c in running.children if c.name.startswith("replica-")]
        started = next_sample = time.monotonic()
        end = started + minutes * 60
        next_kill = started + kill_every if kill_every else float("inf")
        refusal = _Refusal(client, *refuse_writes, started)
        try:
            while True:
                now = time.monotonic()
                refusal.turn(now)
                if now >= next_kill and now < end:
                    victims[result.kills % len(victims)].restart()
                    result.kills += 1
                    next_kill += kill_every
                if now >= next_sample or now >= end:
                    pids = {c.name: c.process.pid for c in running.children}
                    sample = take_sample(client, check, api_url, now - started, pids)
                    result.samples.append(sample)
                    on_sample(sample)
                    next_sample += every
                    if _stopped(running.children, result) or now >= end:
                        break
                time.sleep(max(0.0, min(next_sample, next_kill, end, refusal.next_change())
                               - time.monotonic()))
        except KeyboardInterrupt:
            say("stopped early by Ctrl-C; reporting what was sampled")
        finally:
            refusal.end(time.monotonic())
            result.refused = refusal.spans
            result.dropped = {
                victim.name: dropped for victim, port in zip(victims, running.metrics_ports,
                                                             strict=True)
                if (dropped := events_dropped(port)) is not None}
            client.close()
            loop.run(async_client.aclose())
        result.pids = {c.name: c.process.pid for c in running.children}
    result.logs = {c.name: count_log_marks(c.log_path) for c in running.children}
    return result


def _stopped(children: list[Child], result: SoakResult) -> bool:
    """Record the processes that stopped on their own (a replica killed on purpose is started
    again at once, before this looks)."""
    result.exited = {c.name: c.process.returncode for c in children
                     if not c.alive() and c.process.returncode is not None}
    return bool(result.exited)


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
