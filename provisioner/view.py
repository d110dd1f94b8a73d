"""Reading a pool's state for people: the status view, node and user tables, invariant checks."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError, WatchError
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from provisioner import jsontext
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import (
    UNREADABLE_FINGERPRINT,
    ForecastCheck,
    ReplicaSeen,
    ScalingTotals,
    Scripts,
    Snapshot,
    as_text,
    duration_text,
    key_types,
    read_at_once,
    scripts_fingerprint,
)
from provisioner.terminal import outside, printable

T = TypeVar("T")


@dataclass
class PoolView:
    """A consistent snapshot plus the recent decisions, as shown by `provisioner status`."""

    pool: str
    now_ms: int
    snapshot: Snapshot
    decisions: list[dict[str, str]]
    replicas: list[ReplicaSeen]
    epoch: str = ""  # the pool's epoch (lua/heartbeat.lua): "<ms the state began>-<random>"
    server_ms: int | None = None  # the server's time when the epoch was read
    # "used_memory X over maxmemory Y" while a noeviction server refuses writes, else ""
    server_full: str = ""

    @property
    def state_since_ms(self) -> int | None:
        """When the pool's state began, by its epoch (None before any heartbeat, or if the
        epoch is not one the heartbeat wrote)."""
        return time_ms(self.epoch.split("-", 1)[0]) if self.epoch else None

    @property
    def state_age_s(self) -> float | None:
        """How long ago the pool's state began, by the server's clock, which stamps the epoch
        (replicas before this release stamped it with their own); None when either is
        unknown."""
        since = self.state_since_ms
        if since is None or self.server_ms is None:
            return None
        return max(0, self.server_ms - since) / 1000

    @cached_property
    def forecast_check(self) -> ForecastCheck:
        return self.snapshot.forecast_check()

    @cached_property
    def scaling(self) -> ScalingTotals:
        return self.snapshot.scaling()

    def as_dict(self) -> dict[str, Any]:
        """Everything `provisioner status --json` prints; the view renders the same dict."""
        stats = self.snapshot.stats
        connects = self.snapshot.stat("connects")
        hits, misses = self.snapshot.stat("hits"), self.snapshot.stat("misses")
        decided = hits + misses
        served = self.snapshot.stat("served_after_wait")
        return {
            "pool": self.pool,
            "counts": self.snapshot.counts,
            "connects": connects,
            "hits": hits,
            "misses": misses,
            # Over the connects decided, each a hit or a miss: `connects` repaired after a hand
            # edit begins again at 1, and read 200% beside the hits and misses (a review).
            "miss_rate": round(misses / decided, 4) if decided else 0.0,
            # None while no user has been served from the queue: a mean over none read 0.0s
            # beside users waiting a minute (an operator's walkthrough)
            "mean_wait_s": round(self.snapshot.stat("wait_ms_total") / served / 1000, 2)
            if served else None,
            "resumed": self.snapshot.stat("resumed"),
            "abandoned": self.snapshot.stat("abandoned"),
            "requeued": self.snapshot.stat("requeued"),
            "operator_releases": self.snapshot.stat("operator_releases"),
            "operator_drains": self.snapshot.stat("operator_drains"),
            "calls_made_again": self.snapshot.stat("calls_made_again"),
            # tries refused as run past their deadline (lua/includes/pool.lua made_again)
            "calls_late": self.snapshot.stat("calls_late"),
            "values_repaired": self.snapshot.stat("values_repaired"),
            # boots ended as stuck with none ended since they began, each raising the stuck
            # line by --boot-timeout (reap_idle.lua)
            "stuck_line_raised": self.snapshot.stat("stuck_line_raised"),
            "longest_session_s": round(self.snapshot.longest_session_s(self.now_ms), 1),
            "longest_wait_s": _rounded(self.snapshot.longest_wait_s(self.now_ms)),
            "last_decision": stats.get("last_decision", ""),
            "last_numbers": _json_object(stats.get("last_numbers", "")),
            "last_replica": stats.get("last_replica", ""),
            "forecast_check": self.forecast_check.as_dict(),
            "scaling": self.scaling.as_dict(),
            "decisions": [decision_json(entry) for entry in self.decisions],
            "replicas": [replica.as_dict() for replica in self.replicas],
            "epoch": self.epoch,
            "state_since_ms": self.state_since_ms,
            "state_age_s": _rounded(self.state_age_s),
            "server_refuses_writes": bool(self.server_full),
        }


def time_ms(value: Any) -> int | None:
    """A time in ms as the scripts write it, or None if there is none or it is not a finite
    number (an edit by hand must not stop the operator's view)."""
    try:
        number = float(as_text(value)) if value is not None else math.nan
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _json_object(raw: str) -> dict[str, Any]:
    """A JSON object the scripts wrote, or {} if it is not one (an edit by hand must not stop
    the operator's view)."""
    try:
        value = jsontext.loads_finite(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def read_view(redis: aioredis.Redis, pool: str, now_ms: int, window_ms: int,
                    recent: int = 8) -> PoolView:
    keys = PoolKeys(pool)
    scripts = Scripts(redis, keys)
    snapshot = await scripts.snapshot(now_ms, window_ms)
    entries: list[tuple[Any, dict[Any, Any]]] = await redis.xrevrange(  # type: ignore[assignment]
        keys.key("decisions"), count=recent)
    decisions = [{**{as_text(k): as_text(v) for k, v in fields.items()}, "id": as_text(entry_id)}
                 for entry_id, fields in entries]
    replicas, epoch, server_ms = await scripts.replicas_and_epoch()
    return PoolView(pool, now_ms, snapshot, decisions, replicas, epoch, server_ms,
                    await server_full(redis))


async def server_full(redis: aioredis.Redis) -> str:
    """What a server at its maxmemory under noeviction says of it, "" when it is not (or
    INFO is refused): it refuses every write then, the replicas' heartbeats with them, so
    replicas that run read silent (an operator's drill: "replicas 0: none heard from" and
    nothing of the server). Any failure of INFO alone is "": a proxy that lacks it and closes
    the connection (twemproxy's way) failed the whole `status`, which worked before."""
    try:
        memory = await redis.info("memory")
        limit = int(memory.get("maxmemory", 0) or 0)
        used = int(memory.get("used_memory", 0) or 0) - int(
            memory.get("mem_not_counted_for_evict", 0) or 0)
    except (RedisError, OSError, ValueError, TypeError):
        return ""
    if limit <= 0 or used <= limit or memory.get("maxmemory_policy") != "noeviction":
        return ""
    return f"used_memory {used} over maxmemory {limit}"


def render_view(view: PoolView) -> Group:
    data = view.as_dict()
    c = data["counts"]
    creating = max(0, c["pending"] - c["unclaimed"])
    nodes = Table.grid(padding=(0, 2))
    nodes.add_row(*(Text(f"{label} {value}", style=style) for label, value, style in (
        ("ready", c["ready"], "green"), ("booting", c["booting"], "yellow"),
        ("creating", creating, "yellow"), ("allocated", c["allocated"], "cyan"),
        ("terminating", c["terminating"], "magenta"))))
    users = Table.grid(padding=(0, 2))
    users.add_row(
        Text(f"active {c['active']}"), Text(f"engaged {c['engaged']}"),
        Text(f"waiting {c['waiting']}", style="red" if c["waiting"] else ""),
        Text(f"connected {c['allocated']}", style="cyan"))
    # The longest wait and session on a line of their own: beside the counts they wrapped at
    # 80 columns ("1h" and "1m" on two lines).
    longest = Text()
    if c["waiting"]:
        wait = data["longest_wait_s"]
        longest.append("longest wait " + ("unknown" if wait is None else duration_text(wait)),
                       style="red")
    if c["allocated"]:
        longest.append(("  " if longest else "")
                       + f"longest session {duration_text(data['longest_session_s'])}")
    outcomes = Text(
        f"connects {data['connects']}  hits {data['hits']}  misses {data['misses']} "
        f"(miss rate {data['miss_rate'] * 100:.1f}%)  mean wait in the queue "
        + ("-" if data["mean_wait_s"] is None else f"{data['mean_wait_s']:.1f}s")
        + (f"  resumed {data['resumed']}" if data["resumed"] else "")
        + f"  abandoned {data['abandoned']}  "
        f"requeued {data['requeued']}" + (
            f"  released by an operator {data['operator_releases']}"
            if data["operator_releases"] else "") + (
            f"  drains by an operator {data['operator_drains']}"
            if data["operator_drains"] else "") + (
            f"  made again after a lost reply {data['calls_made_again']}"
            if data["calls_made_again"] else "") + (
            f"  tries refused as late {data['calls_late']}" if data["calls_late"] else ""))
    if data["stuck_line_raised"]:
        outcomes.append(f"\nboots ended as stuck with none ended since they began "
                        f"{data['stuck_line_raised']}, each raising the stuck line by "
                        "--boot-timeout: do boots outlast it?", style="yellow")
    if data["values_repaired"]:
        outcomes.append(f"\nvalues repaired {data['values_repaired']} (not numbers where one "
                        "belongs: edited by hand, or another writer uses the pool's keys)",
                        style="red")
    decisions = Table(title="recent decisions: scaling, misses, operators' drains and releases",
                      expand=True, show_edge=False)
    for column in ("age", "replica", "kind", "reason"):
        decisions.add_column(column, overflow="fold")
    for entry in view.decisions:
        at_ms = time_ms(entry.get("now"))
        # by the replica's clock against the server's, read before the entries: one a little
        # ahead (a decision written meanwhile, a clock within its tolerance) is 0s, not "-1s"
        age = "-" if at_ms is None else f"{max(0, view.now_ms - at_ms) / 1000:.0f}s"
        # Text, not markup: a replica id or an operator's name may hold "[/b]", or a
        # terminal's escape sequences
        decisions.add_row(age, *(outside(entry.get(field, ""))
                                 for field in ("replica", "kind", "reason")))
    last = outside(f"last decision ({data['last_replica'] or '-'}): "
                   f"{data['last_decision'] or 'none yet'}")
    running = [r for r in view.replicas if not r.silent]
    silent = [r for r in view.replicas if r.silent]
    replicas = outside(f"replicas {len(running)}: "
                       + (", ".join(r.describe() for r in running) or "none heard from"))
    if silent:
        replicas.append(printable("; " + ", ".join(r.describe() for r in silent)), style="red")
    if view.server_full:
        replicas.append(f"; the Redis server is out of memory ({view.server_full}, "
                        "noeviction): it refuses every write, the replicas' heartbeats, "
                        "ticks and events too, so a replica still running reads silent here "
                        "and the pool stands still", style="red")
    releases = scripts_releases(running)
    if releases:
        replicas.append(printable("; " + releases), style="red")
    split = settings_split(running)
    if split:
        replicas.append(printable("; " + split), style="red")
    state_age = view.state_age_s
    if state_age is not None:
        # a state younger than its replicas' run was lost and begun again
        replicas.append(f"; the pool's state began {duration_text(state_age)} ago")
    hold = Text()
    if c.get("spare_held_ms") or c.get("spare_held"):
        lease = ("with no lease (written by hand: held until `provisioner replace --cancel` "
                 "lets go)" if c["spare_held_ms"] < 0 else
                 f"its lease {c['spare_held_ms'] / 1000:.0f}s unless renewed (`provisioner "
                 "replace --cancel` lets go)")
        held = (f"{c['spare_held']} spare node(s) held above the keep level" if c["spare_held"]
                else "no spare held (its last batch gone)")
        hold.append(f"replace under way: {held}, {lease}", style="yellow")
    check = Text("\n".join(view.forecast_check.describe_parts()))
    scaling = Text(view.scaling.describe())
    return Group(
        Panel(Group(Text("nodes", style="bold"), nodes, Text("users", style="bold"), users,
                    *([longest] if longest else []), outcomes, replicas,
                    *([hold] if hold else []), check, scaling, last),
              title=f"pool {view.pool}"),
        decisions)


def scripts_releases(running: list[ReplicaSeen]) -> str | None:
    """Which running replica runs which release of the scripts, when they are not all one
    (an upgrade left half done, or a replica of another build); None when they agree."""
    by_release: dict[str | None, list[str]] = {}
    for replica in running:
        by_release.setdefault(replica.scripts, []).append(replica.replica_id)
    if len(by_release) < 2:
        return None
    parts = [f"{fingerprint or 'none said, a release before the fingerprint'}: "
             f"{', '.join(ids)}"
             for fingerprint, ids in sorted(by_release.items(), key=lambda kv: kv[0] or "")]
    return f"{len(by_release)} releases of the scripts run ({' / '.join(parts)})"


def settings_split(running: list[ReplicaSeen]) -> str | None:
    """Which running replica runs which pool settings, when those that say theirs do not all
    run one: the replica whose tick fires first decides with its own, so the pool's limits
    and buffer are whichever's that is (a drill: --max-nodes 5 beside 50, and nothing said
    so); None when they agree."""
    by_settings: dict[str, list[str]] = {}
    for replica in running:
        if replica.settings is not None:
            by_settings.setdefault(replica.settings, []).append(replica.replica_id)
    if len(by_settings) < 2:
        return None
    parts = [f"{digest}: {', '.join(ids)}" for digest, ids in sorted(by_settings.items())]
    return (f"{len(by_settings)} sets of pool settings run ({' / '.join(parts)}): every "
            "replica of a pool should run the same; the one whose tick fires first decides")


def other_release(replicas: list[ReplicaSeen]) -> str | None:
    """The releases of the scripts the pool's running replicas run, when they say theirs and
    none runs this process's (an operator's CLI of another release); None otherwise."""
    theirs = sorted({r.scripts for r in replicas if not r.silent and r.scripts
                     and r.scripts != UNREADABLE_FINGERPRINT})
    if not theirs or scripts_fingerprint() in theirs:
        return None
    return ", ".join(theirs)


async def table_sizes(redis: aioredis.Redis, pool: str) -> tuple[int, int, int]:
    """How many live nodes, waiting users and sessions the pool holds, read at once: what a
    table `--limit` cut short counts beside the rows it shows."""
    keys = PoolKeys(pool)
    def reads(pipe: Any) -> None:
        pipe.zcard(keys.key("nodes"))
        pipe.hlen(keys.key("waiting_since"))
        pipe.hlen(keys.key("alloc"))

    nodes, waiting, sessions = await read_at_once(redis, reads)
    return int(nodes), int(waiting), int(sessions)


async def node_rows(redis: aioredis.Redis, pool: str, limit: int = 200) -> list[dict[str, str]]:
    keys = PoolKeys(pool)
    # The ids under WATCH and the records in the transaction that proves the ids unchanged:
    # read one after the other, a node terminated between them was listed with its tombstone.
    return await _at_one_instant(lambda watched: _node_rows_once(redis, keys, limit, watched))


async def _at_one_instant(once: Callable[[bool], Awaitable[T]], attempts: int = 50,
                          exhausted: Callable[[], T] | None = None) -> T:
    """`once(True)`, a read under WATCH whose transaction fails (WatchError) if a script
    changed what it watched, again until one holds. On a server out of memory, which refuses
    the transaction (and every script's writes with it), `once(False)`: the same reads with no
    transaction; after `attempts`, `exhausted()`, or those reads too where it is None."""
    for _ in range(attempts):
        try:
            return await once(True)
        except WatchError:
            continue
        except OutOfMemoryError:
            return await once(False)
    return exhausted() if exhausted is not None else await once(False)


async def _node_rows_once(redis: aioredis.Redis, keys: PoolKeys, limit: int,
                          watched: bool = True) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=watched) as pipe:
        if watched:
            await pipe.watch(keys.key("nodes"))
        reader: Any = pipe if watched else redis  # under WATCH a pipeline reads at once
        ids = [as_text(i) for i in await reader.zrange(keys.key("nodes"), 0, limit - 1)]
        if watched:
            pipe.multi()  # type: ignore[no-untyped-call]
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        records = await pipe.execute()
    return [{as_text(k): as_text(v) for k, v in record.items()} for record in records]


@dataclass(frozen=True)
class Session:
    """A user holding a node: since when, and when the user was last active (None when no
    activity of theirs is in the window)."""

    user: str
    node: str
    allocated_ms: int | None
    last_activity_ms: int | None


async def waiting_users(redis: aioredis.Redis, keys: PoolKeys, limit: int = 0) -> list[str]:
    """The waiting users, first served first (`limit` of them, or all at 0). The queue is a
    sorted set by place in line; a pool no writing script has run on since the upgrade still
    keeps it as the list it was (lua/includes/keys.lua LEGACY_TYPES), read as that."""
    key = keys.key("waiting")
    as_list = as_text(await redis.type(key)) == "list"
    try:
        return await _queue(redis, key, as_list, limit)
    except ResponseError as e:
        if "WRONGTYPE" not in str(e):
            raise
        # converted by a script between the TYPE and the read (once, at the upgrade)
        return await _queue(redis, key, not as_list, limit)


async def _queue(redis: aioredis.Redis, key: str, as_list: bool, limit: int) -> list[str]:
    found = await (redis.lrange(key, 0, limit - 1) if as_list else redis.zrange(key, 0, limit - 1))
    return [as_text(u) for u in found]


async def user_rows(redis: aioredis.Redis, pool: str,
                    limit: int = 200) -> tuple[list[tuple[str, int | None]], list[Session]]:
    """(waiting users with the ms they started waiting, first served first, None where that
    is not found (an id that is not UTF-8, shown replaced); users holding a node,
    the longest session first). Reads every allocation to sort them, so it is for an
    operator's command, not a hot path."""
    keys = PoolKeys(pool)
    # The queue and the sessions under WATCH: read one after another, a user served between
    # the reads was listed both waiting (for an unknown time) and connected.
    return await _at_one_instant(lambda watched: _user_rows_once(redis, keys, limit, watched))


async def _user_rows_once(redis: aioredis.Redis, keys: PoolKeys, limit: int,
                          watched: bool = True
                          ) -> tuple[list[tuple[str, int | None]], list[Session]]:
    async with redis.pipeline(transaction=watched) as pipe:
        if watched:
            await pipe.watch(keys.key("waiting"), keys.key("waiting_since"), keys.key("alloc"))
        reader: Any = pipe if watched else redis  # under WATCH a pipeline reads at once
        waiting = await waiting_users(reader, keys, limit)
        since = await reader.hmget(keys.key("waiting_since"), waiting) if waiting else []
        held = [(as_text(u), as_text(n))
                for u, n in (await reader.hgetall(keys.key("alloc"))).items()]
        if watched:
            pipe.multi()  # type: ignore[no-untyped-call]
        for user, node in held:
            pipe.hget(keys.node(node), "allocated_ms")
            pipe.zscore(keys.key("active"), user)
        replies = await pipe.execute()

    sessions = [Session(user, node, time_ms(started), time_ms(active))
                for (user, node), started, active in zip(held, replies[::2], replies[1::2],
                                                         strict=True)]
    sessions.sort(key=lambda s: (s.allocated_ms is not None, s.allocated_ms or 0, s.user))
    return ([(u, time_ms(s)) for u, s in zip(waiting, since, strict=True)], sessions[:limit])


#: The kinds of entry the decisions stream holds (lua/includes/keys.lua, log_entry).
DECISION_KINDS = ("scale_up", "scale_down", "miss", "release", "drain")


@dataclass(frozen=True)
class DecisionSpan:
    """Entries of the decisions stream written within a span of the server's time, oldest
    first, each with its stream `id`; whether `limit` left some out; and the span the stream
    still holds (the first and last entry's ms, None when empty) with its length, for a span
    that finds nothing because the stream no longer keeps it."""

    entries: list[dict[str, str]]
    more: bool
    held: tuple[int, int] | None
    length: int


def decision_json(entry: dict[str, str]) -> dict[str, Any]:
    """An entry for JSON, alike in `status --json` and `decisions --json`: its times and count
    as numbers, its numbers as the object they are (the text it is where a hand edit left no
    JSON)."""
    shown: dict[str, Any] = dict(entry)
    shown["written_ms"] = written_ms(entry["id"])
    for name in ("now", "acted", "decided_ms"):
        if name in entry:
            shown[name] = time_ms(entry[name]) if entry[name] else None
    try:
        numbers = jsontext.loads_finite(entry.get("numbers") or "{}")
    except ValueError:
        return shown
    shown["numbers"] = numbers
    return shown


def written_ms(entry_id: str) -> int:
    """When the server wrote a stream entry: the ms of its id (`1764929000123-0`)."""
    return int(entry_id.partition("-")[0])


async def decision_rows(redis: aioredis.Redis, pool: str, start_ms: int | None,
                        end_ms: int | None, kinds: frozenset[str], limit: int,
                        user: str | None = None, page: int = 500) -> DecisionSpan:
    """The entries of kinds `kinds` (every kind if empty), and about `user` if given (its
    misses and operators' releases, whose reasons begin `user ID `), the server wrote from
    `start_ms` to `end_ms` (ms, either open): the first `limit` from the start where one is
    given, else the last `limit` before the end. Reads the span a page at a time, the stream's
    own order, until `limit` are found: O(log n + the entries read)."""
    key = PoolKeys(pool).key("decisions")
    low = "-" if start_ms is None else str(start_ms)
    high = "+" if end_ms is None else str(end_ms)
    forward = start_ms is not None
    found: list[dict[str, str]] = []
    more = False
    while True:
        got: list[tuple[Any, dict[Any, Any]]] = await (  # type: ignore[assignment]
            redis.xrange(key, low, high, count=page) if forward
            else redis.xrevrange(key, high, low, count=page))
        for entry_id, fields in got:
            entry = {as_text(k): as_text(v) for k, v in fields.items()}
            if kinds and entry.get("kind") not in kinds:
                continue
            if user is not None and not entry.get("reason", "").startswith(f"user {user} "):
                continue
            if len(found) == limit:
                more = True
                break
            found.append({**entry, "id": as_text(entry_id)})  # a field `id` edited in: not it
        if more or len(got) < page:
            break
        last = as_text(got[-1][0])  # the next page begins after it (an exclusive bound)
        if forward:
            low = f"({last}"
        else:
            high = f"({last}"
    def reads(pipe: Any) -> None:  # one round trip, one moment
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
        pipe.xlen(key)

    first, newest, length = await read_at_once(redis, reads)
    held = (written_ms(as_text(first[0][0])), written_ms(as_text(newest[0][0]))) \
        if first and newest else None
    return DecisionSpan(found if forward else found[::-1], more, held, int(length))


async def pool_exists(redis: aioredis.Redis, pool: str) -> bool:
    """Whether the server holds any state of `pool`: its published settings, its epoch, its
    counters, its nodes, its replicas or its model (a running pool has them all, a pool that
    has seen any event or tick some). An empty pool and a misspelt name look the same
    otherwise."""
    keys = PoolKeys(pool)
    names = [keys.config] + [keys.key(name) for name in
                             ("epoch", "stats", "nodes", "replicas", "active", "alloc", "model")]
    return bool(await redis.exists(*names))


async def wrong_types(redis: aioredis.Redis, keys: PoolKeys) -> list[str]:
    """The pool keys that hold another type than the scripts keep there (only a hand or
    another writer puts one), named as the scripts name them when they refuse every
    transition for it (lua/includes/keys.lua); empty when none does. One TYPE each."""
    # The settings' hash is the replicas' alone (no script reads it), and as needed: without
    # it a replica cannot start, nor `status` or `model show` read the pool (a review: `check`
    # said all was well while every one of them failed on it).
    expected = {keys.key(name): kinds for name, kinds in key_types().items()}
    expected[keys.config] = frozenset({"hash"})
    async with redis.pipeline(transaction=False) as pipe:
        for key in expected:
            pipe.type(key)
        found = [as_text(kind) for kind in await pipe.execute()]
    return [f"pool key {key} holds a {kind}, not a {' or a '.join(sorted(kinds))} "
            "(an edit by hand?): "
            + ("no replica can start, nor `status` read the pool, until it is deleted (every "
               "replica writes it again)" if key == keys.config else
               "every script that writes is refused until it is repaired (deleted, or given "
               "back what it held)")
            for (key, kinds), kind in zip(expected.items(), found, strict=True)
            if kind != "none" and kind not in kinds]


async def check_invariants(redis: aioredis.Redis, pool: str, attempts: int = 50) -> list[str]:
    """Everything that must hold between scripts; an empty list when the pool is consistent.
    A key of another type than its own is reported alone: the rest cannot be read through it.

    The pool is read under WATCH and the read is thrown away and retried if any script changed
    it meanwhile, so a problem reported is one that held at a single instant, never an artefact
    of reading one key before a transition and the next after it. Reads the whole pool, so it is
    for tests and for an operator's `provisioner check`, not for a hot path.
    """
    keys = PoolKeys(pool)
    broken = await wrong_types(redis, keys)
    if broken:
        return broken
    return await _at_one_instant(
        lambda watched: _check_once(redis, keys, watched), attempts,
        lambda: [f"the pool changed during each of {attempts} reads; no consistent view to "
                 "check"])


async def _check_once(redis: aioredis.Redis, keys: PoolKeys, watched: bool = True) -> list[str]:
    """One read of the pool: the structures under WATCH, then every node record inside the
    MULTI/EXEC that proves none of them changed (WatchError when one did). Not `watched`: the
    same reads with no transaction, for a server out of memory, which refuses it (and every
    script's writes, so the pool stands still)."""
    async with redis.pipeline(transaction=watched) as pipe:
        names = ("ready", "waiting", "waiting_since", "alloc", "nodes", "booting", "terminating",
                 "sessions", "drains")
        if watched:
            await pipe.watch(*(keys.key(n) for n in names))
        reader: Any = pipe if watched else redis  # under WATCH a pipeline reads at once
        ready = [as_text(x) for x in await reader.lrange(keys.key("ready"), 0, -1)]
        waiting = await waiting_users(reader, keys)
        since = {as_text(k): as_text(v)
                 for k, v in (await reader.hgetall(keys.key("waiting_since"))).items()}
        alloc = {as_text(k): as_text(v)
                 for k, v in (await reader.hgetall(keys.key("alloc"))).items()}
        nodes = sorted({as_text(x) for x in await reader.zrange(keys.key("nodes"), 0, -1)})
        booting = {as_text(x) for x in await reader.zrange(keys.key("booting"), 0, -1)}
        terminating = {as_text(x) for x in await reader.zrange(keys.key("terminating"), 0, -1)}
        sessions = {as_text(x) for x in await reader.zrange(keys.key("sessions"), 0, -1)}
        drains = {as_text(x) for x in await reader.zrange(keys.key("drains"), 0, -1)}
        if watched:
            if nodes:
                await pipe.watch(*(keys.node(n) for n in nodes))
            pipe.multi()  # type: ignore[no-untyped-call]
        for node in nodes:
            pipe.hgetall(keys.node(node))
        # A record of another type is named, not raised: its WRONGTYPE stopped `check` with
        # exit 2 and a hint to run `check` (a review).
        replies = await pipe.execute(raise_on_error=False)
    wrong = [node for node, raw in zip(nodes, replies, strict=True)
             if isinstance(raw, ResponseError) and str(raw).startswith("WRONGTYPE")]
    if wrong:
        async with redis.pipeline(transaction=False) as pipe:
            for node in wrong:
                pipe.type(keys.node(node))
            kinds = [as_text(kind) for kind in await pipe.execute()]
        return [f"node record {keys.node(node)} holds a {kind}, not a hash (an edit by hand?): "
                "every script that reads it is refused until it is repaired (deleted, or given "
                "back what it held)"
                for node, kind in zip(wrong, kinds, strict=True)]
    for raw in replies:
        if isinstance(raw, Exception):
            raise raw
    records = {node: {as_text(k): as_text(v) for k, v in raw.items()}
               for node, raw in zip(nodes, replies, strict=True)}
    return _problems(ready, waiting, since, alloc, set(nodes), booting, terminating, records,
                     sessions, drains)


def _apart(a_name: str, a: set[str], b_name: str, b: set[str]) -> str:
    """What two sets that should be equal hold apart, not the whole of each (a pool of
    thousands would print thousands to show one stray id)."""
    def some(ids: set[str]) -> str:
        shown = sorted(ids)[:10]
        return repr(shown)[:-1] + (f", ... {len(ids) - 10} more]" if len(ids) > 10 else "]")

    parts = [f"{what}: {some(ids)}" for what, ids in
             ((f"in {a_name}, not {b_name}", a - b), (f"in {b_name}, not {a_name}", b - a)) if ids]
    return "; ".join(parts)


def _duplicates(items: list[str]) -> list[str]:
    return sorted(item for item, n in Counter(items).items() if n > 1)


def _problems(ready: list[str], waiting: list[str], since: dict[str, str],
              alloc: dict[str, str], nodes: set[str], booting: set[str],
              terminating: set[str], records: dict[str, dict[str, str]],
              sessions: set[str], drains: set[str]) -> list[str]:
    problems: list[str] = []
    if len(ready) != len(set(ready)):
        problems.append(f"ready list has duplicates: {_duplicates(ready)}")
    if len(waiting) != len(set(waiting)):
        problems.append(f"waiting queue has duplicates: {_duplicates(waiting)}")
    if set(waiting) != set(since):
        problems.append("waiting users apart: "
                        + _apart("the waiting queue", set(waiting), "waiting_since", set(since)))
    if ready and waiting:
        problems.append(f"users wait ({len(waiting)}) while nodes are ready ({len(ready)})")
    holders: dict[str, str] = {}
    for user, node in alloc.items():
        if node in holders:
            problems.append(f"node {node} held by {holders[node]} and {user}")
        holders[node] = user
        if user in since:
            problems.append(f"user {user} both waits and holds {node}")
    if sessions != set(alloc):
        problems.append("sessions apart: " + _apart("sessions", sessions, "alloc", set(alloc))
                        + " (a session begun before the sessions key existed is listed until "
                        "it ends)")
    groups = {"ready": set(ready), "booting": booting, "terminating": terminating,
              "allocated": set(alloc.values())}
    for name, members in groups.items():
        for other, other_members in groups.items():
            if name < other and members & other_members:
                problems.append(f"nodes both {name} and {other}: {members & other_members}")
    union = set().union(*groups.values())
    if union != nodes:
        problems.append("live nodes apart: "
                        + _apart("the nodes set", nodes, "any state's structure", union))
    for node in sorted(nodes):
        record = records.get(node, {})
        state = record.get("state")
        expected = next((name for name, members in groups.items() if node in members), None)
        if state != expected:
            problems.append(f"node {node} record says {state}, structures say {expected}")
        if state == "allocated" and alloc.get(record.get("user", "")) != node:
            problems.append(f"node {node} names user {record.get('user')} who does not hold it")
        if state == "allocated" and "drain_by" in record and node not in drains:
            # A member left over is harmless (not counted, dropped at the next tick); a mark
            # missing makes the forecast count a free the session's end will not bring.
            problems.append(f"node {node} drained in its session is not in drains (the "
                            "forecast counts a free from it)")
    return problems


def config_from_redis(raw: dict[Any, Any]) -> tuple[PoolConfig | None, list[str]]:
    """The pool settings the replicas last published (None if none did), and what in them
    could not be used. Another writer may have left anything there: a value that does not
    parse, or is out of its range, is left at its default; settings that are invalid together
    give the defaults."""
    if not raw:
        return None, []
    defaults = PoolConfig()
    fields = PoolConfig.__dataclass_fields__
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        name = as_text(key)
        if name not in fields:
            continue
        text = as_text(value)
        kind = type(getattr(defaults, name))
        try:
            parsed = kind(float(text)) if kind is int else kind(text)
        except (ValueError, OverflowError):
            problems.append(f"{name} {text[:40]!r} is not a number")
            continue
        if kind is int and parsed != float(text):  # "2.5" is no count; "30.0" is 30
            problems.append(f"{name} {text[:40]!r} is not a whole number")
            continue
        wrong = replace(defaults, **{name: parsed}).problems()
        if wrong:
            problems.append(f"{name} {text[:40]!r}: {wrong[0]}")
            continue
        values[name] = parsed
    config = PoolConfig(**values)
    together = config.problems()
    if together:
        return defaults, [*problems, *together]
    return config, problems


def render_model(pool: str, shown: dict[str, Any]) -> Group:
    """`provisioner model show`: lua/model_view.lua's reading of the pool's model."""
    horizon = shown["horizon_s"]
    if shown["learned"]:
        boot = (f"{shown['lead_s']:.0f} s, learned from {shown['boots']:.0f} boots"
                if shown["boot_learned"] else f"{shown['lead_s']:.0f} s, the prior")
        head = Text(
            f"boot lead time {boot}; mean session {shown['session_mean_s'] / 60:.1f} min "
            f"({shown['releases']:.1f} releases, decayed); long-run arrivals "
            f"{shown['arrivals_per_min']:.2f} a minute (over a full memory of "
            f"{shown['memory_min']:.0f} min: low while the pool is younger); users not browsing "
            "yet bring "
            f"{shown['not_browsing_per_horizon']:.3f} connects per {horizon:.0f} s")
    else:
        head = Text(f"pool {pool} has learned nothing yet: every figure below is the prior",
                    style="yellow")
    table = Table(title=f"chance of a connect within {horizon:.0f} s (priors included), by "
                  "requests in the window and time since first seen",
                  caption="each cell: the chance, and the decayed user-minutes it was learned "
                  "from")
    ages = sorted({(c["age_from_s"], c["age_to_s"]) for c in shown["cells"]},
                  key=lambda a: a[0])
    table.add_column("requests")
    for lo, hi in ages:
        table.add_column(f"{lo:.0f}-{hi:.0f} s" if hi is not None else f"{lo:.0f} s+",
                         justify="right")
    levels = sorted({c["level"] for c in shown["cells"]})
    for level, above in zip(levels, [*levels[1:], None], strict=True):
        label = f"{level}+" if above is None else (
            str(level) if above == level + 1 else f"{level}-{above - 1}")
        row = [label]
        for lo, _ in ages:
            cell = next(c for c in shown["cells"]
                        if c["level"] == level and c["age_from_s"] == lo)
            row.append(f"{100 * cell['chance']:.1f}%, {cell['exposure_s'] / 60:.0f} min")
        table.add_row(*row)
    return Group(head, table)
