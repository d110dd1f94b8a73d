"""One stateless replica: listeners, the scaling ticker, reconciliation, and the HTTP endpoints.

Python parses, validates, calls a script and acts on what it returns (Node API calls, logs,
metrics). It keeps no pool state between events and takes no locks: every replica receives every
message, and the scripts make applying an event twice harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import secrets
import signal
import time
from collections import deque
from collections.abc import Awaitable, Coroutine, Iterable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import BusyLoadingError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioner import events, jsontext
from provisioner.clock import Clock, WallClock, server_now_ms, sleep_unless
from provisioner.config import PoolConfig, ServiceConfig, redis_client
from provisioner.events import Rejected
from provisioner.keys import PoolKeys
from provisioner.logs import RateLimitedLog, Throttle
from provisioner.metrics import Metrics
from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, HttpNodeApi, NodeApi
from provisioner.scripts import (
    CLOCK_OFFSET_WARN_S,
    ID_BYTES,
    Activity,
    ActivityResult,
    AllocateResult,
    Allocation,
    Call,
    CommandsRefused,
    Decision,
    GapJudged,
    NodeStatusOutcome,
    NodeStatusResult,
    Registration,
    Release,
    ReleaseResult,
    Scripts,
    Served,
    Termination,
    as_text,
    commands_refused,
    refused_for_now,
    scripts_fingerprint,
)

log = logging.getLogger("provisioner.service")

#: What applying one event decided: the script's result, None for a dropped message.
Outcome = ActivityResult | AllocateResult | ReleaseResult | NodeStatusResult | None

#: How long after a failed DELETE the next attempt is made.
DELETE_RETRY_MS = 10_000
#: While the Node API is down (creates unanswered or answered 5xx), the replica holds its
#: creates: after the n-th such try in a row, none for CREATE_HOLD_MS * 2**(n-1), at most
#: CREATE_HOLD_MAX_MS, then one at a time until one is answered. Without it a dead API took
#: max_batch creates a tick, three attempts each (31 a second here), and as many warnings. A
#: try is a create sent after the last failure was known: the creates of one tick failing
#: together are one try (an operator's drill: a tick's 20 held creates for 30 s at once, where
#: a Node API back within a second would have been asked again a second later).
CREATE_HOLD_MS = 1_000
CREATE_HOLD_MAX_MS = 30_000
#: After a create answered 429 (the Node API at its capacity, after the client's own retries),
#: the replica makes none for this long, or as long as the answer's Retry-After says (at most
#: nodeapi.MAX_RETRY_AFTER_S): it made one every tick before (1,355 in 8.5 minutes, each a
#: warning, in a review's drill with the API's capacity under the pool's max_nodes).
CAPACITY_HOLD_MS = 10_000
#: After the Node API refused a create for a reason of its own (a 3xx, a 4xx but 429: a wrong
#: path, a token refused) or named its node with an id the pool cannot take, the replica makes
#: none for REFUSED_HOLD_MS * 2**(n-1) after the n-th try in a row refused (the creates sent
#: before a refusal was known are of one try), at most CREATE_HOLD_MAX_MS,
#: then one at a time until one is not refused: asked again at once, it says the same (a
#: review: a Node API answering 404 was asked max_batch times a tick, 1,200 creates and
#: warnings a minute; one whose ids held a '/' made 1,200 nodes a minute, each deleted at
#: once, every one billed).
REFUSED_HOLD_MS = 5_000
#: The longest wait between a listener's tries to subscribe again while the server is away: a
#: try is one connection, and every moment unsubscribed loses the events published in it (at
#: 5 s, a review's replica stayed deaf 2 s after its server answered again).
SUBSCRIBE_BACKOFF_MAX_S = 1.0
#: The least a listener waits for the server to confirm its SUBSCRIBE (twice the silence
#: allowed, if more) before it takes the connection for dead and subscribes again: a reply to
#: a command, which a live server sends at once, ahead of any message on the subscription.
CONFIRM_WAIT_MIN_S = 5.0
#: How much longer than a create's longest call --create-timeout must be: the time a replica
#: may take between its decision and the POST before the create is withdrawn.
CREATE_SLACK_S = 5.0
#: How long the /metrics and health server waits for a request still open when the replica
#: stops, before it closes the connection.
HTTP_SHUTDOWN_S = 1.0
#: After a loss of the pool's state, how long a replica's ticks wait for the Node API's node
#: list (retried every heartbeat) before deciding without it: an API with no list (404, 405)...
TAKE_BACK_PATIENCE_MS = 60_000
#: ... and one that fails to give it (unreachable, a timeout, a 5xx). A minute for that too
#: let a pool whose API stalled for longer boot a batch beside the nodes it had lost track of
#: (a review's drill: 62 nodes at --max-nodes 50); the creates of an API that is down fail
#: anyway, and one whose list alone fails for good stops scaling for 10 minutes, not for good.
TAKE_BACK_FAILING_PATIENCE_MS = 600_000
#: The Node API's states of a node on its way out: not one the pool may hand to a user.
ENDING = frozenset({"terminating", "terminated"})

#: Most pub/sub messages applied in one round trip (`Replica.listen`).
LISTEN_BATCH = 200

#: Most activity events applied by one record_activity call: a run of them in a batch goes in
#: calls of this many (the server runs each call whole, so this bounds how long it is held).
ACTIVITY_BATCH = 50

#: How long a batch of events the server could not be reached for (a partition, a restart, a
#: stall past the client's timeout, a pause) is tried again before the listener asks why. A
#: refusal (out of memory, read-only, still loading) meets every replica alike, but this one
#: may be cut off alone while the others apply the same messages and those after them, and a
#: copy it applies late is taken for a later one (the payloads carry no id: a review's
#: disconnect held 11 s ended the session its user had begun since). A server paused (SIGSTOP,
#: a stall) looks the same from a replica (behind a hop that takes the connection, a sidecar or
#: a tunnel, every try times out reading either way), and there dropping lost users: an
#: operator's drill, a 20 s pause with connects being applied, 3 and 4 of 30 dropped on every
#: replica. So past this hold the batch is held until the server answers (--event-hold at
#: most), and then applied only if the server served no replica meanwhile, as the pool's
#: heartbeats say (lua/judge_gap.lua, `_past_a_gap`): dropped if it served others, or if the
#: heartbeats cannot tell, each event named and counted.
UNREACHABLE_HOLD_S = 10.0

#: The edges of a gap that judge_gap leaves out (lua/judge_gap.lua). At its start: the error
#: of this replica's estimate of the server's clock (its last heartbeat's, carried on by its
#: monotonic clock). At its end: what the server ran once it answered again, before the
#: question: the heartbeats every replica had queued while it did not, and the others' beats
#: in the GAP_ASK_MAX_S this replica may wait between two questions.
GAP_START_EDGE_S = 0.5
GAP_END_EDGE_S = 3.0

#: The longest wait between two questions to a server that does not answer (`_past_a_gap`).
GAP_ASK_MAX_S = 1.0

#: A connect's or disconnect's try carries the server's time past which its replica has
#: stopped waiting for it, and the pool refuses it later (lua/includes/pool.lua made_again):
#: when it was sent, by the replica's reading of the server's clock, plus the client's
#: timeout, plus this for the reading's error (half the last heartbeat's round trip, the
#: clocks' drift since).
LATE_MARGIN_S = 1.0

#: How long after the first unanswered try of a gap a message read is taken as sent before
#: the gap began (what a server sent as it stopped, on its way): the network's and the event
#: loop's delay.
GAP_READ_EDGE_S = 0.1

#: How far the server's clock may move in a gap from the time this replica measured it, by its
#: monotonic clock, before the gap is taken as one no beat can place (the server's clock
#: stepped): the question's round trip and the start edge, with room.
CLOCK_STEP_S = 2.0

#: How often a listener whose backlog is full (--event-backlog) looks for room in it.
BACKLOG_FULL_WAIT_S = 0.05

def _doubling_hold_ms(first_ms: int, in_a_row: int) -> int:
    """How long creates are held after the `in_a_row`-th failure or refusal in a row: `first_ms`
    after the first, twice as long after each next one, CREATE_HOLD_MAX_MS at most."""
    return min(CREATE_HOLD_MAX_MS, first_ms << min(in_a_row - 1, 16))


@dataclasses.dataclass
class _Tries:
    """Tries in a row that failed (the Node API down, or refusing), each the creates sent
    before the last failure was known: they say nothing new, so one tick's batch failing
    together is one try (counted per create, a tick of 20 held creates 30 s at once)."""

    count: int = 0
    known_ms: int = 0  # when the last failure was known

    def failed(self, asked_ms: int, now_ms: int) -> int:
        """Count a create sent at `asked_ms` that failed, known at `now_ms`; the tries now."""
        if not self.count or asked_ms > self.known_ms:
            self.count += 1
            self.known_ms = now_ms
        return self.count


def _try_again(reply: object) -> bool:
    """A call whose reply says it did not run, and may run if made again: refused for now, a
    script the server did not hold (a SCRIPT FLUSH between the load and the call), or a try
    run past its deadline (`_late`)."""
    return refused_for_now(reply) or isinstance(reply, NoScriptError) or _late(reply)


def _late(reply: object) -> bool:
    """A try the pool refused as run past its deadline (lua/includes/pool.lua made_again): one
    this replica had stopped waiting for, or, when it reads the reply, one whose deadline its
    reading of the server's clock set short (the clock stepped since its last heartbeat)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("LATE call ")


def _client_timeout_s(redis: aioredis.Redis) -> float | None:
    """How long the client waits for a reply before it gives up (its connections'
    socket_timeout, redis-py's default when the URL sets none: 5 s); None: for ever."""
    try:
        pool = redis.connection_pool
        timeout = pool.connection_class(**pool.connection_kwargs).socket_timeout
    except Exception:  # a client of another make (a test's fake): no deadline
        return None
    return float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None


class MayHaveApplied(RedisError):
    """What is left of a call that a try whose reply was lost may have applied, when neither
    another try nor a question (`Replica._ask_again_refused`) told by the batch's deadline, or
    before a stop, whether it ran: not one the pool is known never to have applied."""

    def __init__(self, last: Exception) -> None:
        super().__init__(str(last) or type(last).__name__)


def _unknown_if(lost: bool, results: list[Any]) -> list[Any]:
    """`results`, each refusal for now or failure to reach the server a MayHaveApplied if a
    try of theirs lost its reply."""
    if not lost:
        return results
    return [MayHaveApplied(r) if isinstance(r, RedisConnectionError | RedisTimeoutError)
            or _try_again(r) else r for r in results]


#: How the scripts refuse every transition while a key of the pool holds another type than its
#: own (an edit by hand; lua/includes/keys.lua refuse_wrong_types): nothing changes until an
#: operator repairs the key, so it is not tried again, but the replica is unready meanwhile.
POOL_KEY_BROKEN = "WRONGTYPE pool key "


def _resumed(result: AllocateResult, held: int) -> str:
    """The connect log line's note of a session resumed (lua/allocate.lua), with the count of
    this user's lines held back since the last one (`Replica._looping`)."""
    if not result.resumed:
        return ""
    more = f"; {held} more of this user's connects and disconnects since the last line" \
        if held else ""
    return f" (resumes the session or wait the user ended within 30s: taught nothing{more})"


def _unreachable(problem: object) -> bool:
    """The server could not be reached for a call (a refused connection, a timeout), as
    opposed to its refusing it: a server still loading answers, its error a ConnectionError
    in redis-py all the same. Such a batch is tried UNREACHABLE_HOLD_S at most."""
    return (isinstance(problem, RedisConnectionError | RedisTimeoutError)
            and not isinstance(problem, BusyLoadingError))


class DroppedAfterGap(RedisConnectionError):
    """What is left of a batch the listener held while the server could not be reached and
    dropped once it knew why (`Replica._past_a_gap`): the server served other replicas
    meanwhile, or their heartbeats could not tell."""


def _pool_key_broken(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith(POOL_KEY_BROKEN)


def _refuses_writes(reply: object) -> bool:
    """The server refuses this replica's writes, for now or until a key is repaired: the
    replica is unready until a write goes through."""
    return refused_for_now(reply) or _pool_key_broken(reply)


#: The loops whose every turn writes (a script): one timed out is a write left unanswered, where
#: reconciliation's may be a read (`_every`).
WRITING_LOOPS = frozenset({"tick", "heartbeat"})

#: A replica not heard from for this long is dropped from the pool's list of replicas.
FORGET_REPLICA_MS = 600_000

#: How often the replica's loop watch wakes (`Replica._watch_the_loop`), and how much later than
#: that it must wake to count as a stall of the loop.
LOOP_WATCH_S = 0.25
LOOP_STALL_S = 1.0

#: Every replica's lag probe channel begins so: ``provisioner:lag:POOL:DB:REPLICA``. A
#: server's channels are shared by all its databases, so the probe channels it lists
#: (PUBSUB CHANNELS) name every pool whose replicas listen on it, whatever their database.
PROBE_PREFIX = "provisioner:lag:"


def pool_of_probe(channel: str) -> tuple[str, int | None] | None:
    """The pool and database number a probe channel names; None for another channel. A
    replica from before the database was named (``provisioner:lag:POOL:REPLICA``) gives
    None for its database."""
    if not channel.startswith(PROBE_PREFIX):
        return None
    parts = channel.removeprefix(PROBE_PREFIX).split(":")
    # A database number has a few digits (a channel of 5,000 made int() raise, under the
    # heartbeat: a review of 2026-12-04).
    if len(parts) == 3 and 0 < len(parts[1]) <= 9 and parts[1].isascii() and parts[1].isdigit():
        return parts[0], int(parts[1])
    if len(parts) == 2:
        return parts[0], None
    return None


def _database(redis: aioredis.Redis) -> int:
    pool = getattr(redis, "connection_pool", None)
    try:
        return int(getattr(pool, "connection_kwargs", {}).get("db") or 0)
    except (TypeError, ValueError):
        return 0


async def _bytes_waiting(pubsub: Any) -> bool:
    """Whether the subscription's connection has bytes not yet parsed, in the kernel or in
    its buffers. A short sleep first: its wake-up is a new timer, which the loop runs only
    after a select, and the socket's read callbacks that select finds run before the timers
    (asyncio's `_run_once`), so bytes in the kernel reach the connection's buffer before this
    task wakes. Then redis-py's check of its buffers, which waits for nothing: no timer can race
    it, as one raced every read with a timeout (reviews)."""
    connection = pubsub.connection
    if connection is None:
        return False
    await asyncio.sleep(0.01)
    # `can_read` (redis-py 8.0 on, hence the floor in pyproject.toml): the buffers of either
    # parser. Before it, `can_read_destructive` of the pure-Python parser saw only an end of
    # file, never a message waiting (a review, on 5.0.8, 6.4.0 and 7.4.1).
    return bool(await connection.can_read())


class SubscriptionSilent(RedisConnectionError):
    """The listener's connection has carried nothing, not even the probes this replica
    published, for longer than a live one would: a connection dropped without a close (a
    middlebox, a partition) that redis-py's pub/sub does not notice. `since` (monotonic): the
    last message it carried."""

    def __init__(self, silent_s: float, since: float, confirmed: bool = True) -> None:
        super().__init__(
            f"no message for {silent_s:.1f}s, the probes published in that time among them: "
            "the connection is taken for dead" if confirmed else
            f"the SUBSCRIBE sent {silent_s:.1f}s ago is still unconfirmed (no probe goes out "
            "before it is): the connection is taken for dead")
        self.since = since


class CannotListen(OSError):
    """The HTTP endpoint (/metrics, /healthz, /readyz) cannot listen on its host and port: a
    name the resolver does not know, an address not this host's, a port taken. Its text names
    them; the resolver's alone ("Name or service not known") named neither."""


#: reconcile()'s count of the nodes the Node API does not list that are younger than the
#: grace (the create timeout): left for a later reconciliation, not repaired.
LEFT_FOR_LATER = "not_listed_left_young"


class Replica:
    """Handles events and ticks for one pool. Several replicas may run against one Redis."""

    def __init__(self, redis: aioredis.Redis, service: ServiceConfig, pool: PoolConfig,
                 node_api: NodeApi, *, clock: Clock | None = None,
                 metrics: Metrics | None = None, gauges: bool = True) -> None:
        # The CLI checks its settings before it makes a replica; code that makes one (a replay,
        # a test, an embedding) is held to the same ranges, the pool's and the service's, not
        # left to misbehave in silence (a NaN timeout, a floor above the quota).
        service.validate()
        pool.validate()
        self.redis = redis
        #: whether each tick refreshes the pool's Prometheus gauges (a replay has no scrape)
        self.gauges = gauges
        self.service = service
        self.pool = pool
        self.node_api = node_api
        self.clock = clock or WallClock()
        self.metrics = metrics or Metrics()
        self.keys = PoolKeys(service.pool)
        self.scripts = Scripts(redis, self.keys, observe=self.metrics.observe_script)
        #: how long the client waits for a reply (`_deadline_mark`)
        self._call_timeout_s = _client_timeout_s(redis)
        self.metrics.scripts_info.labels(scripts_fingerprint()).set(1)
        #: the digest of the pool settings this replica runs, in its heartbeat and on /metrics
        #: (the settings are frozen, so worked out once)
        self.settings_digest = pool.digest()
        self.metrics.settings_info.labels(service.pool, self.settings_digest).set(1)
        #: when (monotonic) this replica last won a scaling tick or found its slot decided by
        #: another, for ProvisionerNoReplicaTicking
        self._decided_at: float | None = None
        self.metrics.decision_age.set_function(self._decision_age)
        self.metrics.tick_interval.set(pool.tick_interval_s)
        self.replica_id = service.replica_id
        #: each connect and disconnect is marked `replica:batch:seq` (`_marks`), so that its
        #: call, made again after a reply lost, is not applied again; the batch tags are this
        #: process's own (a random start and a count), so a restart under the same id, or
        #: another batch, is never taken for the one made again
        self._instance = secrets.token_hex(6)
        self._batches = itertools.count(1)
        self.stopping = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._actions: set[asyncio.Task[None]] = set()
        self._bad_input = RateLimitedLog(log)
        self._trouble = RateLimitedLog(log, every=5.0)
        #: for what a setting of the server causes, which stays until someone changes it
        self._lasting = RateLimitedLog(log, every=3600.0)
        #: a user whose connect resumed a session: one line of theirs (connect or disconnect)
        #: every 10 s, the count held back in the next (a client in a loop at 100 a second
        #: logged 200 lines a second on every replica)
        self._looping = Throttle(10.0, most=10_000)
        #: the listener's lag probe (`probe_lag`): this replica's own channel, the monotonic
        #: times of the probes published on it and not yet seen back, and the last one's lag
        self.database = _database(redis)
        self.probe_channel = f"{PROBE_PREFIX}{service.pool}:{self.database}:{service.replica_id}"
        self._probe_names: set[str | bytes] = {self.probe_channel, self.probe_channel.encode()}
        self._probes_out: deque[float] = deque()
        #: of those, the ones the server has answered the PUBLISH of, and when: only those are
        #: on their way to the listener (a paused server answers none until it runs again)
        self._probes_published: dict[float, float] = {}
        self._last_lag_s = 0.0
        #: the other pools whose replicas listen on this server, as the last heartbeat found
        #: them (`look_for_other_pools`): each applies this pool's events, and it theirs
        self.other_pools: list[str] = []
        #: the server's eviction policy where it may evict the pool's keys (a maxmemory and a
        #: policy other than noeviction, `look_at_eviction`), else ""
        self.server_evicts = ""
        self._started_ms = self.clock.now_ms()
        #: the pool's epoch at this replica's last heartbeat, for the alarm when the state is
        #: lost, and passed by its ticks: scale_decide decides nothing under an epoch the pool
        #: does not hold. After a loss, while the Node API's nodes are not yet taken back
        #: (`_taking_back_since`), the ticks decide nothing either: no tick boots a pool beside
        #: the running nodes
        self._epoch = ""
        #: when the pool's count of heartbeats began, and the count, as this replica's last
        #: heartbeat got them (none yet: '', 0)
        self._heartbeats: tuple[str, int] = ("", 0)
        #: when this replica's hold on its decisions began (its clock, ms), while it takes the
        #: Node API's nodes back after a loss or on a young state; None when it holds none
        self._taking_back_since: int | None = None
        #: the reconciliation that takes the Node API's nodes back after a loss (`_take_back`),
        #: at most one at a time: started by a heartbeat, which waits for it only until its
        #: interval is up, so that a Node API slow to list (its timeout times its attempts,
        #: about 30 s) does not stop the heartbeats (a review: the replica read as silent)
        self._take_back_task: asyncio.Task[None] | None = None
        #: set once this replica has had its first turn at reconciliation (run waits for it
        #: before its first scaling decision)
        self._looked = asyncio.Event()
        #: this replica's clock less the server's at its last heartbeat (None before the first)
        self._clock_offset_s: float | None = None
        #: the server's time (ms) at its last heartbeat, and the monotonic time it stands for
        #: (the middle of the call): this replica's reading of the server's clock in a gap
        #: (`_past_a_gap`), which a clock set by hand or a manual one in a replay would not give
        self._server_clock: tuple[int, float] | None = None
        #: monotonic spans [from, to): the messages read in one are dropped, not applied
        #: (`_run_events`; `_apply_backlog` takes none with others): those read before a gap
        #: in which the server served the other replicas, or in one nothing could judge
        self._drop_reads: list[tuple[float, float]] = []
        #: creates in a row that found the Node API down, and until when creates are held: an
        #: observation of a service outside the pool, like the clock's, never pool state
        self._api_down = 0
        #: the tries among them, the hold doubling with each (`_create_answered`)
        self._api_down_tries = _Tries()
        self._creates_held_until_ms = 0
        self._capacity_held_until_ms = 0
        #: creates in a row the Node API refused (or answered with an id the pool cannot
        #: take), and until when creates are held for it; any other answer to a create ends it
        self._api_refused = 0
        #: the tries among them, the hold doubling with each (`_create_answered`)
        self._api_refused_tries = _Tries()
        self._refused_held_until_ms = 0
        #: this replica's creates not done yet (its POST unanswered, or its answer not yet
        #: recorded): while creates are held, a probe is made only with none of them ("one at
        #: a time": a probe that took its whole timeout let every tick meanwhile send one
        #: more, 4 in 4 s in an operator's drill), each with the time (this replica's clock,
        #: ms) past which it no longer counts: its reservation's deadline, past which the pool
        #: creates again anyway, so that a create stuck for good (a reply of the server that
        #: never comes, a socket timeout set off) cannot hold the creates for good
        self._creating: dict[asyncio.Task[None], int] = {}
        #: the deadline a decision (`scale_decide`) or a reap (`reap_idle`) of this replica
        #: whose reply was lost (a timeout, a cut connection), and which may have run, gave its
        #: reservations or its terminations: `_send_what_lost_calls_took`
        self._lost_decisions: list[int] = []
        self._lost_reaps: list[int] = []
        #: since when (monotonic) and why the server has refused this replica's writes for now
        #: (out of memory, read-only, a script running long), from the first refusal to the
        #: next write that went through: /readyz fails meanwhile; None: not refused
        self._refused: tuple[float, str] | None = None
        #: the messages the listener has read and not yet applied, in arrival order
        #: (`listen`), the probes among them, each with when (monotonic) it was read: its
        #: --event-hold runs from then; set when one is added, and once the reading ends
        self._backlog: deque[tuple[bytes, bytes, float]] = deque()
        self._backlog_added = asyncio.Event()
        self._reading_done = False
        #: the batch the applier has taken from the backlog and not yet applied (held while
        #: the server refuses it), its probes among them: read and not applied, as the
        #: backlog's messages are
        self._taken: list[tuple[bytes, bytes, float]] = []
        #: whether the last batch of events ended unapplied for want of the server (a refused
        #: connection, a timeout): once stopping, the listener's applier tries no further batch
        self._unreached = False
        #: channels the server has confirmed on the listener's subscription (subscribed once
        #: all of them are)
        self._confirmed = 0
        self._lost_at: float | None = None  # monotonic time the last subscription was lost
        #: the quantities of provisioner_last_decision set at the last refresh_gauges
        self._decision_quantities: set[str] = set()
        self.metrics.event_backlog.set_function(lambda: len(self._backlog) + len(self._taken))

    # --- events -------------------------------------------------------------------------------

    async def handle(self, channel: str | bytes, data: bytes | str) -> Outcome:
        """Apply one pub/sub message and return what its script decided (None when the message
        was dropped). Never raises: bad input is counted, logged and dropped."""
        return (await self.handle_many([(channel, data)]))[0]

    async def handle_many(self, messages: Sequence[tuple[str | bytes, bytes | str]],
                          read_at: float | None = None) -> list[Outcome]:
        """Apply pub/sub messages in order, their scripts in one round trip (one after another,
        each atomic, as separate calls would run), and return what each decided. Never raises:
        bad input is counted, logged and dropped; a message the server could not apply is
        counted and logged, and the others still apply."""
        now = self.clock.now_ms()
        parsed = [self._parse_or_drop(channel, data, now) for channel, data in messages]
        valid = [item for item in parsed if item is not None]
        evs = self._marks([event for _, event in valid])
        calls = self._calls(evs, now)
        results = await self._run_events(evs, calls, read_at)
        per_event: list[Any] = []
        for result, (_, grouped) in zip(results, calls, strict=True):
            if not grouped:
                per_event.append(result)
            elif isinstance(result, Exception):
                per_event += [result] * grouped
            else:
                per_event += result
        replies = iter(per_event)
        outcomes: list[Outcome] = []
        for item in parsed:
            if item is None:
                outcomes.append(None)
                continue
            label, event = item
            result = next(replies)
            if isinstance(result, Exception):
                self.metrics.errors.labels("event").inc()
                # Named, so that an operator can find a connect or disconnect lost and repair
                # it (`provisioner users`, `provisioner release`): each of those on a line of
                # its own, where a flood of activity refused with them (a pool key broken by
                # hand) left one line in five seconds for all.
                who = getattr(event, "user_id", None) or getattr(event, "node_id", "?")
                marked = isinstance(event, events.Connect | events.Disconnect)
                if marked and isinstance(result, MayHaveApplied):
                    # Not "could not apply": the operator the line is for would repair a call
                    # that ran (a release by hand ends the session begun since).
                    log.warning("%s of %s may have been applied by a try whose reply was lost; "
                                "whether it was could not be told (dropped, check before "
                                "repairing it): %s", label, who, result)
                elif marked:
                    log.warning("could not apply %s of %s (dropped): %s", label, who, result)
                else:
                    self._trouble.warning("redis-event", "could not apply %s of %s: %s", label,
                                          who, result)
                outcomes.append(None)
            else:
                outcomes.append(self._report(event, result))
        return outcomes

    def _marks(self, evs: list[events.Event]) -> list[tuple[events.Event, str]]:
        """Each event with the mark of its call, the same for every try of it (lua/includes/
        pool.lua made_again): `replica:batch:seq` for a connect or disconnect, the batch this
        read's own and seq its place among them; '' for the others, which a second copy leaves
        as they are. A pool keeps each replica's last mark applied, and a call of the same
        batch at or before it has run, since a batch's calls run in order: batches of one
        replica interleaved (none are) would only be tried again unmarked, never skipped."""
        batch = f"{self._instance}.{next(self._batches)}"
        marked = (events.Connect, events.Disconnect)
        seq = itertools.count(1)
        return [(event, f"{self.replica_id}:{batch}:{next(seq)}" if isinstance(event, marked)
                 else "") for event in evs]

    async def _run_events(self, evs: Sequence[tuple[events.Event, str]],
                          calls: list[tuple[Call[Any], int]],
                          read_at: float | None = None) -> list[Any]:
        """The events' calls in one round trip, each call's result or error. A batch the server
        cannot take for now (unreachable, a stall past the client's timeout, still loading, a
        script running long, out of memory, a replica read-only, a script flushed) is tried
        again from the first call it refused after the last that ran (one refused before a
        call that ran is dropped), stamped with the time of the try, for --event-hold: a
        connect dropped is a user who never gets a node, a disconnect dropped a node held after
        its session. A try that timed out or was cut off may have gone through, in part: a
        connect or disconnect made again carries its first try's mark and is not applied again
        (`_marks`); the other events' second copies change nothing (an activity of a second
        already recorded, a node status the node already has)."""
        # From when the batch's first message was read (`read_at`, monotonic; the first try if
        # not given): a batch that waited in the backlog behind one held has had its hold run
        # meanwhile (a review: a hold of each batch's own let a refusal of an hour apply a full
        # backlog an hour late).
        started = time.monotonic() if read_at is None else read_at
        if self._dropped_read(started):
            # read before this replica got back from a gap in which the server served the
            # others, or within one nothing could judge (`_past_a_gap`): a late copy of what
            # the others applied in time would be taken for a later event
            return [DroppedAfterGap("read before or within a gap in which the server served "
                                    "the other replicas, or that could not be judged: "
                                    "applying it late could undo a later event")] * len(calls)
        deadline = started + self.service.event_hold_s
        unreached_by = started + min(self.service.event_hold_s, UNREACHABLE_HOLD_S)
        wait_s = 0.1
        done: list[Any] = []
        lost = False  # a try of this batch may have run, its reply never read
        gap_at: float | None = None  # monotonic: the first try of a gap, sent
        while True:
            problem: Exception
            tried_at = time.monotonic()
            try:
                results = await self.scripts.run_many([call for call, _ in calls]) if calls else []
            except (RedisConnectionError, RedisTimeoutError) as exc:
                results, problem, lost = [exc] * len(calls), exc, True
            else:
                # A script the server did not hold did not run: a SCRIPT FLUSH landed between
                # the pipeline's load of the scripts and its calls (redis-py loads them again
                # on the next try). What is tried again is the calls after the last one that
                # ran: a failed call before it is not, since made again it would apply after a
                # later event, and the calls after it would apply twice (a review: a connect
                # and its disconnect run again after a flush and a reload mid-batch). Such a
                # call is dropped, as one the server refused is.
                ran = [i for i, r in enumerate(results) if not _try_again(r)]
                first = ran[-1] + 1 if ran else 0
                late = next((i for i, r in enumerate(results) if _late(r)), None)
                if late is not None:
                    # A try refused as late never ran, whatever ran after it (an activity, a
                    # node status: no deadline), so it is made again, not dropped as one
                    # refused before a call that ran: from it, each call after it that ran
                    # changing nothing the second time (a third review)
                    first = min(first, late)
                    await self._read_server_clock_again()
                if lost:
                    await self._ask_again_refused(evs, calls, results, first, deadline,
                                                  unreached_by)
                if first == len(results):
                    self._unreached = False
                    broken = next((r for r in results if _pool_key_broken(r)), None)
                    if broken is not None:
                        self._note_refused(broken)
                    elif calls:
                        self._written()
                    return done + _unknown_if(lost, results)
                problem = results[first]
                if refused_for_now(problem):
                    self._note_refused(problem)
                done += _unknown_if(lost, results[:first])
                evs = evs[sum(max(grouped, 1) for _, grouped in calls[:first]):]
                calls, results = calls[first:], results[first:]
            self._unreached = _unreachable(problem)
            gap_at = (gap_at or tried_at) if self._unreached else None
            if (gap_at is not None and unreached_by < deadline and not self.stopping.is_set()
                    and time.monotonic() + wait_s > unreached_by):
                dropped = await self._past_a_gap(gap_at, deadline, len(evs))
                if dropped is not None:
                    return done + _unknown_if(lost, [dropped] * len(results))
                # The server served no one: held again, as a batch new to trouble is
                unreached_by = min(deadline, time.monotonic() + UNREACHABLE_HOLD_S)
                gap_at, wait_s = None, 0.1
                calls = self._calls(evs, self.clock.now_ms())
                continue
            held_by = unreached_by if self._unreached else deadline
            if self.stopping.is_set() or time.monotonic() + wait_s > held_by:
                return done + _unknown_if(lost, results)
            self.metrics.errors.labels("event_retry").inc()
            self._trouble.warning("redis-event-retry", "could not apply %d events (%s): trying "
                                  "again for up to %.0fs", len(evs),
                                  str(problem) or type(problem).__name__, held_by - started)
            await sleep_unless(self.stopping, wait_s)
            wait_s = min(wait_s * 2, 2.0)
            calls = self._calls(evs, self.clock.now_ms())

    def _dropped_read(self, at: float) -> bool:
        """Whether a message read at `at` (monotonic) is in a span `_past_a_gap` dropped."""
        return any(start <= at < end for start, end in self._drop_reads)

    def _drop_read(self, start: float, end: float) -> None:
        """Drop the messages read in [start, end) (monotonic); the spans that ended before the
        oldest message still read and not applied go, as no message can fall in them."""
        oldest = min((read for _, _, read in itertools.chain(self._taken, self._backlog)),
                     default=end)
        self._drop_reads = [(a, b) for a, b in self._drop_reads if b > oldest]
        if end > start:
            self._drop_reads.append((start, end))

    async def _read_server_clock_again(self) -> None:
        """A try this replica was still waiting for came back refused as past its deadline:
        its reading of the server's clock is off (the server's clock stepped since its last
        heartbeat). Read it now (TIME), so that the next try's deadline is right; the
        heartbeat reads it again in turn."""
        self._trouble.warning("late-calls", "a try came back refused as run past its deadline, "
                              "while this replica waited for it: the server's clock moved "
                              "from this replica's reading of it (stepped?); reading it again")
        sent = time.monotonic()
        with contextlib.suppress(RedisError, OSError):
            self._server_clock = (await server_now_ms(self.redis),
                                  (sent + time.monotonic()) / 2)

    def _server_ms_at(self, at: float) -> int | None:
        """The server's time (ms) at monotonic `at`, as this replica's last heartbeat read it;
        None before its first (or with --heartbeat-interval 0)."""
        if self._server_clock is None:
            return None
        server_ms, then = self._server_clock
        return round(server_ms + (at - then) * 1000)

    async def _past_a_gap(self, gap_at: float, deadline: float,
                          count: int) -> DroppedAfterGap | None:
        """A batch of `count` events the server has not answered for since the try sent at
        `gap_at` (monotonic), past UNREACHABLE_HOLD_S: hold it until the server answers, then
        ask whether it served the other replicas meanwhile (lua/judge_gap.lua). None if it
        served no one (a pause: the batch is applied, late, as no later event can have been);
        else why it is dropped: it served others (this replica was cut off alone, and they
        applied the messages in time: every message read before now goes too), their
        heartbeats could not tell, or it did not answer by `deadline` (monotonic) or a stop."""
        held_s = time.monotonic() - gap_at
        self._trouble.warning(
            "server-gap", "could not reach the server for %.0fs with %d events to apply: "
            "holding them till it answers (%.0fs more at most, --event-hold), then applying "
            "them if it served no replica meanwhile (a pause), dropping them if it did (this "
            "replica cut off alone)", held_s, count, max(0.0, deadline - time.monotonic()))
        began = self._server_ms_at(gap_at)
        judged: GapJudged | None = None
        why = ""
        wait_s = 0.1
        asked_at = time.monotonic()
        while began is not None and judged is None:
            asked_at = time.monotonic()
            try:
                judged = await self.scripts.judge_gap(
                    began, round(GAP_START_EDGE_S * 1000), round(GAP_END_EDGE_S * 1000))
            except (RedisConnectionError, RedisTimeoutError):  # still cut off, or loading
                if self.stopping.is_set() or time.monotonic() + wait_s > deadline:
                    self.metrics.server_gaps.labels("unanswered").inc()
                    return DroppedAfterGap(
                        f"the server did not answer for {time.monotonic() - gap_at:.0f}s "
                        f"({'stopping' if self.stopping.is_set() else '--event-hold'})")
                await sleep_unless(self.stopping, wait_s)
                wait_s = min(wait_s * 2, GAP_ASK_MAX_S)
            except RedisError as exc:  # answered, and refused: no telling
                why = f"the question was refused: {exc}"
                break
        if began is not None:  # asked, and answered
            self._unreached = False
        answered = time.monotonic()
        gap_s = answered - gap_at
        if (judged is not None and judged.verdict != "unknown"
                and abs(judged.gap_ms - gap_s * 1000) > CLOCK_STEP_S * 1000):
            # The server's clock stepped in the gap (NTP): this replica's reading of it, by
            # its last heartbeat and its own monotonic clock, no longer places the gap among
            # the beats (a review: a step of 60 s made a cut a pause)
            why = (f"the server's clock moved {judged.gap_ms / 1000:.0f}s in it, where this "
                   f"replica's moved {gap_s:.0f}s")
            judged = None
        if judged is not None and judged.verdict == "pause":
            self.metrics.server_gaps.labels("pause").inc()
            log.warning("the server served no replica in the %.0fs this one could not reach it "
                        "(no heartbeat in %.1fs of it, where every replica beats within "
                        "%.1fs): it was paused, not this replica cut off; applying the %d "
                        "events held, late", gap_s, judged.span_ms / 1000,
                        judged.needed_ms / 1000, count)
            return None
        if judged is not None and judged.verdict == "served":
            # The others applied what this replica read before now, in time: every copy of it
            # is late (a cut leaves nothing to read meanwhile, and a subscription that outlived
            # it brought copies the others applied too)
            self._drop_read(-math.inf, answered)
            self.metrics.server_gaps.labels("served").inc()
            log.warning("the server served other replicas while this one could not reach it "
                        "for %.0fs (%d heartbeats in %.1fs of it): this replica was cut off "
                        "alone, and the others applied these events in time; dropping the %d "
                        "held and every message read before now, as a late copy could undo a "
                        "later event", gap_s, judged.beats, judged.span_ms / 1000, count)
            return DroppedAfterGap(f"the server served other replicas in the {gap_s:.0f}s this "
                                   "one could not reach it: cut off alone")
        # Nothing says whether the others applied the messages behind this batch. Those read
        # within the gap go: in a cut, copies of what the others applied while this replica
        # could not (a review: applied once it got back, a session begun since was ended).
        # A paused server sends none: what it sent as it stopped is read within
        # GAP_READ_EDGE_S of the try, and what it ran as it came back after the answered
        # question was sent, less GAP_ASK_MAX_S (the question before failed while it was
        # still stopped, and this one was sent at most that long after). And, for a gap
        # longer than UNREACHABLE_HOLD_S, those read more than that before the answer, late
        # past what any batch the server cannot be reached for is tried. Not the rest (two
        # reviews: dropping it lost, on every replica alike, the backlog a pause so judged had
        # left them, and what was published as it came back).
        if answered - gap_at > UNREACHABLE_HOLD_S:
            self._drop_read(-math.inf, answered - UNREACHABLE_HOLD_S)
        # (Or at the answer less the end edge, if later: a question the network held through
        # the cut, answered as it healed, was sent seconds before, and the span ended that
        # much early, a fourth review.)
        self._drop_read(gap_at + GAP_READ_EDGE_S,
                        max(asked_at - GAP_ASK_MAX_S, answered - GAP_END_EDGE_S))
        self.metrics.server_gaps.labels("unknown").inc()
        if began is None:
            why = "this replica has had no heartbeat to read the server's clock by"
        elif judged is not None and judged.unvouched:
            why = f"{judged.unvouched}, which could have applied them unseen"
            if "with no heartbeat" in judged.unvouched:
                why += (f" (one stopped leaves its mark: HDEL {self.keys.key('applied')} "
                        f"{judged.unvouched.split()[1]})")
        elif judged is not None and judged.span_ms < judged.needed_ms:
            why = (f"{max(0, judged.span_ms) / 1000:.1f}s of it to judge, where the longest "
                   f"heartbeat interval takes {judged.needed_ms / 1000:.1f}s")
        elif judged is not None:
            why = "no heartbeat of any replica just before it"
        text = (f"could not tell whether the server served other replicas in the {gap_s:.0f}s "
                f"this one could not reach it ({why})")
        log.warning("%s: dropping the %d events held, and the messages read within the gap "
                    "or over %.0fs ago, as a late copy could undo a later event", text, count,
                    UNREACHABLE_HOLD_S)
        return DroppedAfterGap(text)

    async def _ask_again_refused(self, evs: Sequence[tuple[events.Event, str]],
                                 calls: list[tuple[Call[Any], int]], results: list[Any],
                                 first: int, deadline: float, unreached_by: float) -> None:
        """After a try whose reply was lost, a connect or disconnect refused before a later call
        that ran (a connect, a disconnect, an activity or a node status) may have run in that
        try: not dropped as never run, but asked again, its mark ending in '?' so that the pool
        applies nothing whatever it finds: it answers MADE_AGAIN (it ran), PASSED OVER or NOT
        RUN (it never did). A question applies nothing, so it is asked until `deadline`
        (monotonic), or `unreached_by` while the server cannot be reached (the applier waits
        for it, and the batches behind it would be applied as late); the refusal stands if it
        goes unanswered till then."""
        again: list[tuple[int, events.Event, str]] = []
        at = 0
        for i, (_, grouped) in enumerate(calls[:first]):
            event, mark = evs[at]
            if not grouped and mark and _try_again(results[i]):
                again.append((i, event, mark))
            at += max(grouped, 1)
        wait_s = 0.1
        while again:
            now = self.clock.now_ms()
            replies: list[Any]
            unreached = False
            try:
                replies = await self.scripts.run_many(
                    [self._call(event, f"{mark}?", now) for _, event, mark in again])
            except (RedisConnectionError, RedisTimeoutError) as exc:
                replies = [None] * len(again)
                unreached = _unreachable(exc)
            for (i, _, _), reply in zip(again, replies, strict=True):
                if reply is not None and not _try_again(reply):
                    results[i] = reply
            again = [item for item, reply in zip(again, replies, strict=True)
                     if reply is None or _try_again(reply)]
            if (not again or self.stopping.is_set()
                    or time.monotonic() + wait_s > (unreached_by if unreached else deadline)):
                return
            await sleep_unless(self.stopping, wait_s)
            wait_s = min(wait_s * 2, 2.0)

    def _parse_or_drop(self, channel: str | bytes, data: bytes | str,
                       now: int) -> tuple[str, events.Event] | None:
        """`_parse`, with a message it fails on (a bug, not bad input: that is rejected)
        counted as an error, logged with its traceback and dropped, so no message can stop the
        listener."""
        try:
            return self._parse(channel, data, now)
        except Exception:
            self.metrics.errors.labels("event").inc()
            self._trouble.exception("parse", "could not read a message on %r (dropped): %r",
                                    channel, data[:200])
            return None

    def _parse(self, channel: str | bytes, data: bytes | str,
               now: int) -> tuple[str, events.Event] | None:
        """The message's channel label and event; None, counted and logged, if it is bad."""
        name = channel.decode(errors="replace") if isinstance(channel, bytes) else channel
        label = name if name in events.SUBSCRIBED else "other"
        self.metrics.events.labels(label).inc()
        event = events.parse(name, data, now, max_age_s=self.service.max_event_age_s,
                             max_skew_s=self.service.max_clock_skew_s)
        if isinstance(event, Rejected):
            self.metrics.rejected.labels(label, event.reason.value).inc()
            self._bad_input.warning(f"{label}/{event.reason}", "dropped %s message: %s (%s)",
                                    label, event.reason.value, event.detail)
            return None
        return label, event

    def _calls(self, evs: Sequence[tuple[events.Event, str]],
               now: int) -> list[tuple[Call[Any], int]]:
        """The transitions the events ask for, in order: each run of consecutive activity
        events in one record_activity call (up to ACTIVITY_BATCH of them), every other event a
        call of its own. With each call, how many activity events it applies (0 for another
        event's call, whose result is its own)."""
        calls: list[tuple[Call[Any], int]] = []
        run: list[tuple[str, int]] = []
        deadline = self._deadline_mark()  # each try's own: its marks are made anew

        def close_run() -> None:
            if run:
                calls.append((self.scripts.record_activities_call(
                    now, run, self.pool.window_ms, self.pool.engaged_threshold,
                    self.pool.max_events_per_user), len(run)))
                run.clear()

        for event, mark in evs:
            if isinstance(event, events.Activity):
                run.append((event.user_id, event.timestamp_ms))
                if len(run) >= ACTIVITY_BATCH:
                    close_run()
            else:
                close_run()
                calls.append((self._call(event, mark and mark + deadline, now), 0))
        close_run()
        return calls

    def _deadline_mark(self) -> str:
        """What a try's marks end in: '@' and the server's time past which this replica stops
        waiting for it (`LATE_MARGIN_S`); '' if it cannot say (no heartbeat yet to read the
        server's clock by, or a client that waits for ever)."""
        now = self._server_ms_at(time.monotonic())
        if now is None or self._call_timeout_s is None:
            return ""
        return f"@{now + round((self._call_timeout_s + LATE_MARGIN_S) * 1000)}"

    def _call(self, event: events.Event, mark: str, now: int) -> Call[Any]:
        """The transition a connect, disconnect or node status asks for."""
        assert not isinstance(event, events.Activity), "activity goes through _calls"
        if isinstance(event, events.Connect):
            return self.scripts.allocate_call(now, event.user_id, self.replica_id,
                                              self.pool.decision_log_len, mark)
        if isinstance(event, events.Disconnect):
            return self.scripts.release_call(now, event.user_id, mark=mark)
        return self.scripts.apply_node_status_call(now, event.node_id, event.status)

    def _report(self, event: events.Event, result: Any) -> Outcome:
        """Count and log what an event's transition (`_call`) decided."""
        if isinstance(event, events.Activity):
            assert isinstance(result, ActivityResult)
            if result.code is Activity.STALE:
                log.debug("stale activity of %s", event.user_id)
        elif isinstance(event, events.Connect):
            assert isinstance(result, AllocateResult)
            held: int | None = 0
            if result.resumed:
                self.metrics.resumed.inc()
                held = self._looping.due(event.user_id)
            if result.code is Allocation.ALLOCATED:
                self.metrics.connects.inc()
                self.metrics.hits.inc()
                self.metrics.allocations.labels("instant").inc()
                self.metrics.wait.observe(0)
                if held is not None:
                    log.info("connect %s: hit, node %s%s", event.user_id, result.node_id,
                             _resumed(result, held))
            elif result.code is Allocation.WAITING:
                self.metrics.connects.inc()
                self.metrics.misses.inc()
                if result.resumed:
                    self.metrics.resumed_misses.inc()
                if held is not None:
                    log.info("connect %s: miss, waiting at position %d%s", event.user_id,
                             result.queue_position, _resumed(result, held))
            elif result.code is Allocation.MADE_AGAIN:
                self._made_again("connect", event.user_id)
        elif isinstance(event, events.Disconnect):
            assert isinstance(result, ReleaseResult)
            if result.code is Release.MADE_AGAIN:
                self._made_again("disconnect", event.user_id)
            elif result.code is not Release.UNKNOWN:
                self.metrics.releases.labels(result.code.name.lower()).inc()
                if not self._looping.held_back(event.user_id):
                    # (an abandoned wait had no node: no id, where the line ended in a space)
                    log.info("disconnect %s: %s%s", event.user_id, result.code.name.lower(),
                             f" {result.node_id}" if result.node_id else "")
            self._served(result.served)
        else:
            assert isinstance(result, NodeStatusResult)
            self.metrics.node_events.labels(event.status, result.code.name.lower()).inc()
            if result.code is not NodeStatusOutcome.DUPLICATE:
                log.info("node %s %s: %s (was %s)", event.node_id, event.status,
                         result.code.name.lower(), result.previous_state or "unknown")
            if result.requeued_user:
                log.warning("node %s terminated under user %s: user back at the head of the "
                            "queue", event.node_id, result.requeued_user)
            self._served(result.served)
        outcome: Outcome = result
        return outcome

    def _made_again(self, what: str, user_id: str) -> None:
        # What the first try decided was in the reply that was lost; the pool's state and
        # the decisions stream have it.
        self.metrics.made_again.labels(what).inc()
        log.info("%s %s: already applied by a try whose reply was lost; not applied again",
                 what, user_id)

    def _served(self, served: list[Served]) -> None:
        for item in served:
            self.metrics.allocations.labels("after_wait").inc()
            self.metrics.wait.observe(item.waited_ms / 1000)
            log.info("user %s served by node %s after %.1fs", item.user_id, item.node_id,
                     item.waited_ms / 1000)

    # --- scaling ------------------------------------------------------------------------------

    async def tick(self) -> None:
        """One scaling tick: decide (if this replica wins the interval), then act; then read
        the pool's gauges, also when deciding failed (a server refusing writes still answers
        the snapshot's reads: every replica's gauges froze at their last values while it
        refused them, a review)."""
        now = self.clock.now_ms()
        try:
            await self._decide_and_act(now)
        except Exception:
            if self.gauges:
                with contextlib.suppress(Exception):  # the tick's own error is the one to say
                    await self.refresh_gauges(now)
            raise
        if self.gauges:
            await self.refresh_gauges(now)

    async def _decide_and_act(self, now: int) -> None:
        allowed = self._creates_allowed(now)
        # Held now: none until the pause ends (then one at a time, which is not held).
        self.metrics.creates_held.set(1 if allowed == 0 else 0)
        args = self.pool.policy_args(now, self.replica_id, allowed, self._epoch)
        # The patience is the ticks' to keep too: a heartbeat that fails before its retry (its
        # settings refused) held them for good (a review).
        taking_back = self._taking_back and not self._take_back_over(now)
        if taking_back:
            self._trouble.warning(
                "take-back-tick", "no scaling decision while this replica takes the Node API's "
                "nodes back (the pool's state is new or was lost, and no node list came yet)")
            decision = Decision(won=False, epoch_changed=True)  # no decision of the pool's
        else:
            with self._reply_may_be_lost(self._lost_decisions, now, self._create_deadline(now)):
                decision = await self.scripts.scale_decide(args)
            self._written()
        if decision.epoch_changed and not taking_back:
            self._trouble.warning(
                "epoch", "no scaling decision: the pool's state in Redis is not the one this "
                "replica ran on (lost since its last heartbeat?); it decides again once its "
                "heartbeat has seen the loss and taken the Node API's nodes back")
        if decision.held_ahead:
            self._trouble.warning(
                "slot-ahead", "no scaling decision: the interval slot is held by a replica "
                "whose clock is over a minute ahead of this one's, and it decides alone while "
                "it lives; one of the two clocks is wrong (provisioner_clock_offset_seconds)")
        if decision.won or not (decision.epoch_changed or decision.held_ahead):
            # Won, or lost to the replica that decided in this slot: a decision of the pool's.
            self._decided_at = time.monotonic()
        if decision.won:
            self.metrics.decisions.inc()
            if decision.numbers.get("surge"):
                self.metrics.surges.inc()
            if decision.reservations:
                log.info("scale decision: %s", decision.reason,
                         extra={"numbers": decision.numbers})
            self._say_if_capped(decision)
            for reservation in decision.reservations:
                self._start_create(reservation, now)
            deadline = now + int(self.pool.delete_timeout_s * 1000)  # reap_idle's: policy_args
            with self._reply_may_be_lost(self._lost_reaps, now, deadline):
                terminations = await self.scripts.reap_idle(args)
            for termination in terminations:
                self.metrics.terminations.labels(termination.reason).inc()
                log.info("terminating %s: %s", termination.node_id, termination.reason)
                self._spawn(self._terminate(termination))
        if not taking_back:
            # After this decision's own creates and DELETEs: a read here that fails (the server
            # stalled again) left them unsent, its reservations counted as creating to their
            # deadline (a review).
            await self._send_what_lost_calls_took(now)

    @contextlib.contextmanager
    def _reply_may_be_lost(self, lost: list[int], now: int, deadline: int) -> Iterator[None]:
        """Note in `lost` the `deadline` a call about to be made gives what it takes, if its
        reply is lost: a server frozen past the client's timeout (DEBUG SLEEP, a SIGSTOP) runs
        it when it wakes, and what it takes is this replica's to act on
        (`_send_what_lost_calls_took`). The deadlines passed are dropped."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError):
            lost[:] = [*(due for due in lost if due > now), deadline]
            raise

    async def _send_what_lost_calls_took(self, now: int) -> None:
        """The creates and the DELETEs of this replica's calls whose reply was lost, where the
        server ran them. The pending reservations in this replica's name (`REPLICA:SEQ`) whose
        deadline is such a decision's: left alone, no POST was sent for them, and the pool
        counted them as creating until their deadline (--create-timeout), short of its target
        meanwhile (a helper's drill: DEBUG SLEEP 15). Told apart by their deadline, none whose
        create was sent (an uncertain one keeps its own to the end) is sent again; each is
        checked as any create (`_still_reserved`). And the terminating nodes whose deadline is
        such a reap's: no DELETE was sent for them until it (--delete-timeout), their nodes
        billed meanwhile; a DELETE sent twice is answered as once."""
        for reservation in await self._taken_by_lost_calls(self._lost_decisions, "pending", now):
            if reservation.rpartition(":")[0] == self.replica_id:
                log.warning("create %s: reserved by a decision of this replica whose reply was "
                            "lost; sent now", reservation)
                self._start_create(reservation, now)
        for node_id in await self._taken_by_lost_calls(self._lost_reaps, "terminating", now):
            # Started by this replica, as the lost decisions' creates are reserved by it
            # (`_start_create` counts them); the reap's own reasons were in the reply lost.
            self.metrics.terminations.labels("lost_reply").inc()
            log.warning("terminating %s: by a reap of this replica whose reply was lost; "
                        "DELETE sent now", node_id)
            self._spawn(self._terminate(Termination(node_id, "lost_reply")))

    async def _taken_by_lost_calls(self, lost: list[int], name: str, now: int) -> list[str]:
        """The members of the pool's sorted set `name` scored with a deadline of `lost` still
        ahead; `lost` is emptied once all are read (a read that fails leaves them all for the
        next decision: the members read before it, dropped from `lost`, were never acted on)."""
        taken: list[str] = []
        for due in lost:
            if due > now:
                taken += [as_text(member) for member in await self.redis.zrangebyscore(
                    self.keys.key(name), due, due)]
        lost.clear()
        return taken

    def _create_deadline(self, now: int) -> int:
        """The deadline of a reservation taken at `now` (scale_decide's: `policy_args`)."""
        return now + int(self.pool.create_timeout_s * 1000)

    def _start_create(self, reservation: str, now: int) -> None:
        self.metrics.creates.inc()
        creating = self._spawn(self._create(reservation))
        self._creating[creating] = self._create_deadline(now)
        creating.add_done_callback(lambda task: self._creating.pop(task, None))

    def _decision_age(self) -> float:
        return math.inf if self._decided_at is None else time.monotonic() - self._decided_at

    def _creates_allowed(self, now_ms: int) -> int | None:
        """The most creates this replica may make now: None (max_batch) while the Node API
        answers; none while creates are held, then one, a probe, until one is answered; none
        for CAPACITY_HOLD_MS after the API said it is at its capacity; after it refused one
        (REFUSED_HOLD_MS), none for a while, then one at a time until one is not refused. A
        probe goes only while none of this replica's creates is still going: one at a time."""
        if now_ms < self._capacity_held_until_ms:
            return 0
        creating = any(now_ms < until for until in self._creating.values())
        if self._api_refused:
            return 0 if now_ms < self._refused_held_until_ms or creating else 1
        if not self._api_down:
            return None
        return 0 if now_ms < self._creates_held_until_ms or creating else 1

    def _create_answered(self, result: CreateResult, now_ms: int, asked_ms: int) -> None:
        """Hold creates while the Node API is down (see CREATE_HOLD_MS), and stop on the first
        answer. A create sent (`asked_ms`) before the last failure was known is of the same
        try, and does not double the hold."""
        if result.api_down:
            self._api_down += 1
            tries = self._api_down_tries.failed(asked_ms, now_ms)
            hold = _doubling_hold_ms(CREATE_HOLD_MS, tries)
            self._creates_held_until_ms = max(self._creates_held_until_ms, now_ms + hold)
            self.metrics.creates_held.set(1)
            self._trouble.warning(
                "api-down", "the Node API is failing (%s): creates held for %.0fs, then made one "
                "at a time until one is answered (%d failed in a row, in %d tries)",
                result.detail, hold / 1000, self._api_down, tries)
        else:
            self._api_answered("a create")
        if result.refused:
            self._api_refused += 1
            tries = self._api_refused_tries.failed(asked_ms, now_ms)
            hold = _doubling_hold_ms(REFUSED_HOLD_MS, tries)
            self._refused_held_until_ms = max(self._refused_held_until_ms, now_ms + hold)
            self._trouble.warning(
                "api-refuses", "the Node API refuses creates (%s): creates held for %.0fs (%d "
                "refused in a row, in %d tries); check --node-api-url and what the API asks "
                "of a create", result.detail, hold / 1000, self._api_refused, tries)
        elif self._api_refused:
            log.warning("the Node API takes creates again, after %d refused in a row",
                        self._api_refused)
            self._api_refused, self._api_refused_tries = 0, _Tries()
            self._refused_held_until_ms = 0
        if result.at_capacity:
            # As long as its Retry-After says, past the next tick at least (a hold of one
            # interval ends on it); CAPACITY_HOLD_MS without one.
            hold_ms = (CAPACITY_HOLD_MS if result.retry_after_s is None
                       else max(2 * self.pool.interval_ms, int(result.retry_after_s * 1000)))
            self._capacity_held_until_ms = now_ms + hold_ms
            self._trouble.warning(
                "api-full", "the Node API is at its capacity (%s): creates held for %.0fs%s "
                "(its quota is under the pool's max_nodes, or other clients hold it)",
                result.detail, hold_ms / 1000,
                "" if result.retry_after_s is None else ", as its Retry-After asks")

    def _api_answered(self, call: str) -> None:
        """Any answer of the Node API (a create's, a delete's, a list's) ends a hold."""
        if self._api_down:
            log.warning("the Node API answers again (%s), after %d creates failed in a row",
                        call, self._api_down)
            self._api_down, self._api_down_tries = 0, _Tries()
            self.metrics.creates_held.set(0)

    def _say_if_capped(self, decision: Decision) -> None:
        """A warning (rate-limited) when max_nodes keeps the pool below its target."""
        numbers = decision.numbers
        try:
            short = int(numbers["target"]) - int(numbers["spare"]) - len(decision.reservations)
            at_cap = int(numbers["total"]) + len(decision.reservations) >= self.pool.max_nodes
        except (KeyError, TypeError, ValueError):
            return
        if short > 0 and at_cap:
            self._trouble.warning(
                "max-nodes", "max_nodes (%d) keeps the pool %d node(s) below its target: %s",
                self.pool.max_nodes, short, decision.reason)

    async def refresh_gauges(self, now: int) -> None:
        snap = await self.scripts.snapshot(now, self.pool.window_ms)
        for state in ("ready", "booting", "allocated", "terminating"):
            self.metrics.nodes.labels(state).set(snap.counts[state])
        self.metrics.nodes.labels("creating").set(
            max(0, snap.counts["pending"] - snap.counts["unclaimed"]))
        for state in ("waiting", "allocated", "active", "engaged"):
            self.metrics.users.labels(state).set(snap.counts[state])
        self.metrics.longest_session.set(snap.longest_session_s(now))
        self.metrics.longest_wait.set(snap.longest_wait_s(now) or 0.0)  # unknown: 0
        self.metrics.values_repaired.set(snap.stat("values_repaired"))
        check = snap.forecast_check()
        for quantity, value in check.quantities().items():
            self.metrics.forecast_check.labels(quantity).set(value)
        for quantity, count in snap.scaling().as_dict().items():
            self.metrics.scaling.labels(quantity).set(count)
        decided = snap.last_decision()
        for quantity in self._decision_quantities - decided.keys():
            # gone from the last decision (the heuristic policy, a hand edit): no stale value
            self.metrics.last_decision.remove(quantity)
        for quantity, value in decided.items():
            self.metrics.last_decision.labels(quantity).set(value)
        self._decision_quantities = set(decided)

    async def _still_reserved(self, reservation: str) -> bool:
        """Whether the reservation is still in the quota, and outlives the longest the call
        may take. A POST sent after its reservation lapsed (the process stalled between the
        decision and the call, past --create-timeout) made a node beside the one another tick
        made in its place, and took a review's pool past max_nodes; so did one sent with 15 s
        left, whose call took 20. Neither is sent: the reservation is given back (`withdrawn`),
        and the next decision asks again. `run` asks a create timeout CREATE_SLACK_S over the
        call's longest, so that only a stall withdraws one (a second review: a timeout just
        over it withdrew nearly every create); a Node API of no HTTP (the replay's) takes no
        time. A read that fails sends the create all the same: its reservation was made this
        tick, and a stall is the rare case."""
        try:
            deadline = await self.redis.zscore(self.keys.key("pending"), reservation)
        except (RedisError, OSError) as exc:
            log.debug("create %s: its reservation not read (%s); sent", reservation, exc)
            return True
        longest_ms = 1000 * float(getattr(self.node_api, "longest_create_s", 0.0))
        # Never more than a stall of CREATE_SLACK_S withdraws: a replica built in code (run
        # refuses it) with a create timeout under the call's longest withdrew every create (a
        # review).
        due_ms = min(longest_ms, 1000 * (self.pool.create_timeout_s - CREATE_SLACK_S))
        left_ms = None if deadline is None else deadline - self.clock.now_ms()
        if left_ms is not None and left_ms > max(0.0, due_ms):
            return True
        await self.scripts.cancel_create(reservation, "withdrawn")
        log.warning("create %s not sent: its reservation %s (the replica was held up between "
                    "its decision and the call); the next decision asks again", reservation,
                    "lapsed" if left_ms is None or left_ms <= 0 else
                    f"has {left_ms / 1000:.1f}s left, and the call may take "
                    f"{longest_ms / 1000:.1f}s")
        return False

    async def _create(self, reservation: str) -> None:
        if not await self._still_reserved(reservation):
            return
        asked = self.clock.now_ms()
        result = await self.node_api.create()
        now = self.clock.now_ms()
        # The boot the node teaches is timed from here, the call's latency included, unless the
        # call outlasted its reservation (retries through an outage, a stalled process): that
        # is no lead time of a boot, and it is timed from the pool's first record instead.
        asked_ms = asked if now - asked <= self.pool.create_timeout_s * 1000 else None
        unusable = (result.outcome is CreateOutcome.CREATED
                    and not events.ID_PATTERN.match(result.node_id))
        # An id the pool cannot take is a refusal for the hold: the next node would be named
        # the same way, and made and deleted for nothing.
        self._create_answered(dataclasses.replace(
            result, refused=True, detail=f"a node named {result.node_id[:80]!r}, an id the pool "
            "cannot take") if unusable else result, now, asked)
        if unusable:
            # A node the pool could never hear of (its status would be refused): deleted at
            # once, and its reservation given back so a tick can create another once the hold
            # is over.
            self.metrics.errors.labels("unusable_id").inc()
            log.error("create %s: the Node API named the node %r, an id the pool cannot take; "
                      "deleting it", reservation, result.node_id[:80])
            await self.scripts.cancel_create(reservation, "unusable")
            await self._delete_orphan(result.node_id)
            return
        if result.outcome is CreateOutcome.CREATED:
            registered = await self.scripts.register_node(now, reservation, result.node_id,
                                                         asked_ms)
            level = logging.INFO if registered.code is not Registration.LATE else logging.WARNING
            log.log(level, "created node %s for %s: %s", result.node_id, reservation,
                    registered.code.name.lower())
        elif result.outcome is CreateOutcome.FAILED:
            await self.scripts.cancel_create(reservation)
            log.warning("create %s failed: %s", reservation, result.detail)
        else:
            # The node may exist: keep counting the reservation until its deadline; the node,
            # if it exists, is adopted through node:status or reconciliation.
            log.warning("create %s uncertain (%s): reservation kept until its deadline",
                        reservation, result.detail)

    async def _terminate(self, termination: Termination) -> None:
        outcome = await self.node_api.delete(termination.node_id)
        now = self.clock.now_ms()
        if outcome is not DeleteOutcome.FAILED:
            self._api_answered("a delete")
        if outcome is DeleteOutcome.SENT:
            await self.scripts.confirm_terminate(
                now, termination.node_id, "sent", now + int(self.pool.delete_timeout_s * 1000))
        elif outcome is DeleteOutcome.GONE:
            await self.scripts.confirm_terminate(now, termination.node_id, "gone", now)
        else:
            log.warning("delete %s failed; retrying in %ds", termination.node_id,
                        DELETE_RETRY_MS // 1000)
            await self.scripts.confirm_terminate(now, termination.node_id, "failed",
                                                 now + DELETE_RETRY_MS)

    async def settle(self) -> None:
        """Wait for every Node API call this replica started (the replay benchmark runs each
        tick's actions to completion before moving virtual time on)."""
        while self._actions:
            await asyncio.gather(*list(self._actions))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guard(work))
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)
        return task

    async def _guard(self, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except RedisError as exc:
            # The server dropped, or refused for now, between the Node API's answer and the
            # script that records it (a traceback before, for an outage the deadlines already
            # cover). A script's own error is a bug, and keeps its traceback.
            self.metrics.errors.labels("action").inc()
            if not (isinstance(exc, RedisConnectionError | RedisTimeoutError)
                    or _refuses_writes(exc)):
                log.exception("node action failed")
                return
            if _refuses_writes(exc):
                self._note_refused(exc)
            self._trouble.warning(
                "action", "a node action's outcome could not be recorded (%s): a create's "
                "reservation lapses at its deadline and its node is adopted on node:status or "
                "by reconciliation; a termination is sent again once its deadline passes",
                str(exc) or type(exc).__name__)
        except Exception:
            self.metrics.errors.labels("action").inc()
            log.exception("node action failed")

    # --- reconciliation -----------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int] | None:
        """Compare the pool with the Node API's list and repair both ways; None when the API
        gave no list (unreachable, an error, not a list of nodes): nothing was compared.

        Nodes the API holds and the pool does not know are adopted (a create whose answer and
        status were both lost); nodes the pool believes alive that the API does not list, or
        lists as terminating or terminated, are ended (a lost `terminated`); a node the pool
        still calls booting that the API calls ready is made ready (a lost `ready`: a user
        would wait beside it); nodes the pool ended that the API still runs are deleted again,
        and so are nodes whose id the pool cannot take (it would never hear of them). Only
        nodes older than a grace period are judged missing, so a create in flight is not
        mistaken for a leak: those younger the API does not list are counted, LEFT_FOR_LATER
        (a reconcile an operator runs at once after a restart of the Node API did nothing to
        them, and said nothing of it, a helper's audit found).
        """
        counts = {"adopted": 0, "vanished": 0, "redeleted": 0, "made_ready": 0,
                  "unusable_deleted": 0, LEFT_FOR_LATER: 0}
        started = self.clock.now_ms()
        listed = await self.node_api.list_nodes()
        if listed is None:
            return None
        self._api_answered("the node list")
        grace_ms = int(self.pool.create_timeout_s * 1000)
        api_states: dict[str, str] = {}
        for node in listed:
            if events.ID_PATTERN.match(node.node_id):
                api_states[node.node_id] = node.state
            elif node.state not in ENDING:
                counts["unusable_deleted"] += 1
                self.metrics.errors.labels("unusable_id").inc()
                log.error("reconcile: the Node API runs node %r, whose id the pool cannot take; "
                          "deleting it", node.node_id[:80])
                self._spawn(self._delete_orphan(node.node_id))
        # The three sets read at once, in one round trip and one consistent view.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrange(self.keys.key("nodes"), 0, -1, withscores=True)
            pipe.zrange(self.keys.key("booting"), 0, -1)
            pipe.zrange(self.keys.key("terminating"), 0, -1)
            pairs, booting_ids, terminating_ids = await pipe.execute()
        # Scores as floats: one edited by hand to inf stopped every reconciliation (a review;
        # int(inf) raises), and after a loss of the state, every tick with it.
        known_ids = {as_text(k): float(v) for k, v in pairs}
        booting = {as_text(k) for k in booting_ids}
        # Nodes the pool is deleting itself: the API calling them terminating is their DELETE
        # arriving, and their `terminated` (or the DELETE's retry) ends them.
        deleting = {as_text(k) for k in terminating_ids}
        now = self.clock.now_ms()
        for node_id, state in api_states.items():
            if node_id in known_ids:
                if state == "ready" and node_id in booting:
                    result = await self.scripts.apply_node_status(now, node_id, "ready",
                                                                  listed=True)
                    self._served(result.served)  # counted as a listener's would be (a review)
                    if result.code is NodeStatusOutcome.READY:
                        counts["made_ready"] += 1
                        log.warning("reconcile: node %s is ready at the Node API but was "
                                    "booting in the pool (its ready lost, or not come yet); "
                                    "made ready", node_id)
                continue
            if state in ENDING:
                continue
            record_state = as_text(await self.redis.hget(self.keys.node(node_id), "state"))
            if record_state == "terminated":
                counts["redeleted"] += 1
                log.warning("reconcile: node %s ended in the pool but alive at the API; "
                            "deleting it again", node_id)
                self._spawn(self._delete_orphan(node_id))
                continue
            status = "ready" if state == "ready" else "booting"
            # Listed, not received: stamped now, perhaps an interval after its create, it
            # teaches no boot time (origin `listed`).
            result = await self.scripts.apply_node_status(now, node_id, status, listed=True)
            self._served(result.served)  # counted as a listener's would be (a review)
            if result.code is NodeStatusOutcome.NEW:
                counts["adopted"] += 1
                log.warning("reconcile: adopted node %s (%s) that the pool did not know",
                            node_id, state)
        # Younger than the grace when the list was asked for: a create perhaps still on its
        # way to the API's list. Created since, it cannot be in it: a replica paused between
        # the list's answer and this (a GC, a frozen VM) ended 8 healthy nodes booted
        # meanwhile, and deleted them at the API (a review's drill). One stamped further ahead
        # than the grace from now is a clock's error, not a create (a replica 600 s ahead kept
        # 11 vanished nodes in the pool, 5 of them allocated, for 9 min).
        young = [node_id for node_id, created in known_ids.items()
                 if node_id not in api_states and started - grace_ms < created <= now + grace_ms]
        # But one the pool had heard `ready` for before the list was asked for is no create on
        # its way to the list: the API said it had booted it. After a restart of the Node API
        # that lost its nodes, such nodes were left for later, and the users of the older nodes
        # this pass ended were handed them at once, as dead (a drill: two users served "after
        # 0.0s" by nodes gone 30 s before, taken back a reconciliation later).
        left_for_later = set(young)
        if young:
            async with self.redis.pipeline(transaction=False) as pipe:
                for node_id in young:
                    pipe.hget(self.keys.node(node_id), "ready_ms")
                stamps = await pipe.execute()
            for node_id, stamp in zip(young, stamps, strict=True):
                try:
                    # by more than two replicas' clocks may differ unwarned (the stamp is
                    # the clock of the replica that applied the ready)
                    if stamp is not None and (float(as_text(stamp))
                                              < started - CLOCK_OFFSET_WARN_S * 1000):
                        left_for_later.discard(node_id)
                except ValueError:
                    pass
        ending: list[tuple[str, str | None]] = []
        for node_id in known_ids:
            api_state = api_states.get(node_id)
            if node_id in left_for_later:
                counts[LEFT_FOR_LATER] += 1
                continue
            if api_state is not None and (api_state not in ENDING or (
                    api_state == "terminating" and node_id in deleting)):
                continue
            ending.append((node_id, api_state))
        if len(ending) > 1:
            # The free nodes first: an allocated node's user goes back to the head of the
            # queue and is served by the next ready node, which was one this pass ended a
            # moment later (a drill after a restart of the Node API: a `user:allocated` for
            # a node gone, then the user queued again).
            async with self.redis.pipeline(transaction=False) as pipe:
                for node_id, _ in ending:
                    pipe.hget(self.keys.node(node_id), "state")
                states = await pipe.execute()
            ending = [item for item, _ in sorted(
                zip(ending, states, strict=True),
                key=lambda pair: as_text(pair[1]) == "allocated")]
        for node_id, api_state in ending:
            result = await self.scripts.apply_node_status(now, node_id, "terminated")
            self._served(result.served)  # counted as a listener's would be (a review)
            if result.code is NodeStatusOutcome.TERMINATED:
                counts["vanished"] += 1
                log.warning("reconcile: node %s is %s at the Node API; declared terminated",
                            node_id, api_state or "not listed")
        return counts

    async def _delete_orphan(self, node_id: str) -> None:
        await self.node_api.delete(node_id)

    # --- running ------------------------------------------------------------------------------

    async def listen(self) -> None:
        """Subscribe and apply the messages in arrival order, subscribing again after a lost
        connection. Reading and applying go on side by side: the messages read wait in a
        backlog (up to --event-backlog) for `_apply_backlog`. So while the server refuses this
        replica's writes for now (out of memory, read-only; a batch is held for --event-hold
        from its reading), the listener keeps reading, and the messages published meanwhile
        wait in this process, not in the server's output buffer for the subscription, whose
        limit (8 MB for a minute, by default) would cut it and lose them. Once stopping, what
        was read is applied while the server takes it (each batch tried once) before the
        listener ends."""
        self._reading_done = False
        applier = asyncio.create_task(self._apply_backlog(), name="apply")
        try:
            await self._read()
        except asyncio.CancelledError:
            # Cancelled mid-read (run's finally: serve cancelled, an embedding's wait_for):
            # the applier ends with it, not awaited with no bound (a call the server leaves
            # unanswered held the cancelled listener as long as the server did).
            applier.cancel()
            raise
        finally:
            self._reading_done = True
            self._backlog_added.set()
            try:
                # Bounded by run's grace, which cancels the listener and with it this wait.
                await applier
            finally:
                if not applier.done():
                    applier.cancel()
                    await asyncio.gather(applier, return_exceptions=True)
                left = self._events_among(self._backlog)
                if left:
                    log.warning("stopped with %d messages read and not applied (dropped): the "
                                "other replicas apply them", left)
                cut = self._events_among(self._taken)
                if cut:
                    log.warning("stopped with %d more in a batch cut off mid-call: whether the "
                                "server applied them is not known", cut)
                self._backlog.clear()
                self._taken = []

    async def _read(self) -> None:
        """The listener's reading: subscribe, add what comes to the backlog, subscribe again
        after a lost connection, until stopping. A stop before a lost subscription was made
        again ends its gap there."""
        self._lost_at = None
        try:
            await self._read_on()
        finally:
            self._end_gap("stopped %.1fs after the subscription was lost, not subscribed "
                          "again: events published in that time did not reach this replica")

    def _end_gap(self, said: str) -> None:
        """The unsubscribed gap since the subscription was lost (`_lost_at`), if it was,
        counted and `said` with its length in seconds."""
        if self._lost_at is not None:
            gap = time.monotonic() - self._lost_at
            self.metrics.unsubscribed.inc(gap)
            log.warning(said, gap)
            self._lost_at = None

    async def _read_on(self) -> None:
        """`_read`'s loop, `_lost_at` set when a subscription is lost."""
        backoff = 0.2
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub()
            channels = (*events.SUBSCRIBED, self.probe_channel)
            self._confirmed = 0
            try:
                await pubsub.subscribe(*channels)
                # Probes sent on the last subscription and not read never come back; those
                # read into the backlog do, behind it, and time it (a review: forgotten, a
                # listener 3 s behind read 0 s and /readyz said ready).
                read = self._probes_read()
                self._probes_out = deque(sent for sent in self._probes_out if sent in read)
                self._probes_published = {sent: at for sent, at in
                                          self._probes_published.items() if sent in read}
                if not self._backlog:
                    self._last_lag_s = 0.0
                backoff = 0.2
                last_read = asked_at = time.monotonic()
                suspect = False
                while not self.stopping.is_set():
                    batch = await self._read_batch(pubsub)
                    # Subscribed once the server has confirmed every channel, not once the
                    # SUBSCRIBE is sent: a message published in between does not reach this
                    # replica, and a test publishing at `subscribed` may have lost one so.
                    if self._confirmed >= len(channels) and not self.subscribed.is_set():
                        self.subscribed.set()
                        # Deaf until now, not until the SUBSCRIBE went out: a try whose
                        # connection ended before its confirmation, never subscribed, is part
                        # of the gap (counted from the send, it was left out, and the gap
                        # after it with it).
                        self._end_gap("subscribed again after %.1fs: events published in "
                                      "that time did not reach this replica")
                    if batch:
                        last_read, suspect = time.monotonic(), False
                    elif (silent := self._silent_since(last_read, asked_at)) is not None:
                        # A loop or process frozen past the silence allowed wakes with bytes
                        # that came meanwhile, and its read's timer, queued before the socket
                        # is looked at, may win: the next read takes them without a wait.
                        # Reviews proved a read at once lost to its own timer too, with no
                        # wait and with 50 ms, and a live listener and a connect with it. Once
                        # a silence: bytes that stay are a reply cut off, the connection dead
                        # (a confirmation cut off too: the pure-Python parser's buffer held it,
                        # and the listener, for good).
                        since, confirmed = silent
                        if suspect or not await _bytes_waiting(pubsub):
                            raise SubscriptionSilent(time.monotonic() - since, since, confirmed)
                        suspect = True
                    else:
                        suspect = False
                    if batch:
                        # A payload past MAX_PAYLOAD_BYTES is rejected as too large when
                        # applied: the bytes that say so are all it needs, and the backlog,
                        # bounded by its count, holds no more of it (a review: 400 messages
                        # of 64 KiB held 13 MB of the replica's memory at 200 read ahead).
                        read_at = time.monotonic()
                        self._backlog.extend((channel, data[:events.MAX_PAYLOAD_BYTES + 1],
                                              read_at) for channel, data in batch)
                        self._backlog_added.set()
                    if len(self._backlog) >= self.service.event_backlog:
                        await self._wait_for_room()
                        # Not read meanwhile by choice: no silence of the connection's.
                        last_read, suspect = time.monotonic(), False
            except Exception as exc:
                if self.subscribed.is_set():
                    # A silent connection lost its messages from the last one it carried.
                    self._lost_at = exc.since if isinstance(exc, SubscriptionSilent) else (
                        time.monotonic())
                self.subscribed.clear()
                self.metrics.errors.labels("subscribe").inc()
                # Taken for silent, the server answered a probe's PUBLISH: it is reachable,
                # and each moment waited is one whose events are lost (a review: 0.2 s).
                wait_s = 0.0 if isinstance(exc, SubscriptionSilent) else backoff
                if isinstance(exc, RedisError | OSError):
                    self._trouble.warning("subscribe", "subscription lost (%s); retrying in "
                                          "%.1fs", exc, wait_s)
                else:
                    # A bug, or a library's error of another kind: logged with its traceback,
                    # and subscribed again as after a lost connection (it ended the listener
                    # for good before, in silence: run's gather swallowed the error).
                    self._trouble.exception("listen", "the listener failed; subscribing again "
                                            "in %.1fs", wait_s)
                if wait_s:
                    await sleep_unless(self.stopping, wait_s)
                    backoff = min(backoff * 2, SUBSCRIBE_BACKOFF_MAX_S)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    # untyped before redis 8.2, typed from it on: either passes the check
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    def _events_among(self, read: Iterable[tuple[bytes, bytes, float]]) -> int:
        """How many of the messages `read` are events, not this replica's probes."""
        return sum(channel not in self._probe_names for channel, _, _ in read)

    def _probes_read(self) -> set[float]:
        """The probes read and not yet seen back: in the backlog, or in the batch the applier
        took from it."""
        read: set[float] = set()
        for channel, data, _ in itertools.chain(self._taken, self._backlog):
            if channel in self._probe_names:
                with contextlib.suppress(ValueError):
                    read.add(float(data))
        return read

    async def _wait_for_room(self) -> None:
        """Wait, reading nothing, until the backlog is under --event-backlog or stopping: the
        server holds what comes meanwhile, up to its output-buffer limit for pub/sub."""
        self.metrics.errors.labels("event_backlog_full").inc()
        self._trouble.warning(
            "event-backlog-full", "%d messages read and not applied (--event-backlog): reading "
            "waits for the server to take writes again; it holds what comes meanwhile up to "
            "its client-output-buffer-limit for pub/sub, past which it drops this replica's "
            "subscription and the messages in it", len(self._backlog))
        while (len(self._backlog) >= self.service.event_backlog
               and not await sleep_unless(self.stopping, BACKLOG_FULL_WAIT_S)):
            pass

    async def _apply_backlog(self) -> None:
        """Apply the backlog in arrival order, up to LISTEN_BATCH messages a round trip, until
        the reading is done and nothing is left; each probe taken once the messages read before
        it are applied, so that the lag it measures is the application's. Once stopping, a
        batch the server refuses, or cannot be reached for, ends it (`listen` says how many
        are left)."""
        while True:
            if not self._backlog:
                if self._reading_done:
                    return
                self._backlog_added.clear()
                await self._backlog_added.wait()
                continue
            if self.stopping.is_set() and (self._refused is not None or self._unreached):
                return
            # While the server refuses writes, a batch is held from its first message's
            # reading: one read later, taken with it, would be dropped at that deadline,
            # short of its own hold. So only the messages of one reading are taken then.
            first_read = self._backlog[0][2]
            self._taken = []
            dropped = self._dropped_read(first_read)
            while self._backlog and len(self._taken) < LISTEN_BATCH and (
                    self._refused is None or self._backlog[0][2] == first_read) and (
                    self._dropped_read(self._backlog[0][2]) == dropped):
                self._taken.append(self._backlog.popleft())
            # Cut off mid-call (cancelled; `_apply` lets nothing else out), the batch stays in
            # `_taken` for `listen` to count, not taken out unsaid.
            read_at = self._taken[0][2]
            probes = [data for channel, data, _ in self._taken if channel in self._probe_names]
            batch = [(channel, data) for channel, data, _ in self._taken
                     if channel not in self._probe_names]
            if batch:
                await self._apply(batch, read_at)
            for data in probes:
                self._probe_seen(data)
            self._taken = []

    def _looks_silent(self, last_read: float) -> bool:
        """Whether a probe the server took (its PUBLISH answered) has been on its
        way for the silence allowed (twice --max-event-lag, five heartbeats at least) and
        nothing at all has come since it was sent: a listener behind a backlog reads messages
        all the while, and a paused server answers no PUBLISH until it runs again, then
        delivers; a dead connection carries nothing. Its lag probes had kept the replica
        unready and the listener deaf until it was stopped (a review's drill: 90 s and
        counting)."""
        # The oldest sent since the last read: one sent before it may have been on its way
        # when the connection died (a listener behind the stream reads what was published
        # before its newest probe), and would hide every later probe (a review).
        oldest = next((sent for sent in self._probes_out
                       if sent > last_read and sent in self._probes_published), None)
        if oldest is None:
            return False
        return time.monotonic() - self._probes_published[oldest] > self._silence_allowed_s()

    def _silent_since(self, last_read: float, asked_at: float) -> tuple[float, bool] | None:
        """Since when (monotonic) the subscription has carried nothing a live one would, and
        whether the server had confirmed it; None while it may be live. Confirmed: from the
        last read, once a probe sent since is overdue (`_looks_silent`). Unconfirmed: from the
        SUBSCRIBE, past twice the silence allowed (CONFIRM_WAIT_MIN_S at least), as no probe
        goes out before the confirmation (`probe_lag` waits for `subscribed`), so
        `_looks_silent` never arms: a path dead between the SUBSCRIBE and its confirmation
        left the listener deaf, and unready, for good."""
        if self._looks_silent(last_read):
            return last_read, True
        if (not self.subscribed.is_set() and time.monotonic() - asked_at
                > max(2 * self._silence_allowed_s(), CONFIRM_WAIT_MIN_S)):
            return asked_at, False
        return None

    def _silence_allowed_s(self) -> float:
        """How long a live subscription may carry nothing: twice --max-event-lag, five
        heartbeats at least."""
        return max(2 * self.service.max_event_lag_s, 5 * self.service.heartbeat_interval_s)

    async def _apply(self, batch: list[tuple[bytes, bytes]], read_at: float) -> None:
        """`handle_many` for the listener (`read_at`: when the batch's first message was read):
        should it fail all the same (a bug), the batch is counted, logged with the traceback and
        dropped, and the listener goes on."""
        try:
            await self.handle_many(batch, read_at)
        except Exception:
            self.metrics.errors.labels("event").inc()
            self._trouble.exception("apply", "could not apply a batch of %d messages (dropped)",
                                    len(batch))

    async def _read_batch(self, pubsub: Any) -> list[tuple[bytes, bytes]]:
        """The next message (waiting up to half a second for one) and those already read
        behind it, up to LISTEN_BATCH: under a burst they are applied in one round trip, and
        one at a time when they trickle in."""
        batch: list[tuple[bytes, bytes]] = []
        message = await pubsub.get_message(timeout=0.5)
        while message is not None:
            kind = message.get("type")
            if kind == "message":
                batch.append((message["channel"], message["data"]))
            elif kind == "subscribe" and isinstance(message.get("data"), int):
                # the server's confirmation, with how many channels the connection now holds
                self._confirmed = max(self._confirmed, message["data"])
            if len(batch) >= LISTEN_BATCH:
                break
            message = await pubsub.get_message(timeout=0.0)
        return batch

    # --- the listener's lag ----------------------------------------------------------------

    async def _twin_beat(self) -> bool:
        """Whether another process beat under this replica's id since this one's last
        heartbeat (its `instance` in the entry). Each keeps its mark of the last connect or
        disconnect it applied under the id (`applied`), so each overwrites the other's, and a
        call made again after a lost reply is no longer known for one that ran: it is applied
        twice. (A process restarted under the id of one gone is no twin: its first heartbeat is
        not looked at; nor is an older copy of the state put back, whose entry is an earlier
        process's: the heartbeat sees that loss, and says it instead.)"""
        try:
            said = await self.redis.hget(self.keys.key("replica_info"), self.replica_id)
            other = jsontext.loads(said).get("instance") if said is not None else None
        except (ResponseError, ValueError, AttributeError):
            # An entry edited by hand is no sign of a twin; a key of another type the heartbeat
            # script names, as every script does (a review: this read's bare WRONGTYPE came
            # first).
            return False
        return isinstance(other, str) and other != self._instance

    def _say_twin(self) -> None:
        self.metrics.errors.labels("replica_id_shared").inc()
        self._trouble.warning(
            "twin", "another process runs as replica %r (it beat since this one's last "
            "heartbeat): each overwrites the other's marks in `applied`, so a connect or "
            "disconnect made again after a lost reply may be applied twice; give each "
            "replica its own --replica-id", self.replica_id)

    async def heartbeat(self) -> None:
        """Probe the listener's lag (`probe_lag`) and record this replica in the pool, with
        that lag, so `provisioner status` lists the replicas. Forgets replicas silent for
        FORGET_REPLICA_MS."""
        began = asyncio.get_running_loop().time()
        await self.probe_lag()
        try:
            await self.look_for_other_pools()
        except (RedisError, OSError):
            raise  # the server is gone: the heartbeat's own call would fail the same way
        except Exception:  # a bug in the look costs the look, never the heartbeat
            self.metrics.errors.labels("other_pools").inc()
            self._trouble.exception("other-pools", "could not look for other pools on this "
                                    "server; the heartbeat goes on")
        try:
            await self.look_at_eviction()
        except Exception as exc:  # a read: the heartbeat's own write says if the server is gone
            self.metrics.errors.labels("eviction").inc()
            self._trouble.warning("eviction", "could not read the server's INFO memory (%s); "
                                  "the heartbeat goes on", exc)
        info: dict[str, Any] = {
            "lag_s": round(self.event_lag_s(), 3), "subscribed": self.subscribed.is_set(),
            "started_ms": self._started_ms,
            "interval_s": self.service.heartbeat_interval_s, "scripts": scripts_fingerprint(),
            # its heartbeats are kept in `beats`, which judge_gap.lua reads: a replica of a
            # release before says nothing, and no gap is judged a pause while it is listed
            "keeps_beats": True,
            "settings": self.settings_digest,
            "unsubscribed_s": round(self.metrics.registry.get_sample_value(
                "provisioner_unsubscribed_seconds_total") or 0.0, 3)}
        if self._clock_offset_s is not None:  # the last heartbeat's
            info["clock_offset_s"] = round(self._clock_offset_s, 3)
        if self.other_pools:
            info["other_pools"] = self.other_pools
        if self.server_evicts:
            info["server_evicts"] = self.server_evicts
        if self._taking_back:  # `provisioner status` says it holds its decisions
            info["taking_back"] = True
        info["instance"] = self._instance
        # beaten before: the entry is this process's, unless shared
        twin = bool(self._heartbeats[0]) and await self._twin_beat()
        sent, sent_at = self.clock.now_ms(), time.monotonic()
        beat = await self.scripts.heartbeat(self.replica_id, info, FORGET_REPLICA_MS)
        epoch, server_ms = beat.epoch, beat.server_ms
        self._server_clock = (server_ms, (sent_at + time.monotonic()) / 2)
        self._written()
        self._clock_offset_s = ((sent + self.clock.now_ms()) / 2 - server_ms) / 1000
        self.metrics.clock_offset.set(self._clock_offset_s)
        if abs(self._clock_offset_s) > CLOCK_OFFSET_WARN_S:
            self._trouble.warning(
                "clock", "this replica's clock is %.1fs %s the Redis server's: it stamps every "
                "transition it applies, so activity is judged old or new by it, and boots and "
                "sessions are timed by it; synchronise the clocks (NTP)",
                abs(self._clock_offset_s),
                "ahead of" if self._clock_offset_s > 0 else "behind")
        # Taken before acting on it: a reconciliation that fails does not count the loss twice.
        seen, self._epoch = self._epoch, epoch
        counted, self._heartbeats = self._heartbeats, (beat.count_since, beat.count)
        lost = ""
        if seen and epoch != seen:
            lost = (f"was lost: its epoch went from {seen} to {epoch} since this replica's "
                    "last heartbeat")
        elif seen and counted[0] == beat.count_since and beat.count <= counted[1]:
            # The same epoch, and fewer heartbeats than this replica's last one saw: the state
            # was put back from an older copy (a snapshot, a replica promoted before it caught
            # up). What changed since that copy is gone, the sessions begun since among it.
            lost = (f"was put back from an older copy: it counts {beat.count} heartbeats, "
                    f"where this replica's last heartbeat counted {counted[1]}")
        if twin and not lost:
            self._say_twin()
        if lost:
            self._state_lost(lost)
        if self._taking_back:
            # At once, not at the next interval, and before this replica's ticks decide on the
            # new epoch: until the nodes are back, the pool looks empty. Retried at the next
            # heartbeat if it raises or the Node API gives no list, for TAKE_BACK_PATIENCE_MS
            # where the API has none, TAKE_BACK_FAILING_PATIENCE_MS where it fails to give it
            # (an API failing must not let the ticks boot a pool beside the nodes; one without
            # a list must not stop scaling for good). In a task of its own, waited for only
            # until this heartbeat's interval is up: a list that takes longer (the API's
            # timeout times its attempts) ends the hold when it comes, and the heartbeats go on
            # meanwhile, one take-back at a time.
            await self.publish_config()
            if self._take_back_task is None or self._take_back_task.done():
                self._take_back_task = asyncio.create_task(self._take_back(), name="take-back")
            left_s = self.service.heartbeat_interval_s - (
                asyncio.get_running_loop().time() - began)
            await asyncio.wait({self._take_back_task}, timeout=max(0.0, left_s))
        if self._taking_back != bool(info.get("taking_back")):
            # The hold began or ended in this heartbeat, after its entry was written: said
            # again now, not a heartbeat later, so `provisioner status` shows it as it is (a
            # review).
            if self._taking_back:
                info["taking_back"] = True
            else:
                info.pop("taking_back", None)
            again = await self.scripts.heartbeat(self.replica_id, info, FORGET_REPLICA_MS)
            self._heartbeats = (again.count_since, again.count)
            if again.count_since == beat.count_since and again.count <= beat.count:
                # The count went back between the two calls: an older copy was put back while
                # the Node API was asked. Said now: the count is the pool's, and the other
                # replicas' beats lift it past any mark before this replica's next heartbeat
                # could compare (reviews: the second call's count, kept, hid that loss; a
                # mark one above the first's hid it wherever another replica beat).
                self._state_lost(f"was put back from an older copy: it counts {again.count} "
                                 "heartbeats, where this heartbeat's first call counted "
                                 f"{beat.count}")

    async def _take_back(self) -> None:
        """The heartbeat's reconciliation after a loss (`heartbeat`): a list ends the hold,
        unless the heartbeat saw another loss meanwhile (this pass took the nodes into the
        state lost since); no list is said, and the hold ends once its patience is over. Its
        errors are the heartbeat's, counted and said as `_every` does."""
        held_before = self._taking_back_since
        try:
            counts = await self.reconcile()
        except Exception as exc:
            self._turn_failed("heartbeat", exc)
            return
        if counts is not None:
            log.warning("reconciliation after the loss: %s", counts)
            if self._taking_back_since == held_before:
                self._taking_back_since = None
        elif self._taking_back and not self._take_back_over(self.clock.now_ms()):
            # (a tick, or a reconciliation with the list, may have ended the hold while
            # this one waited for the Node API: nothing is held to be said of)
            self._trouble.warning(
                "take-back", "reconciliation after the loss had no node list from the Node "
                "API: no scaling decision until it has one (retried every heartbeat, for "
                "%.0fs at most)", self._take_back_patience_ms() / 1000)

    def _state_lost(self, how: str) -> None:
        """The pool's state was lost, or put back from an older copy (`how`): counted, said,
        and the ticks held until reconciliation takes the Node API's nodes back."""
        self.metrics.state_lost.inc()
        log.error("the pool's state in Redis %s. Sessions in progress and the nodes they hold "
                  "are unknown now; reconciliation takes every node the Node API lists back as "
                  "free (README, \"When Redis loses the pool's state\")", how)
        self._taking_back_since = self.clock.now_ms()

    async def look_for_other_pools(self) -> None:
        """Find the other pools listening on this server: the probe channels subscribed on it
        that name another pool, or this pool on another database. The wire contract's channels
        carry no pool and a server's channels are shared by its databases, so each pool applies
        every connect and `node:status` of the other (a review's drill: each took in the
        other's nodes, and both handed one node to a connect). Logged when the set changes,
        counted in `provisioner_other_pools`, and /readyz fails while there is one."""
        try:
            channels = await self.redis.pubsub_channels(f"{PROBE_PREFIX}*")
        except ResponseError as exc:  # an ACL or a proxy without PUBSUB: the heartbeat goes on
            # A setting, there until changed: said once an hour, not at every heartbeat.
            self._lasting.warning("other-pools", "could not list the server's channels (%s): "
                                  "another pool listening on this server would go unseen "
                                  "(the last look found %s)", exc,
                                  ", ".join(self.other_pools) or "none")
            return
        found: dict[str, set[int]] = {}
        for channel in channels:
            named = pool_of_probe(as_text(channel))
            if named is None:
                continue
            pool, database = named
            if pool != self.service.pool or database not in (None, self.database):
                found.setdefault(pool, set())
                if database is not None:
                    found[pool].add(database)
        # A pool whose replicas are part upgraded lists some channels with their database and
        # some without: one pool, named by the databases that are known.
        others = sorted([f"{pool!r} on database {database}" for pool, databases in found.items()
                         for database in databases]
                        + [repr(pool) for pool, databases in found.items() if not databases])
        if others and others != self.other_pools:
            log.error("another pool listens on this Redis server: %s. The events' channels "
                      "carry no pool and are shared by every database of a server, so each "
                      "pool applies the other's connects and node statuses: run each pool "
                      "against its own server (README, \"Using it\")", ", ".join(others))
        elif self.other_pools and not others:
            log.warning("no other pool listens on this Redis server now (there was %s)",
                        ", ".join(self.other_pools))
        self.other_pools = others
        self.metrics.other_pools.set(len(others))

    async def look_at_eviction(self) -> None:
        """Whether the server may delete the pool's keys to make room: a `maxmemory` with a
        `maxmemory-policy` other than noeviction (INFO memory; CONFIG is often renamed or
        refused where INFO is not). Full, such a server deletes keys in silence: any of the
        pool's under allkeys-*, under volatile-* those with a TTL (activity windows,
        first-seen times, ended nodes' records, locks and leases); under noeviction it
        refuses the writes, which the replicas see and say (/readyz). Logged when it
        changes, counted in `provisioner_server_may_evict`, said in `provisioner status`;
        the replicas go on, as the server is the operator's."""
        try:
            memory = await self.redis.info("memory")
        except ResponseError as exc:  # an ACL without INFO, a proxy: the heartbeat goes on
            memory = {}
            refused = str(exc)
        else:
            refused = "no maxmemory or maxmemory_policy in it"
        policy, limit = memory.get("maxmemory_policy"), memory.get("maxmemory")
        if not isinstance(policy, str) or not isinstance(limit, int):
            # A setting, there until changed: said once an hour, not at every heartbeat.
            self._lasting.warning("eviction", "could not read the server's INFO memory (%s): "
                                  "an eviction policy that may delete the pool's keys would "
                                  "go unseen", refused)
            self.server_evicts = ""
            self.metrics.server_may_evict.set(-1)
            return
        evicts = policy if limit > 0 and policy != "noeviction" else ""
        if evicts and evicts != self.server_evicts:
            log.error("the Redis server may delete the pool's keys to make room: maxmemory "
                      "%d bytes with maxmemory-policy %s. Full, it deletes %s in silence, and "
                      "the pool's state is corrupt; set maxmemory-policy noeviction, under "
                      "which it refuses writes instead (README, \"Using it\")", limit, policy,
                      "any of the pool's keys" if policy.startswith("allkeys")
                      else "the keys with a TTL (activity windows, first-seen times, ended "
                      "nodes' records, locks and leases)")
        elif self.server_evicts and not evicts:
            log.warning("the Redis server can no longer evict the pool's keys (maxmemory-policy "
                        "%s, maxmemory %d)", policy, limit)
        self.server_evicts = evicts
        self.metrics.server_may_evict.set(1 if evicts else 0)

    async def probe_lag(self) -> None:
        """Publish a probe (this process's monotonic time) on the replica's own channel. The
        listener reaches it behind every message published before it, so the time it takes to
        come back is how far the listener is behind the event stream (`event_lag_s`)."""
        if self.subscribed.is_set():
            sent = time.monotonic()
            # Out before it is sent: the listener may see it before PUBLISH's reply comes.
            self._probes_out.append(sent)
            try:
                await self.redis.publish(self.probe_channel, repr(sent))
            except RedisTimeoutError:
                # Its reply lost, not the probe: it may be on its way yet, behind every event
                # published while the connection carried nothing (a partition, a server
                # stopped), and the listener as far behind. It stays out, its age the lag,
                # until it or a later probe comes back, or the listener subscribes again
                # (a partition drill: forgotten, the lag read 0 through 3 minutes).
                self._report_lag()
                raise
            except BaseException:
                # If it went out after all and is back, the listener popped it already.
                with contextlib.suppress(ValueError):
                    self._probes_out.remove(sent)
                raise
            if sent in self._probes_out:  # not back yet
                self._probes_published[sent] = time.monotonic()
        self._report_lag()

    def _probe_seen(self, data: bytes | str) -> None:
        try:
            sent = float(data)
        except ValueError:
            sent = math.nan
        # Only a probe this replica sent and has not seen back counts: anything else published
        # on its channel ("-inf", a stale probe from before a resubscription) would move the lag.
        if sent not in self._probes_out:
            log.debug("ignored a message on %s that is not a probe out: %r", self.probe_channel,
                      data)
            return
        # Messages come back in the order they were published: every probe sent up to this
        # one is back too.
        while self._probes_out and self._probes_out[0] <= sent:
            self._probes_published.pop(self._probes_out.popleft(), None)
        self._last_lag_s = max(0.0, time.monotonic() - sent)
        self._report_lag()

    def event_lag_s(self) -> float:
        """The last probe's lag, or the age of the oldest probe still out if that is more (a
        listener stuck behind a backlog, or not reading at all)."""
        waiting = time.monotonic() - self._probes_out[0] if self._probes_out else 0.0
        return max(self._last_lag_s, waiting)

    async def _watch_the_loop(self) -> None:
        """Count the stalls of this replica's event loop: a wake LOOP_STALL_S or more past its
        time is as long as nothing in the process ran, the listener included. A paused process
        (SIGSTOP, a frozen container or VM) then reads the messages published meanwhile and
        applies them that late, while its lag probes, sent and timed by the same paused process
        after it wakes, come back at once (a review's drill: `docker pause` of a replica for
        100 s, its lag 0.05 s). So a stall is counted (`provisioner_loop_stalled_seconds`),
        warned of, and taken as the listener's lag until the next probe comes back."""
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            before = loop.time()
            if await sleep_unless(self.stopping, LOOP_WATCH_S):
                return
            stalled = loop.time() - before - LOOP_WATCH_S
            if stalled >= LOOP_STALL_S:
                self.metrics.loop_stalled.inc(stalled)
                self._trouble.warning(
                    "loop-stall", "this replica's event loop did not run for %.1fs (the process "
                    "paused or starved of CPU, or a call blocking the loop): the events "
                    "published meanwhile are applied that late, and a user's connect or "
                    "disconnect another replica applied in time may be applied again after the "
                    "user's next one (README, \"How replicas cooperate\")", stalled)
                if self.service.heartbeat_interval_s > 0:
                    # With no heartbeats no probe would ever come back to take it away.
                    self._last_lag_s = max(self._last_lag_s, stalled)
                    self._report_lag()

    def _report_lag(self) -> None:
        lag = self.event_lag_s()
        self.metrics.event_lag.set(lag)
        if lag > self.service.max_event_lag_s:
            self._trouble.warning(
                "event-lag", "listener %.1fs behind the event stream (over %.1fs): events are "
                "applied late by this replica; the server drops its subscription if the backlog "
                "outgrows its output-buffer limit", lag, self.service.max_event_lag_s)

    async def _every(self, seconds: float, work: Any, where: str,
                     after: asyncio.Event | None = None) -> None:
        """Run `work` every `seconds` until stopping (its errors counted and logged), the first
        time once `after` is set, if given."""
        loop = asyncio.get_running_loop()
        if after is not None:
            waits = [asyncio.ensure_future(after.wait()),
                     asyncio.ensure_future(self.stopping.wait())]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in pending:
                wait.cancel()
        while not self.stopping.is_set():
            started = loop.time()
            try:
                await work()
            except Exception as exc:
                self._turn_failed(where, exc)
            delay = max(0.0, seconds - (loop.time() - started))
            await sleep_unless(self.stopping, delay)

    def _turn_failed(self, where: str, exc: Exception) -> None:
        """A loop's turn that raised `exc` (called where it is caught): counted and said."""
        self.metrics.errors.labels(where).inc()
        if not isinstance(exc, RedisError):
            log.exception("%s failed", where)
            return
        self._trouble.warning(where, "%s failed: %s", where, exc)
        if _refuses_writes(exc):
            self._note_refused(exc)
        elif isinstance(exc, RedisTimeoutError) and where in WRITING_LOOPS:
            # A write left unanswered (CLIENT PAUSE WRITE, a server stuck writing) while
            # reads, PING among them, are answered: /readyz said ready through a review's
            # 10 s pause in which every tick and heartbeat timed out.
            self._note_refused(RedisTimeoutError(f"no answer to its {where} ({exc})"))

    async def _reconcile_if_due(self) -> None:
        interval_ms = int(self.service.reconcile_interval_s * 1000)
        # A replica's first turn on a state begun less than the take-back's patience ago
        # (lost, or new) reconciles itself, whoever holds the lock, and holds its ticks as one
        # that saw the loss does while it has no node list: one started during another's hold
        # (a crash, a rolling upgrade) saw no loss, took its first turn for a look, and booted
        # beside the nodes the other was waiting to take back (a review). A first turn that
        # fails before it knows the state's age holds too (a review: a server still loading).
        first = not self._looked.is_set() and self.service.heartbeat_interval_s > 0
        young, age_ms, listed = first, 0, False  # young until its age says otherwise
        # A loss the heartbeat sees while this pass runs holds the ticks anew: this pass read
        # the old state's nodes, and took none of them into the new one.
        held_before = self._taking_back_since
        try:
            if first:
                age_ms = await self._state_age_ms()
                young = age_ms < TAKE_BACK_FAILING_PATIENCE_MS
            # One replica per interval: a plain SET NX PX, coordination rather than pool state.
            if young or await self.redis.set(self.keys.reconcile_lock, self.replica_id, nx=True,
                                             px=interval_ms):
                counts = await self.reconcile()
                listed = counts is not None
                if listed and self._taking_back_since == held_before:
                    self._taking_back_since = None  # the nodes are back, whoever held
                if counts and any(n for what, n in counts.items() if what != LEFT_FOR_LATER):
                    log.warning("reconciliation repaired the pool: %s", counts)
        finally:
            if young and not listed and not self.node_api.has_no_list:
                self._taking_back_since = self.clock.now_ms() - age_ms
                log.warning("the pool's state began %.0fs ago and this replica's first "
                            "reconciliation had no node list: no scaling decision until it "
                            "has one (retried every heartbeat, until %.0fs from the state's "
                            "beginning)", age_ms / 1000, TAKE_BACK_FAILING_PATIENCE_MS / 1000)
            self._looked.set()

    async def _state_age_ms(self) -> int:
        """How long ago the pool's state began (its epoch, by the server's clock): 0 for a
        state no heartbeat has begun yet; "long ago" (an hour past any patience) for an epoch
        that is not a time or is ahead of the server's, which only a hand edit writes: every
        start would be a young state's otherwise, and the heartbeat's SET NX never mends it
        (a review)."""
        raw = as_text(await self.redis.get(self.keys.key("epoch")))
        if not raw:
            return 0
        began = raw.partition("-")[0]
        now = await server_now_ms(self.redis)
        if not began.isdigit() or int(began) > now:
            return TAKE_BACK_FAILING_PATIENCE_MS + 3_600_000
        return now - int(began)

    @property
    def _taking_back(self) -> bool:
        """Whether this replica holds its scaling decisions until the Node API lists the nodes."""
        return self._taking_back_since is not None

    def _take_back_patience_ms(self) -> int:
        return (TAKE_BACK_PATIENCE_MS if self.node_api.has_no_list
                else TAKE_BACK_FAILING_PATIENCE_MS)

    def _take_back_over(self, now_ms: int) -> bool:
        """Whether the hold on the ticks has waited out its patience with no node list; if so
        it ends here, for the heartbeat's retry and the ticks alike, and is said once."""
        if self._taking_back_since is None:  # no hold to end
            return False
        waited_ms = now_ms - self._taking_back_since
        if waited_ms < self._take_back_patience_ms():
            return False
        log.error("no node list from the Node API in %.0fs since the pool's state was lost or "
                  "began: deciding again; the nodes come back through their status or a later "
                  "reconciliation", waited_ms / 1000)
        self._taking_back_since = None
        return True

    async def publish_config(self) -> None:
        """Publish the pool's settings for `provisioner status` and the CLI."""
        try:
            await self.redis.hset(self.keys.config, mapping={
                k: str(v) for k, v in self.pool.as_dict().items()})
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            # The server's error names no key (a review: the replica said only WRONGTYPE).
            raise ResponseError(f"{exc}: pool key {self.keys.config}, where the pool's "
                                "settings go, holds another type than a hash (an edit by "
                                "hand?); delete it, and every replica writes it again") from exc

    async def run(self) -> None:
        """Run until `stopping` is set, then finish in-flight work within the grace period."""
        await self.publish_config()
        # The first decision waits for this replica's first turn at reconciliation (done, or
        # another replica's within the interval): a pool whose state is new while the Node API
        # runs nodes (every replica restarted on an empty server, a first start beside nodes
        # left running) would otherwise boot a pool beside them before taking them in.
        if self.service.reconcile_interval_s <= 0:
            self._looked.set()
        tasks = [
            asyncio.create_task(self.listen(), name="listen"),
            asyncio.create_task(self._every(self.pool.tick_interval_s, self.tick, "tick",
                                            after=self._looked), name="tick"),
            asyncio.create_task(self._watch_the_loop(), name="loop-watch"),
        ]
        if self.service.heartbeat_interval_s > 0:
            tasks.append(asyncio.create_task(
                self._every(self.service.heartbeat_interval_s, self.heartbeat, "heartbeat"),
                name="heartbeat"))
        if self.service.reconcile_interval_s > 0:
            tasks.append(asyncio.create_task(
                self._every(self.service.reconcile_interval_s, self._reconcile_if_due,
                            "reconcile"), name="reconcile"))
        try:
            await self._run_until_stopped(tasks)
        finally:
            # Cancelled (serve cancelled, an embedding's wait_for): its loops and calls end
            # with it, before its caller closes the clients under them, not run on with no
            # owner. Stopping too, so that a loop that missed its cancel ends at its next turn.
            running = [task for task in [*tasks, *self._actions, self._take_back_task]
                       if task is not None and not task.done()]
            if running:
                self.stopping.set()
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def _run_until_stopped(self, tasks: list[asyncio.Task[None]]) -> None:
        log.info("replica %s running pool %r", self.replica_id, self.service.pool)
        for interval, setting, off in (
                (self.service.heartbeat_interval_s, "--heartbeat-interval", "heartbeats: this "
                 "replica is not listed in `provisioner status`, its event lag is not measured, "
                 "and a loss of the pool's state is not detected"),
                (self.service.reconcile_interval_s, "--reconcile-interval", "reconciliation: a "
                 "node:status lost on the way is not found, nor a node the pool does not know")):
            if interval <= 0:
                log.warning("%s 0 turns off %s", setting, off)
        await self.stopping.wait()
        log.info("replica %s stopping: %d node actions in flight", self.replica_id,
                 len(self._actions))
        # Each loop ends at its next turn; one inside a slow call (a reconciliation's list of
        # nodes, up to the API timeout) is cancelled after the grace: every step it could be in
        # is atomic or repeated by the next replica's turn. The Node API calls in flight run
        # meanwhile, and have what is left of the same grace: waited twice, a review's replica
        # took 11.7 s to stop, past `docker stop`'s 10 s.
        grace_ends = asyncio.get_running_loop().time() + self.service.shutdown_grace_s
        _, late = await asyncio.wait(tasks, timeout=self.service.shutdown_grace_s)
        for task in late:
            log.warning("stopping: %s cancelled after %gs", task.get_name(),
                        self.service.shutdown_grace_s)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The heartbeat's take-back, if one is still waiting for the Node API's list, has what
        # is left of the grace, as it had when the heartbeat awaited it.
        take_back = self._take_back_task
        if take_back is not None and not take_back.done():
            left_s = grace_ends - asyncio.get_running_loop().time()
            await asyncio.wait({take_back}, timeout=max(0.0, left_s))
            if not take_back.done():
                log.warning("stopping: take-back cancelled after %gs",
                            self.service.shutdown_grace_s)
                take_back.cancel()
            await asyncio.gather(take_back, return_exceptions=True)
        await self.drain(max(0.0, grace_ends - asyncio.get_running_loop().time()))
        # With heartbeats off too: the replica is not listed, but its mark in `applied` is
        # there, and nothing else would ever take it away (it is never forgotten).
        try:
            await asyncio.wait_for(self.scripts.leave(self.replica_id), 2.0)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("could not leave the pool's replica list (%s): it shows this "
                        "replica as silent until it forgets it", str(exc) or "no answer")

    async def drain(self, grace_s: float) -> None:
        """Let in-flight Node API calls finish; cancel what is left after `grace_s`.

        A cancelled create leaves its reservation to expire at its deadline (its node, if the
        POST landed, is adopted on node:status); a cancelled delete is retried by another replica
        once its terminating deadline passes. Nothing is left without a deadline.
        """
        if not self._actions:
            return
        _done, pending = await asyncio.wait(set(self._actions), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("cancelled %d node actions at shutdown", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    def ready(self) -> bool:
        return self.subscribed.is_set() and not self.stopping.is_set()

    def _note_refused(self, problem: Exception) -> None:
        if self._refused is None:
            self._refused = (time.monotonic(), str(problem) or type(problem).__name__)

    def _written(self) -> None:
        self._refused = None

    def writes_refused(self) -> str | None:
        """Why the server has refused this replica's writes since, and for how long; None if
        the last of them went through."""
        if self._refused is None:
            return None
        since, why = self._refused
        return f"{why} (for {time.monotonic() - since:.0f}s)"



def http_app(replica: Replica) -> web.Application:
    """/metrics, /healthz (the process answers) and /readyz (subscribed, Redis answers and
    takes this replica's writes, no other pool listens on its server, and the listener no
    further behind the event stream than --max-event-lag)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(replica.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # The pid (and /readyz's): a stack, or a test, that started this process on a port
        # another took first tells the two apart by it (devstack.wait_http).
        return web.json_response({"status": "ok", "replica": replica.replica_id,
                                  "pid": os.getpid()})

    async def readyz(_: web.Request) -> web.Response:
        problems = []
        if not replica.ready():
            problems.append("not subscribed")
        lag = replica.event_lag_s()
        if lag > replica.service.max_event_lag_s:
            problems.append(f"events applied {lag:.1f}s behind (over "
                            f"{replica.service.max_event_lag_s:g}s)")
        refused = replica.writes_refused()
        if refused and refused.startswith(POOL_KEY_BROKEN):
            problems.append(f"every transition is refused until an operator repairs the key: "
                            f"{refused}")
        elif refused:
            problems.append(f"redis takes no writes for now: {refused}")
        if replica.other_pools:
            problems.append("another pool listens on this server, and each applies the other's "
                            f"events: {', '.join(replica.other_pools)}")
        try:
            await asyncio.wait_for(replica.redis.ping(), 1.0)
        except TimeoutError:
            problems.append("redis: no answer to PING within 1s")
        except (RedisError, OSError) as exc:
            problems.append(f"redis: {str(exc) or type(exc).__name__}")
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready", "replica": replica.replica_id,
                                  "pid": os.getpid()})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def node_api_connections(pool: PoolConfig) -> int:
    """How many calls a replica's Node API client makes at once: a tick's creates and its
    terminations (each at most --max-batch), with room for a list and the calls of the tick
    before still out; never fewer than httpx's default, 100."""
    return max(100, 2 * pool.max_batch + 10)


async def serve(service: ServiceConfig, pool: PoolConfig,
                stop: asyncio.Event | None = None) -> None:
    """Run one replica with its HTTP endpoints until `stop` is set (or SIGINT/SIGTERM)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    redis = redis_client(service.redis_url, health_check_interval=15, socket_keepalive=True,
                         encoding_errors=ID_BYTES)
    metrics = Metrics()
    node_api = HttpNodeApi(service.node_api_url, timeout_s=service.api_timeout_s,
                           attempts=service.api_retries, metrics=metrics,
                           connections=node_api_connections(pool))
    replica = Replica(redis, service, pool, node_api, metrics=metrics)
    runner: web.AppRunner | None = None
    run: asyncio.Task[None] | None = None
    try:
        await redis.ping()
        # Before anything is written: Redis undoes nothing a script wrote before a command the
        # user may not run (a review: an ACL without XADD, or PUBLISH on user:*).
        if denied := await commands_refused(redis, replica.keys):
            raise CommandsRefused(denied)
        if service.http_port:
            if replica.gauges:
                # Read before /metrics answers, not at the first tick, which waits for the
                # first reconciliation: a scrape of the pool's gauges at 0 there, then at the
                # pool's value, read as a rise (ProvisionerStateRepaired fired for a replica
                # restarted).
                try:
                    await replica.refresh_gauges(replica.clock.now_ms())
                except RedisError as exc:
                    log.warning("could not read the pool's gauges before serving /metrics "
                                "(%s); the first tick reads them", exc)
            # A client's request still open when the replica stops is cut after a second
            # (aiohttp's default waits 60 s; a review's half-sent POST held the exit 10 s).
            runner = web.AppRunner(http_app(replica), access_log=None,
                                   shutdown_timeout=HTTP_SHUTDOWN_S)
            await runner.setup()
            try:
                await web.TCPSite(runner, service.http_host, service.http_port).start()
            except OSError as exc:
                raise CannotListen(exc.errno, f"/metrics and health cannot listen on "
                                   f"{service.http_host!r} port {service.http_port}: "
                                   f"{exc.strerror or exc}") from exc
            host = f"[{service.http_host}]" if ":" in service.http_host else service.http_host
            log.info("metrics and health on http://%s:%d", host, service.http_port)
        run = asyncio.create_task(replica.run(), name="replica")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        # A replica that cannot start (a read-only server, a settings key of the wrong type)
        # ends before any stop: its error is raised now, not kept until a SIGTERM.
        stopped.cancel()
        replica.stopping.set()
        await run
    finally:
        if run is not None and not run.done():  # serve cancelled: the replica with it
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await node_api.aclose()
        await redis.aclose()
        log.info("replica %s stopped", replica.replica_id)
