"""What the Node API client retries, and what it must not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from provisioner.metrics import Metrics
from provisioner.nodeapi import (
    MAX_BODY,
    MAX_RETRY_AFTER_S,
    CreateOutcome,
    DeleteOutcome,
    HttpNodeApi,
    retry_after_s,
)


def client(handler: object, attempts: int = 3) -> HttpNodeApi:
    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    return HttpNodeApi("http://api", attempts=attempts, backoff_s=0.001, metrics=Metrics(),
                       transport=transport)


async def test_create_202_returns_the_id() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        return httpx.Response(202, json={"id": "node-7"})

    result = await client(handler).create()
    assert (result.outcome, result.node_id) == (CreateOutcome.CREATED, "node-7")
    assert calls == [("POST", "/api/nodes")]


async def test_create_is_not_retried_after_an_answer_or_a_timeout() -> None:
    calls = 0

    def server_error(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, text="boom")

    assert (await client(server_error).create()).outcome is CreateOutcome.FAILED
    assert calls == 1

    def timeout(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadTimeout("slow", request=request)

    calls = 0
    assert (await client(timeout).create()).outcome is CreateOutcome.UNCERTAIN
    assert calls == 1


async def test_create_is_retried_when_the_connection_was_never_made() -> None:
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(202, json={"id": "node-1"})

    result = await client(flaky).create()
    assert result.outcome is CreateOutcome.CREATED and calls == 3


@pytest.mark.parametrize("never_sent", [httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_create_is_retried_when_the_connection_timed_out_before_it_was_made(
        never_sent: type[httpx.TimeoutException]) -> None:
    """Found by a review: a connect timeout (a host dropping SYNs) or no free connection in
    time sends nothing, yet it was taken as UNCERTAIN: not retried, and its reservation kept
    for --create-timeout as a create in flight, for a node that cannot exist."""
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise never_sent("timed out", request=request)
        return httpx.Response(202, json={"id": "node-1"})

    result = await client(flaky).create()
    assert (result.outcome, calls) == (CreateOutcome.CREATED, 2)


@pytest.mark.parametrize("creates", [1, 300])
async def test_a_connect_that_times_out_is_not_taken_for_a_create_sent(creates: int) -> None:
    """Found by a review of the fix above: the whole call's deadline (the api timeout) ran out
    no later than httpx's connect timeout with --api-timeout 3 or less, and a connection never
    made was taken as a create that may have made a node. Then by its own review: with the
    connect wait under the deadline, a burst of creates (300; --max-batch allows 1000) lagged
    the event loop until the two fired in one turn, and the deadline won for 136 of them. What
    decides is whether the request's headers began to go out (httpcore's trace). A listener
    whose backlog is full drops further SYNs: the connects time out."""
    import collections
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    await asyncio.sleep(0.2)
    api = HttpNodeApi(f"http://127.0.0.1:{port}", timeout_s=1.0, attempts=2, backoff_s=0.01)
    try:
        results = await asyncio.gather(*(api.create() for _ in range(creates)))
    finally:
        await api.aclose()
        for sock in (*fillers, listener):
            sock.close()
    outcomes = collections.Counter(result.outcome for result in results)
    assert outcomes == {CreateOutcome.FAILED: creates}, (
        dict(outcomes), {r.detail for r in results if r.outcome is not CreateOutcome.FAILED})


async def test_a_create_whose_proxy_never_answered_connect_is_not_taken_for_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: an https Node API through HTTPS_PROXY (httpx reads it from the
    environment), the proxy never answering CONNECT. Nothing reached the Node API, yet the
    CONNECT's own headers were traced as the request's going out: every create 'uncertain',
    its reservation kept, creates held as if the API were down."""
    connects = 0

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connects
        with contextlib.suppress(Exception, asyncio.CancelledError):
            if (await reader.readuntil(b"\r\n\r\n")).startswith(b"CONNECT"):
                connects += 1
            await asyncio.sleep(30)

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in ("http_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    api = HttpNodeApi("https://node-api.example", timeout_s=1.0, attempts=2, backoff_s=0.01)
    try:
        result = await api.create()
    finally:
        await api.aclose()
        server.close()
    assert connects == 2 and result.outcome is CreateOutcome.FAILED, (connects, result)


async def test_an_error_httpx_does_not_translate_is_a_failed_call_not_a_crash() -> None:
    """Found by a review: a TLS record that fails while the answer is read reaches the caller
    as ssl.SSLError, which httpx does not translate; it escaped create, delete and list (a
    traceback, the create never counted uncertain, reconciliation raising)."""
    import ssl

    def bad_record(request: httpx.Request) -> httpx.Response:
        raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]")

    assert (await client(bad_record).create()).outcome is CreateOutcome.UNCERTAIN
    assert await client(bad_record, attempts=2).delete("n1") is DeleteOutcome.FAILED
    assert await client(bad_record).list_nodes() is None


async def test_create_202_without_an_id_is_uncertain() -> None:
    result = await client(lambda r: httpx.Response(202, text="ok")).create()
    assert result.outcome is CreateOutcome.UNCERTAIN


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (502, "bad gateway", CreateOutcome.FAILED),
    (504, "gateway timeout", CreateOutcome.UNCERTAIN),
    (200, '{"id": "n1"}', CreateOutcome.CREATED),
    (201, '{"id": "n1"}', CreateOutcome.CREATED),
    (201, "made", CreateOutcome.UNCERTAIN),
    (500, "boom", CreateOutcome.FAILED),
    (503, "busy", CreateOutcome.FAILED),
])
async def test_a_gateway_with_no_answer_leaves_the_create_uncertain(
        status: int, body: str, outcome: CreateOutcome) -> None:
    """A 504 is a gateway's that the API behind it did not answer in time: it may have made
    the node. Taken for a refusal (a review), the reservation was given back, the pool created
    again, and the first node took a pool of max_nodes 1 to two. A 502 is mostly a gateway
    that reached no API (held as uncertain, one kept a second review's pool a node short for
    the create timeout). A 200 or 201 with an id made that node; a 500 or 503 is the API's
    own answer that it failed. None is asked again."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, text=body)

    result = await client(handler).create()
    assert result.outcome is outcome
    assert calls == 1
    assert result.node_id == ("n1" if outcome is CreateOutcome.CREATED else "")
    assert result.api_down is (status >= 500)
    assert not result.refused


async def test_delete_retries_transient_failures_and_maps_404_to_gone() -> None:
    answers = [503, 429, 202]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers.pop(0))

    assert await client(handler).delete("n1") is DeleteOutcome.SENT
    assert answers == []
    assert await client(lambda r: httpx.Response(404)).delete("n1") is DeleteOutcome.GONE
    assert await client(lambda r: httpx.Response(400)).delete("n1") is DeleteOutcome.FAILED

    def always_down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    assert await client(always_down, attempts=2).delete("n1") is DeleteOutcome.FAILED


async def test_list_nodes_tolerates_an_api_without_it() -> None:
    assert await client(lambda r: httpx.Response(404)).list_nodes() is None
    body = {"nodes": [{"id": "n1", "state": "ready"}]}
    listed = await client(lambda r: httpx.Response(200, json=body)).list_nodes()
    assert listed is not None and [(n.node_id, n.state) for n in listed] == [("n1", "ready")]


def slow_body(status: int, chunks: int = 100, every_s: float = 0.1) -> object:
    """A server that answers at once, then sends its body a byte at a time: each read is quick,
    so httpx's own timeouts never trip."""
    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            await asyncio.sleep(every_s)
            yield b" "

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body())
    return handler


async def test_a_server_dribbling_its_answer_is_given_up_on_within_the_timeout() -> None:
    """A server sending 1 byte a second held `create` and `list_nodes` (and with them a
    replica's reconciliation) past any timeout."""
    def api(handler: object) -> HttpNodeApi:
        return HttpNodeApi("http://api", timeout_s=0.5, attempts=2, backoff_s=0.001,
                           metrics=Metrics(), transport=httpx.MockTransport(handler))  # type: ignore[arg-type]

    started = time.monotonic()
    assert (await api(slow_body(202)).create()).outcome is CreateOutcome.UNCERTAIN
    assert await api(slow_body(200)).list_nodes() is None
    assert await api(slow_body(202)).delete("n1") is DeleteOutcome.FAILED  # two attempts
    assert time.monotonic() - started < 5  # each call bounded: 0.5 + 0.5 + 2 x 0.5 s


async def test_an_answer_too_long_or_nested_too_deep_is_no_answer() -> None:
    huge = b'{"id": "n1", "pad": "' + b"x" * (MAX_BODY["create"] + 1) + b'"}'
    deep = b"[" * 100_000
    for body in (huge, deep):
        result = await client(lambda r, b=body: httpx.Response(202, content=b)).create()
        assert result.outcome is CreateOutcome.UNCERTAIN, body[:20]
    for body in (b'{"nodes": ' + deep, b'{"nodes": [' + b'{"id": "n", "state": "ready"},' * 10
                 + b"[" * 100_000):
        assert await client(lambda r, b=body: httpx.Response(200, content=b)).list_nodes() \
            is None
    listed = await client(lambda r: httpx.Response(200, json={"nodes": [
        {"id": f"n{i}", "state": "ready"} for i in range(50_000)]})).list_nodes()
    assert listed is not None and len(listed) == 50_000


def garbled(status: int) -> object:
    """A server whose body says it is gzip and is not: httpx raises DecodingError, which is not
    a TransportError."""
    return lambda r: httpx.Response(status, content=b"not gzip",
                                    headers={"Content-Encoding": "gzip"})


async def test_an_answer_that_cannot_be_decoded_is_a_failure_not_an_exception() -> None:
    # The create was sent and answered: a node may exist.
    assert (await client(garbled(202)).create()).outcome is CreateOutcome.UNCERTAIN
    assert await client(garbled(202), attempts=2).delete("n1") is DeleteOutcome.FAILED
    assert await client(garbled(200)).list_nodes() is None


async def test_an_id_is_a_string_or_an_integer_never_a_bool_or_null() -> None:
    for body in ({"id": True}, {"id": None}, {"id": ""}, {"id": 1.5}, {"id": ["n"]}):
        result = await client(lambda r, b=body: httpx.Response(202, json=b)).create()
        assert result.outcome is CreateOutcome.UNCERTAIN, body
    result = await client(lambda r: httpx.Response(202, json={"id": 17})).create()
    assert (result.outcome, result.node_id) == (CreateOutcome.CREATED, "17")
    # A list with an item that names no node is not a list to reconcile against.
    for item in ({"id": None, "state": "ready"}, {"id": False, "state": "ready"}):
        body = {"nodes": [{"id": "n1", "state": "ready"}, item]}
        assert await client(lambda r, b=body: httpx.Response(200, json=b)).list_nodes() is None


async def test_a_delete_names_the_node_percent_encoded_and_refuses_a_path_no_id_can_be() -> None:
    paths = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(202)

    api = client(handler)
    for node_id in ("node-1", "a:b@c.d_e", "node 1/x", "ü"):
        assert await api.delete(node_id) is DeleteOutcome.SENT
    assert paths == ["/api/nodes/node-1", "/api/nodes/a:b@c.d_e", "/api/nodes/node%201%2Fx",
                     "/api/nodes/%C3%BC"]
    for node_id in ("", ".", ".."):  # the collection, or a path that resolves out of it
        assert await api.delete(node_id) is DeleteOutcome.FAILED
    assert len(paths) == 4


NOW = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 GMT


@pytest.mark.parametrize(("header", "wait"), [
    (None, None), ("7", 7.0), (" 12 ", 12.0), ("0", 0.0),
    ("86400", MAX_RETRY_AFTER_S), ("9" * 40, MAX_RETRY_AFTER_S),  # a day, a typo: capped
    ("Thu, 01 Jan 2026 00:00:20 GMT", 20.0), ("Thu, 01 Jan 2026 00:00:20 -0000", 20.0),
    ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),  # past: now
    ("Fri, 01 Jan 2027 00:00:00 GMT", MAX_RETRY_AFTER_S),
    ("0000000000007", 7.0), ("000000000000030", 30.0),  # zero-padded: not cut to 0
    ("-5", None), ("1.5", None), ("", None), ("soon", None), ("Thu, 99 Foo 2026", None),
    ("²", None), ("٣", None),  # digits to str.isdigit, not to int() or RFC 9110: no crash
    ("Mon, 01 Jan 99999 00:00:00 GMT", None),
])
def test_retry_after_reads_seconds_or_a_date_within_bounds(header: str | None,
                                                           wait: float | None) -> None:
    assert retry_after_s(header, now=NOW) == wait


async def test_a_create_at_capacity_passes_on_its_retry_after() -> None:
    answer = httpx.Response(429, headers={"Retry-After": "42"}, json={"error": "full"})
    result = await client(lambda r: answer, attempts=1).create()
    assert result.at_capacity and result.retry_after_s == 42.0
    result = await client(lambda r: httpx.Response(429), attempts=1).create()
    assert result.at_capacity and result.retry_after_s is None


async def test_a_create_says_whether_the_api_is_down_or_answered_no() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    for handler, down in ((refused, True), (timeout, True),
                          (lambda r: httpx.Response(503), True),
                          (lambda r: httpx.Response(500), True),
                          (lambda r: httpx.Response(429), False),
                          (lambda r: httpx.Response(400), False),
                          (lambda r: httpx.Response(202, json={"id": "n1"}), False)):
        result = await client(handler, attempts=1).create()
        assert result.api_down is down
        assert result.at_capacity is (result.detail.startswith("HTTP 429"))
        assert result.refused is (result.detail.startswith("HTTP 400"))
    for status in (301, 308, 401, 403, 404, 405, 409, 422):
        result = await client(lambda r, s=status: httpx.Response(s), attempts=1).create()
        assert (result.outcome, result.refused, result.api_down, result.at_capacity) == (
            CreateOutcome.FAILED, True, False, False), status
    assert (await client(lambda r: httpx.Response(429), attempts=1).create()).at_capacity


async def test_a_300_is_a_refusal_even_with_an_id_in_its_body() -> None:
    """Only a 2xx made a node: a 300 (the first of the 3xx, which the client does not follow)
    is refused like any other redirect, whatever its body names."""
    for body in ({"id": "n1"}, None):
        result = await client(lambda r, b=body: httpx.Response(300, json=b), attempts=1).create()
        assert (result.outcome, result.node_id, result.refused, result.api_down) == (
            CreateOutcome.FAILED, "", True, False), body


@pytest.mark.parametrize("status", [404, 405])
async def test_an_api_without_a_node_list_is_said_once_not_every_reconciliation(
    status: int, caplog: pytest.LogCaptureFixture,
) -> None:
    api = client(lambda r: httpx.Response(status))
    with caplog.at_level("WARNING", logger="provisioner.nodeapi"):
        for _ in range(3):
            assert await api.list_nodes() is None
    said = [r.getMessage() for r in caplog.records if r.name == "provisioner.nodeapi"]
    assert len(said) == 1 and "no GET /api/nodes" in said[0], said
    assert api.has_no_list  # the take-back after a loss waits a minute for it, not ten


async def test_an_api_that_fails_to_list_is_not_taken_for_one_without_a_list() -> None:
    """After a loss the ticks wait 10 minutes for a list the API fails to give, one minute
    for an API that has none (Replica.heartbeat): a 5xx or no answer is not a 404."""
    for then in (503, 500, None):  # None: no connection
        answers = [404, then]

        def handler(_: httpx.Request, answers: list[int | None] = answers) -> httpx.Response:
            status = answers.pop(0)
            if status is None:
                raise httpx.ConnectError("refused")
            return httpx.Response(status)

        api = client(handler, attempts=1)
        assert await api.list_nodes() is None and api.has_no_list
        assert await api.list_nodes() is None and not api.has_no_list, then


async def test_a_create_that_cannot_connect_waits_between_its_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backoff with full jitter: each pause up to backoff_s * 2**attempt (taken at its longest
    here), so a replica's tries do not hammer an API that refuses connections."""
    import random

    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    calls: list[float] = []

    def refused(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        raise httpx.ConnectError("refused", request=request)

    api = HttpNodeApi("http://api", attempts=3, backoff_s=0.1, metrics=Metrics(),
                      transport=httpx.MockTransport(refused))
    result = await api.create()
    assert result.outcome is CreateOutcome.FAILED and len(calls) == 3
    assert calls[1] - calls[0] >= 0.1 and calls[2] - calls[1] >= 0.2, calls


def test_an_http_date_of_minus_0000_is_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`-0000` parses to a naive datetime, which `timestamp()` reads in the local zone: under
    UTC, as here, the same; on a host in New York, five hours off (the cap, 300 s, or 0)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert retry_after_s("Thu, 01 Jan 2026 00:00:20 -0000", now=NOW) == 20.0
        assert retry_after_s("Thu, 01 Jan 2026 00:00:20 GMT", now=NOW) == 20.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(("timeout_s", "wait_s"), [(10.0, 3.0), (4.0, 2.0), (1.0, 0.5)])
def test_a_connection_is_waited_for_half_the_call_at_most_and_three_seconds(
    timeout_s: float, wait_s: float,
) -> None:
    """Made, or a free one of the client's, within less than the whole call's deadline: a
    connect that outlasted it could not be told from a create sent and unanswered."""
    timeout = HttpNodeApi("http://api", timeout_s=timeout_s)._client.timeout
    assert (timeout.connect, timeout.pool, timeout.read) == (wait_s, wait_s, timeout_s)


async def test_an_answer_of_exactly_the_most_body_read_is_read_whole() -> None:
    head, tail = b'{"id": "n1", "pad": "', b'"}'
    body = head + b"x" * (MAX_BODY["create"] - len(head) - len(tail)) + tail
    assert len(body) == MAX_BODY["create"]
    result = await client(lambda r: httpx.Response(202, content=body)).create()
    assert result.outcome is CreateOutcome.CREATED and result.node_id == "n1"


async def test_the_pauses_between_tries_double_and_none_follows_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pause up to backoff_s * 2**attempt, as `longest_create_s` counts them: attempts - 1
    of them, none after the last try (it would only delay the caller's failure). Drawn at 0
    here, so nothing waits."""
    import random

    ranges: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        ranges.append((low, high))
        return 0.0

    monkeypatch.setattr(random, "uniform", uniform)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def unavailable(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    def api(handler: object) -> HttpNodeApi:
        return HttpNodeApi("http://api", attempts=4, backoff_s=0.1, metrics=Metrics(),
                           transport=httpx.MockTransport(handler))  # type: ignore[arg-type]

    # A create answered 503 is not tried again; one never sent, and a delete, are.
    for call in (lambda: api(refused).create(), lambda: api(refused).delete("n1"),
                 lambda: api(unavailable).delete("n1")):
        ranges.clear()
        await call()
        assert ranges == [(0, 0.1), (0, 0.2), (0, 0.4)], ranges


async def test_a_compressed_answer_is_decoded_no_further_than_the_most_body_read() -> None:
    """A gzip'd answer is decoded a raw chunk at a time: 64 KiB of it, 64 MiB of spaces, were
    decoded whole before the body was cut at 64 KiB (10 creates at such an API: 1.3 GB)."""
    import tracemalloc
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    packed = packer.compress(b'{"id": "n1", "pad": "') + b"".join(
        packer.compress(b" " * (1 << 20)) for _ in range(256)) + packer.flush()

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(packed), 64 * 1024):  # as httpcore reads them
            yield packed[at:at + 64 * 1024]

    def bomb(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, content=chunks(), headers={"Content-Encoding": "gzip"})

    tracemalloc.start()
    try:
        result = await client(bomb).create()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.outcome is CreateOutcome.UNCERTAIN
    assert peak < len(packed) + 8 * MAX_BODY["create"], peak
    # A gzip'd answer within the bound is read as before.
    small = httpx.Response(202, content=zlib.compress(b'{"id": "n2"}', wbits=31),
                           headers={"Content-Encoding": "gzip"})
    assert (await client(lambda r: small).create()).node_id == "n2"


async def test_a_delete_of_an_id_too_long_for_a_url_is_a_failed_call_not_an_exception() -> None:
    """An id the Node API gave (a create's answer, or its list) that the pool cannot take is
    deleted; one whose path is past httpx's longest URL (11,000 'ü', 66,000 bytes encoded)
    raised httpx.InvalidURL, which is no HTTPError, out of `delete`: a traceback ("node action
    failed") at every create's answer or reconciliation that named it."""
    paths = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path)
        return httpx.Response(202)

    api = client(handler)
    assert await api.delete("ü" * 11_000) is DeleteOutcome.FAILED
    assert await api.delete("a" * 60_000) is DeleteOutcome.FAILED
    assert paths == []
    assert api.metrics is not None
    assert api.metrics.api_calls.labels("delete", "bad_id")._value.get() == 2


@pytest.mark.parametrize(("status", "outcome"), [
    (410, DeleteOutcome.GONE), (200, DeleteOutcome.SENT), (204, DeleteOutcome.SENT),
])
async def test_a_delete_answered_gone_or_another_2xx_is_not_a_failure(
        status: int, outcome: DeleteOutcome) -> None:
    """A 410 says the node is gone, as a 404 does; a 200 or 204 that the API took the DELETE,
    as a 202 does (a create's 200 or 201 is taken as its 202). Taken for failures, the node
    stayed `terminating` (counted against max_nodes) and its DELETE was sent every 10 s, a
    warning each, until a `terminated` or a reconciliation ended it: never, for a status lost
    at an API with no list."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status)

    api = client(handler)
    assert await api.delete("n1") is outcome
    assert calls == 1
    assert api.metrics is not None
    assert api.metrics.api_calls.labels("delete", outcome.value)._value.get() == 1


async def test_a_call_that_fails_says_how_in_its_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """httpcore's connect timeout has no message: a create's warning read "cannot connect
    (attempt 1/3): " and its result "could not connect", the same as a refused connect or a
    certificate refused; a delete's named the error's kind alone, never a TLS failure's why."""
    def timed_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("", request=request)

    def untrusted(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate",
                                 request=request)

    with caplog.at_level("WARNING", logger="provisioner.nodeapi"):
        result = await client(timed_out, attempts=1).create()
        await client(untrusted, attempts=1).delete("n1")
    said = [r.getMessage() for r in caplog.records if r.name == "provisioner.nodeapi"]
    assert "ConnectTimeout" in said[0] and "ConnectTimeout" in result.detail, (said, result)
    assert "CERTIFICATE_VERIFY_FAILED" in said[1], said


async def test_a_list_that_gives_one_node_two_states_is_not_a_list_to_reconcile_against() -> None:
    """Reconciliation kept the last state listed for an id: [ready, terminated] ended a node
    (an allocated one's user queued again) that [terminated, ready] kept. Which is true the
    list does not say. The same state twice is one node."""
    for states in (["ready", "terminated"], ["terminated", "ready"], ["booting", "ready"]):
        body = {"nodes": [{"id": "n1", "state": state} for state in states]}
        assert await client(lambda r, b=body: httpx.Response(200, json=b)).list_nodes() \
            is None, states
    body = {"nodes": [{"id": "n1", "state": "ready"}, {"id": "n1", "state": "ready"}]}
    listed = await client(lambda r: httpx.Response(200, json=body)).list_nodes()
    assert listed is not None and {(n.node_id, n.state) for n in listed} == {("n1", "ready")}


async def test_a_batch_of_creates_past_a_hundred_gets_a_connection_each() -> None:
    """httpx's client holds at most 100 connections: a batch of creates past it (--max-batch
    goes to 1000) waited for a free one within each call's deadline, and at an API that took
    its time the rest failed as "could not connect", which holds the replica's creates as if
    the API were down (a review: 36 of 400 at an API that took 1 s). A replica sizes its
    client by its batch (`node_api_connections`)."""
    from aiohttp import web

    from provisioner.config import PoolConfig
    from provisioner.service import node_api_connections

    made = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal made
        made += 1
        await asyncio.sleep(1.5)  # longer than the wait for a free connection (1 s here)
        return web.json_response({"id": f"n{made}"}, status=202)

    app = web.Application()
    app.router.add_post("/api/nodes", create)
    runner = web.AppRunner(app)
    await runner.setup()
    # a backlog for the whole batch: the default's 128 dropped connects, not the client
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    batch = 150
    try:
        for connections, failed in ((100, True), (node_api_connections(
                PoolConfig(max_batch=batch)), False)):
            api = HttpNodeApi(f"http://127.0.0.1:{port}", timeout_s=2.0, attempts=1,
                              connections=connections)
            try:
                results = await asyncio.gather(*(api.create() for _ in range(batch)))
            finally:
                await api.aclose()
            outcomes = [r.outcome for r in results]
            assert (CreateOutcome.FAILED in outcomes) is failed, (connections, outcomes)
    finally:
        await runner.cleanup()


async def test_a_raw_deflate_answer_is_read_as_httpx_read_it() -> None:
    """`Content-Encoding: deflate` sent as raw deflate (no zlib header), as servers send it
    too: httpx's own decoder falls back to it, and the chunked inflater must as well (it
    made each such answer a DecodingError: a create UNCERTAIN, a list none)."""
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = packer.compress(b'{"id": "n1"}') + packer.flush()

    async def chunks() -> AsyncIterator[bytes]:
        yield packed

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, content=chunks(), headers={"Content-Encoding": "deflate"})

    result = await client(handler, attempts=1).create()
    assert (result.outcome, result.node_id) == (CreateOutcome.CREATED, "n1"), result
