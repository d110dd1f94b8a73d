"""Every Prometheus metric of a replica, in one registry per replica.

Counters of events are per replica: every replica receives every message, but only the one whose
script call made the transition counts a connect, hit or miss, so summing over replicas gives
exact totals, but for a call whose reply was lost: the try that ran it told no replica what it
decided, and the call made again is counted apart (`provisioner_calls_made_again`; the pool's
own counts, `provisioner status`, are exact). Pool gauges (nodes by state, users) are read from
Redis and are the same on every replica: aggregate them with max(), not sum().
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

WAIT_BUCKETS = (0.0, 0.5, 1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


#: reap_idle's reasons (lua/reap_idle.lua), and lost_reply (a reap whose reply was lost: its
#: DELETEs sent at the next decision), and the places the replica counts errors in
TERMINATION_REASONS = ("idle", "surplus_boot", "boot_timeout", "retry", "drained", "lost_reply")
ERROR_PLACES = ("event", "event_retry", "event_backlog_full", "action", "subscribe", "tick",
                "heartbeat", "reconcile", "unusable_id", "other_pools", "eviction",
                "replica_id_shared")

#: what judge_gap found of a gap (lua/judge_gap.lua), and unanswered: no answer in the hold
GAP_VERDICTS = ("pause", "served", "unknown", "unanswered")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None:
            # The process's own: start time (the stall alert judges a young replica by its
            # count), CPU seconds, resident memory, open file descriptors (Linux; none
            # elsewhere). Not in a registry given, which may hold them already (the default
            # registry does).
            ProcessCollector(registry=r)
        self.events = Counter("provisioner_events", "Messages received, by channel",
                              ["channel"], registry=r)
        self.rejected = Counter("provisioner_events_rejected",
                                "Messages dropped as malformed, by channel and reason",
                                ["channel", "reason"], registry=r)
        self.connects = Counter("provisioner_connects",
                                "Counted connects (users holding nothing and not waiting)",
                                registry=r)
        self.resumed = Counter(
            "provisioner_sessions_resumed",
            "Counted connects that resumed the same user's session, ended within 30 s with its "
            "node freed, or their wait abandoned (a client that dropped and came back, or one "
            "in a loop): served as any connect, taught nothing to the forecast", registry=r)
        self.hits = Counter("provisioner_hits", "Connects served at once by a ready node",
                            registry=r)
        self.misses = Counter("provisioner_misses", "Connects that found no ready node",
                              registry=r)
        self.resumed_misses = Counter(
            "provisioner_resumed_misses",
            "Of the misses, those of connects that resumed a session or wait ended within 30 s "
            "(provisioner_sessions_resumed_total): a client reconnecting in a loop while it "
            "waits misses once a cycle. The miss-rate alert leaves them out", registry=r)
        self.allocations = Counter("provisioner_allocations",
                                   "Nodes handed to users, by kind (instant|after_wait)",
                                   ["kind"], registry=r)
        self.wait = Histogram("provisioner_wait_seconds",
                              "Time from a connect to the user's allocation, for every "
                              "allocation this replica applied: a hit at 0 (the mean wait of "
                              "those who waited is the sum over "
                              "provisioner_allocations_total{kind=\"after_wait\"})",
                              buckets=WAIT_BUCKETS, registry=r)
        self.releases = Counter("provisioner_releases", "Disconnects, by outcome",
                                ["outcome"], registry=r)
        self.made_again = Counter(
            "provisioner_calls_made_again",
            "Connects and disconnects this replica made again after their reply was lost, and "
            "found applied by that try: their hit, miss or release is in no replica's counters "
            "(the pool's stats count it: calls_made_again)", ["event"], registry=r)
        self.node_events = Counter("provisioner_node_status",
                                   "node:status messages this replica applied, by outcome: every "
                                   "replica applies every message, so one another replica "
                                   "applied first is a duplicate here",
                                   ["status", "outcome"], registry=r)
        self.nodes = Gauge("provisioner_nodes", "Nodes of the pool by state (from Redis)",
                           ["state"], registry=r)
        self.users = Gauge("provisioner_users", "Users of the pool by state (from Redis)",
                           ["state"], registry=r)
        self.longest_session = Gauge(
            "provisioner_longest_session_seconds",
            "How long the longest session running has held its node (from Redis; 0 when none "
            "runs): a session whose user:disconnect was lost keeps growing it",
            registry=r)
        self.longest_wait = Gauge(
            "provisioner_longest_wait_seconds",
            "How long the user waiting the longest for a node has waited (from Redis, the "
            "earliest start among the queue's first ten and the ten each side of where those "
            "who joined at the back meet the crashed nodes' users put at the front; 0 when "
            "none waits, or when none of those starts is a time)", registry=r)
        self.api_calls = Counter("provisioner_node_api_calls",
                                 "Node API calls, by operation and outcome: an answer (created, "
                                 "sent, gone, ok) or a failure (connect_error, transport_error, "
                                 "uncertain, http_<status>, bad_body, bad_id)",
                                 ["op", "outcome"], registry=r)
        self.api_latency = Histogram("provisioner_node_api_seconds",
                                     "Node API call latency, by operation", ["op"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.script_latency = Histogram("provisioner_script_seconds",
                                        "Lua script round-trip latency, by script", ["script"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("provisioner_scale_decisions",
                                 "Scaling ticks this replica won", registry=r)
        self.decision_age = Gauge(
            "provisioner_scale_decision_age_seconds",
            "Seconds since this replica last won a scaling tick or found its slot decided by "
            "another, by its monotonic clock at the scrape (+Inf before its first tick): the "
            "least over the replicas is how long the pool has gone without a decision, "
            "whatever their clocks", registry=r)
        self.tick_interval = Gauge(
            "provisioner_tick_interval_seconds",
            "This replica's --tick-interval: the pool takes a decision in each interval slot "
            "some replica ticks in", registry=r)
        self.surges = Counter("provisioner_surge_decisions",
                              "Scaling ticks this replica won while arrivals surged (the "
                              "buffer was surge_buffer_sd)", registry=r)
        self.creates = Counter("provisioner_creates_reserved",
                               "Create reservations this replica's decisions took, each then "
                               "sent to the Node API, withdrawn or failed "
                               "(provisioner_node_api_calls_total{op=\"create\"} says which)",
                               registry=r)
        self.terminations = Counter("provisioner_terminations",
                                    "Terminations this replica started, by reason (idle, "
                                    "surplus_boot, boot_timeout, retry, drained; lost_reply: "
                                    "a reap's whose reply was lost, sent at the next decision)",
                                    ["reason"], registry=r)
        self.forecast_check = Gauge(
            "provisioner_forecast_check",
            "The forecast's check of itself over the pool's life (from Redis): horizons checked, "
            "connects forecast and seen, squared errors and the forecast's variances, horizons "
            "whose connects came above forecast + buffer, and how many a Poisson count would give; "
            "the same from every tick's forecast (sliding_*, with the connects that came, their "
            "squares and the squared errors, for its skill against a constant forecast, and the "
            "frees forecast against the releases that came)",
            ["quantity"], registry=r)
        self.scaling = Gauge(
            "provisioner_scaling",
            "What scaling did over the pool's life (from Redis): creates, split into those on a "
            "rise of the target and those refilling spare used, those the Node API did not "
            "make (failed), made with an id the pool cannot take (unusable) or never sent "
            "(withdrawn), terminations started (a DELETE sent again is counted again), and the "
            "target's rises and falls summed",
            ["quantity"], registry=r)
        self.last_decision = Gauge(
            "provisioner_last_decision",
            "The pool's last scaling decision (from Redis): its target, keep level and spare "
            "nodes, and for the forecast policy the terms behind the target: connects forecast "
            "over the lead time (of them not_browsing_yet), the panic factor, the frees of the "
            "running sessions and of new ones, the buffer and its z, lead_time_s",
            ["quantity"], registry=r)
        self.event_lag = Gauge(
            "provisioner_event_lag_seconds",
            "How far this replica's listener is behind the event stream: seconds from publishing "
            "a probe on the replica's own channel to the listener reaching it, behind every "
            "message published before it (the latest probe's, or the age of one still out if "
            "that is more)", registry=r)
        self.event_backlog = Gauge(
            "provisioner_event_backlog",
            "Messages this replica's listener has read and not yet applied: near 0 while the "
            "server takes its writes; it grows while the server refuses them for now (out of "
            "memory, read-only), up to --event-backlog", registry=r)
        self.values_repaired = Gauge(
            "provisioner_values_repaired",
            "Values of the pool's state that were not a number where the scripts add to one "
            "(only a hand edit or another writer leaves one), each started again by the script "
            "that found it, over the pool's life (from Redis: stats values_repaired)",
            registry=r)
        self.creates_held = Gauge(
            "provisioner_creates_held",
            "1 while this replica makes no create because the Node API is down (creates "
            "unanswered or answered 5xx; after the pause it makes one at a time until the API "
            "answers a create, a delete or a list), at its capacity (429) or refusing creates "
            "(a 3xx or another 4xx, or ids the pool cannot take)",
            registry=r)
        self.other_pools = Gauge(
            "provisioner_other_pools",
            "Other pools whose replicas listen on this replica's Redis server (its lag probe "
            "channels, at the last heartbeat): the events' channels carry no pool and are "
            "shared by every database of a server, so each pool applies the other's events. "
            "Should be 0: one server per pool", registry=r)
        self.server_may_evict = Gauge(
            "provisioner_server_may_evict",
            "1 while this replica's Redis server has a maxmemory and an eviction policy other "
            "than noeviction (INFO memory, at the last heartbeat): full, it deletes the pool's "
            "keys (allkeys-*) or those with a TTL (volatile-*) in silence, where under "
            "noeviction it refuses writes, which the replicas see; 0 when it cannot evict; -1 "
            "unknown: INFO refused or without those fields, or no heartbeat yet (none with "
            "--heartbeat-interval 0). Should be 0", registry=r)
        self.server_may_evict.set(-1)
        self.scripts_info = Gauge(
            "provisioner_scripts_info",
            "1, labelled with the fingerprint of the Lua scripts this replica runs (a digest of "
            "the state machine as sent to the server): replicas of one pool with different "
            "fingerprints run different releases of it", ["fingerprint"], registry=r)
        self.settings_info = Gauge(
            "provisioner_settings_info",
            "1, labelled with the pool and a digest of the pool settings this replica runs "
            "(PoolConfig.digest, as its heartbeat says): replicas of one pool with different "
            "digests decide by different settings, each tick by whichever replica's fires first",
            ["pool", "settings"], registry=r)
        self.clock_offset = Gauge(
            "provisioner_clock_offset_seconds",
            "This replica's clock less the Redis server's, at its last heartbeat (the server's "
            "TIME against the middle of the call): every transition the replica applies is "
            "stamped with its own clock", registry=r)
        self.state_lost = Counter(
            "provisioner_state_lost",
            "Times this replica found the pool's state in Redis gone under it: the pool's epoch "
            "(set once when the state begins, lua/heartbeat.lua) changed between two of its "
            "heartbeats (a server restarted without persistence, a flush, a failover to an "
            "empty replica), or the pool's count of heartbeats went back (the state put back "
            "from an older copy)", registry=r)
        self.unsubscribed = Counter(
            "provisioner_unsubscribed_seconds",
            "Seconds this replica's listener was not subscribed after it had been (a lost "
            "connection, or the server dropping a subscriber past its pub/sub buffer limit): "
            "events published then reached it not at all, and were lost if every replica was "
            "unsubscribed at once", registry=r)
        self.loop_stalled = Counter(
            "provisioner_loop_stalled_seconds",
            "Seconds this replica's event loop did not run, counted where its watch (every "
            "0.25 s) woke a second or more late, by how late (the process paused: SIGSTOP, a "
            "frozen container or VM; starved of CPU; a call blocking the loop): the events "
            "published meanwhile were applied that much late, which the lag probes, timed by "
            "the stalled process, do not show", registry=r)
        self.server_gaps = Counter(
            "provisioner_server_gaps",
            "Gaps in which this replica could not reach the server past 10 s while applying "
            "events, by what judge_gap found once it answered again (lua/judge_gap.lua): "
            "pause (it served no replica: the events held were tried again, and applied unless "
            "the server failed them again), served (it served others: this replica was cut off "
            "alone, and the events held were dropped), unknown (the heartbeats could not tell, "
            "or the server's clock stepped: dropped), unanswered (no answer within "
            "--event-hold, or before a stop: dropped)", ["judged"], registry=r)
        self.errors = Counter("provisioner_errors",
                              "Unexpected errors while handling work, by where",
                              ["where"], registry=r)
        # Exported at 0 from the start, so a query on one (README, "Debugging") reads 0, not
        # nothing, until it first counts.
        for reason in TERMINATION_REASONS:
            self.terminations.labels(reason)
        for where in ERROR_PLACES:
            self.errors.labels(where)
        for judged in GAP_VERDICTS:
            self.server_gaps.labels(judged)

    def observe_script(self, name: str, seconds: float) -> None:
        self.script_latency.labels(name).observe(seconds)
