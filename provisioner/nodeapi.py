"""Client of the Node Management API.

`POST /api/nodes` → 202 {"id": …} creates a node, `DELETE /api/nodes/{id}` → 202 terminates one.
What may be retried and what may not:

* A create is not idempotent: sending it twice may make two nodes. It is retried only when the
  request certainly never reached the server (the connection could not be made, or was not made
  in time, or none of the client's was free in time). A timeout or a
  broken connection after sending is UNCERTAIN: the node may exist. The caller then leaves the
  reservation to expire and the node, if any, is adopted when its `node:status` arrives or when
  reconciliation lists it, so it is never leaked. So is a 504, a gateway's answer that the API
  behind it did not answer in time: the request reached it, and may have made the node. A 502
  (mostly a gateway that could not reach the API at all) and any other answer but a 2xx are
  taken for no node: held as uncertain, one 502 kept the pool a node short for the whole
  create timeout (a review).
* A create answered 200 or 201 with an id made that node, as a 202 does (a proxy or another
  release of the API may answer so); a 2xx without a readable id is UNCERTAIN.
* A delete is idempotent (a 404 or 410 means the node is already gone; a 200 or 204 is taken
  as its 202), so timeouts, connection errors,
  429 and 5xx are retried with jittered exponential backoff, a bounded number of times.
* `GET /api/nodes` is an extension of our mock used for reconciliation; a server without it
  answers 404/405 and reconciliation is skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from provisioner import jsontext
from provisioner.metrics import Metrics

log = logging.getLogger("provisioner.nodeapi")


class CreateOutcome(StrEnum):
    CREATED = "created"
    FAILED = "failed"        # taken for no node: a 3xx, 4xx or 5xx but 504, or no connection
    UNCERTAIN = "uncertain"  # sent, no answer (or a gateway's 504): a node may exist


class DeleteOutcome(StrEnum):
    SENT = "sent"      # 202: the node will report terminated
    GONE = "gone"      # 404 or 410: the API does not know it (any more)
    FAILED = "failed"  # retries exhausted


@dataclass(frozen=True)
class CreateResult:
    outcome: CreateOutcome
    node_id: str = ""
    detail: str = ""
    #: the API did not answer, or answered a server error: down or broken, not refusing (a 4xx,
    #: a 429 at its capacity, is an answer); the replica holds its creates while this lasts
    api_down: bool = False
    #: a 429: the API is at its capacity; the replica holds its creates a while: as long as
    #: the answer's Retry-After says (`retry_after_s`), or CAPACITY_HOLD_MS without one
    at_capacity: bool = False
    retry_after_s: float | None = None
    #: the API answered no for a reason of its own (a 3xx, or a 4xx but 429: a wrong path, a
    #: token refused, a request it cannot take): asked again, it will most likely say no
    #: again, and the replica holds its creates, longer with each refusal in a row
    refused: bool = False


@dataclass(frozen=True)
class ListedNode:
    node_id: str
    state: str


class NodeApi(Protocol):
    #: whether `list_nodes` answers None because the API has no list (a 404 or 405, or none
    #: at all), not because it failed to give one: a replica that lost the pool's state waits
    #: a minute for the list of an API with none, ten for one failing (Replica's take-back)
    has_no_list: bool

    async def create(self) -> CreateResult: ...

    async def delete(self, node_id: str) -> DeleteOutcome: ...

    async def list_nodes(self) -> list[ListedNode] | None: ...

    async def aclose(self) -> None: ...


RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
#: a gateway's answer that the API behind it did not answer in time: the create reached it and
#: may have made a node (a review: taken for a refusal, the reservation was given back, the
#: pool created again, and the node the first POST made took it past max_nodes)
GATEWAY_NO_ANSWER = frozenset({504})
#: the most of an answer's body read: an id or an error (create, delete), the node list (list);
#: the rest is not read, and a create or a list whose body is cut short has no usable answer
MAX_BODY = {"create": 64 * 1024, "delete": 64 * 1024, "list": 32 * 1024 * 1024}


class Deadline(httpx.TransportError):
    """The whole request, its body included, outlasted the client's timeout: httpx's own
    timeouts bound each read, and a server sending a byte a second never trips them."""


def _never_sent(exc: httpx.HTTPError) -> bool:
    """Whether a request that failed certainly never reached the server. What httpcore traced
    says, where it traced anything (`_send`): the request's headers never began to go out, so
    whatever failed (no connection made in time, none free in time, a proxy's CONNECT never
    answered, the whole call's deadline) failed before it. Else the error's kind: no connection
    was made, or none was free in time."""
    traced: bool | None = getattr(exc, "never_sent", None)
    if traced is not None:
        return traced
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


#: the longest wait a Retry-After is taken at its word for: a header of a day, or a date a
#: year off (a server's clock, a typo), would stop the pool's creates as long
MAX_RETRY_AFTER_S = 300.0


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds, delay-seconds or an HTTP-date (RFC 9110
    10.2.3), at most MAX_RETRY_AFTER_S and at least 0; None if there is none or it is neither
    (the caller's own default then holds). `now`: Unix seconds, for a date."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # delay-seconds: 0-9 only, no sign, no fraction
        digits = text.lstrip("0") or "0"
        return MAX_RETRY_AFTER_S if len(digits) > 6 else min(float(digits), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:  # an HTTP-date is GMT; -0000 reads as naive
            when = when.replace(tzinfo=datetime.UTC)
        wait = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return min(max(wait, 0.0), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class _Answer:
    status_code: int
    body: bytes
    complete: bool  # False: cut at MAX_BODY
    retry_after: str | None = None  # the Retry-After header, if any

    @property
    def text(self) -> str:
        return self.body[:100].decode("utf-8", "replace")

    def json(self) -> object:
        """The body as JSON; ValueError if it is not (cut short, not UTF-8, nested too deep)."""
        if not self.complete:
            raise ValueError(f"body longer than {len(self.body)} bytes")
        return jsontext.loads(self.body)


#: The first pause between tries; each next one may be up to twice as long (full jitter).
BACKOFF_S = 0.2


def longest_create_s(timeout_s: float, attempts: int, backoff_s: float = BACKOFF_S) -> float:
    """How long `HttpNodeApi.create` can take at most: every try to its timeout, and every
    pause between them at its longest. A create reservation must outlive it, or it lapses while
    its POST may still make the node, and the pool makes the node again."""
    return attempts * timeout_s + backoff_s * float(2 ** (attempts - 1) - 1)


class HttpNodeApi:
    """httpx-based client with timeouts and bounded, jittered retries where they are safe."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, attempts: int = 3,
                 backoff_s: float = BACKOFF_S, metrics: Metrics | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 connections: int = 100) -> None:
        self._client = httpx.AsyncClient(
            # At most `connections` at once (httpx's default, 100): a replica sizes it by its
            # --max-batch, since a batch of creates past it waited for a free connection
            # within each call's deadline (a review: of 400 creates at a healthy API that took
            # 1 s, 36 failed as "could not connect" and held the replica's creates).
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=20),
            base_url=base_url.rstrip("/"),
            # A connection, or a free one of the client's, is waited for a shorter while than
            # the whole call (`_send`'s deadline): a create whose connection was not made in
            # time sent nothing, and is tried again, where the deadline cannot tell it from
            # one sent and unanswered (a review: with --api-timeout 3 or less, every connect
            # timeout was taken as a create that may have made a node).
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s / 2, 3.0),
                                  pool=min(timeout_s / 2, 3.0)),
            transport=transport,
        )
        self._transport_given = transport is not None
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.metrics = metrics
        self._said_no_list = False  # a Node API without a list is said once, not every interval
        #: the last GET /api/nodes answered 404 or 405: the API has no list, where an API that
        #: fails (unreachable, a timeout, a 5xx) has one it could not give
        self.has_no_list = False

    async def _send(self, op: str, method: str, path: str) -> _Answer:
        """One request, read to at most MAX_BODY[op] within timeout_s in all."""
        # Nothing was sent if httpcore traced the exchange and not the request's headers going
        # out: it was waiting for a free connection, for one to be made, or for a proxy's
        # tunnel. A transport given in its place (the tests') may trace nothing at all; its
        # error's kind says then. (A burst of creates lags the event loop until the deadline
        # and the connect wait fire in one turn, and the deadline won: a review.)
        traced = sending = False

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            nonlocal traced, sending
            traced = True
            # A proxy's CONNECT is not the request: through HTTPS_PROXY, its headers go out
            # before the tunnel to the Node API exists (a review: a proxy that never answered
            # CONNECT made every create 'uncertain').
            if (event.endswith(".send_request_headers.started")
                    and getattr(info.get("request"), "method", b"") != b"CONNECT"):
                sending = True

        async def go() -> _Answer:
            async with self._client.stream(method, path,
                                           extensions={"trace": trace}) as response:
                body = bytearray()
                retry_after = response.headers.get("retry-after")
                if response.is_stream_consumed:  # read whole already (a test's transport)
                    chunks, inflate = response.aiter_bytes(), None
                else:
                    chunks = response.aiter_raw()
                    inflate = _inflater(response.headers.get("content-encoding", ""))
                async for chunk in chunks:
                    if inflate is not None:  # decoded no further than the most read
                        try:
                            chunk = inflate.decompress(chunk, MAX_BODY[op] + 1 - len(body))
                        except zlib.error as exc:
                            raise httpx.DecodingError(f"{exc}") from exc
                    body += chunk
                    if len(body) > MAX_BODY[op]:
                        return _Answer(response.status_code, bytes(body[:MAX_BODY[op]]), False,
                                       retry_after)
                return _Answer(response.status_code, bytes(body), True, retry_after)

        try:
            return await asyncio.wait_for(go(), self.timeout_s)
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            error: httpx.HTTPError
            if isinstance(exc, TimeoutError):
                error = Deadline(f"no whole answer within {self.timeout_s:g}s")
            elif isinstance(exc, httpx.HTTPError):
                error = exc
            else:  # what httpx does not translate: a TLS record that fails (a review)
                error = httpx.TransportError(_said(exc))
            if traced or not self._transport_given:
                error.never_sent = not sending  # type: ignore[attr-defined]
            if error is exc:
                raise
            raise error from (None if isinstance(exc, TimeoutError) else exc)

    @property
    def longest_create_s(self) -> float:
        """How long this client's `create` can take at most (`longest_create_s`)."""
        return longest_create_s(self.timeout_s, self.attempts, self.backoff_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _count(self, op: str, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.api_calls.labels(op, outcome).inc()
            self.metrics.api_latency.labels(op).observe(time.perf_counter() - started)

    async def _pause(self, attempt: int) -> None:
        # Full jitter: a herd of replicas retrying together does not stay in step.
        await asyncio.sleep(random.uniform(0, self.backoff_s * 2**attempt))

    async def create(self) -> CreateResult:
        why = "could not connect"
        for attempt in range(self.attempts):
            started = time.perf_counter()
            try:
                response = await self._send("create", "POST", "/api/nodes")
            except httpx.HTTPError as exc:
                if not _never_sent(exc):  # a broken answer, a body not decodable, ...
                    self._count("create", "uncertain", started)
                    return CreateResult(CreateOutcome.UNCERTAIN,
                                        detail=_said(exc), api_down=True)
                self._count("create", "connect_error", started)
                why = f"could not connect: {_said(exc)}"
                log.warning("create: cannot connect (attempt %d/%d): %s", attempt + 1,
                            self.attempts, _said(exc))
                if attempt + 1 < self.attempts:
                    await self._pause(attempt)
                continue
            status = response.status_code
            if 200 <= status < 300:
                node_id = _node_id(response)
                if node_id:
                    self._count("create", "created", started)
                    return CreateResult(CreateOutcome.CREATED, node_id)
                # A 2xx without a readable id: a node may exist that we cannot name yet.
                self._count("create", "uncertain", started)
                return CreateResult(CreateOutcome.UNCERTAIN,
                                    detail=f"{status} without an id: {response.text[:100]!r}")
            if status in GATEWAY_NO_ANSWER:
                self._count("create", "uncertain", started)
                return CreateResult(CreateOutcome.UNCERTAIN, api_down=True,
                                    detail=f"HTTP {status} (a gateway the API did not answer "
                                    f"in time: a node may exist): {response.text[:100]!r}")
            self._count("create", f"http_{status}", started)
            return CreateResult(CreateOutcome.FAILED,
                                detail=f"HTTP {status}: {response.text[:100]!r}",
                                api_down=status >= 500,
                                at_capacity=status == 429,
                                refused=status < 500 and status != 429,
                                retry_after_s=retry_after_s(response.retry_after))
        return CreateResult(CreateOutcome.FAILED, detail=why, api_down=True)

    async def delete(self, node_id: str) -> DeleteOutcome:
        try:
            path = node_path(node_id)
        except ValueError as exc:
            self._count("delete", "bad_id", time.perf_counter())
            log.error("delete: %s", exc)
            return DeleteOutcome.FAILED
        for attempt in range(self.attempts):
            started = time.perf_counter()
            try:
                response = await self._send("delete", "DELETE", path)
            except httpx.HTTPError as exc:
                self._count("delete", "transport_error", started)
                log.warning("delete %s: %s (attempt %d/%d)", node_id, _said(exc),
                            attempt + 1, self.attempts)
            else:
                if 200 <= response.status_code < 300:  # a 200 or 204 took it as a 202 does
                    self._count("delete", "sent", started)
                    return DeleteOutcome.SENT
                if response.status_code in (404, 410):
                    self._count("delete", "gone", started)
                    return DeleteOutcome.GONE
                self._count("delete", f"http_{response.status_code}", started)
                if response.status_code not in RETRYABLE_STATUS:
                    log.warning("delete %s: HTTP %d %r", node_id, response.status_code,
                                response.text[:100])
                    return DeleteOutcome.FAILED
            if attempt + 1 < self.attempts:
                await self._pause(attempt)
        return DeleteOutcome.FAILED

    async def list_nodes(self) -> list[ListedNode] | None:
        started = time.perf_counter()
        try:
            response = await self._send("list", "GET", "/api/nodes")
        except httpx.HTTPError as exc:
            self.has_no_list = False
            self._count("list", "transport_error", started)
            log.warning("list: %s", _said(exc))
            return None
        self.has_no_list = response.status_code in (404, 405)
        if response.status_code != 200:
            self._count("list", f"http_{response.status_code}", started)
            if response.status_code not in (404, 405):
                log.warning("list: HTTP %d %r", response.status_code, response.text[:100])
            elif not self._said_no_list:
                self._said_no_list = True
                log.warning("list: HTTP %d: the Node API has no GET /api/nodes; reconciliation "
                            "is skipped", response.status_code)
            return None
        try:
            items = response.json()["nodes"]  # type: ignore[index]
            nodes = [ListedNode(_id_text(item["id"]), str(item["state"])) for item in items]
            states = {node.node_id: node.state for node in nodes}
            if len(states) != len(set(nodes)):  # one node in two states: which is it?
                raise ValueError("a node listed in two states")
            nodes = [ListedNode(node_id, state) for node_id, state in states.items()]
        except (ValueError, KeyError, TypeError) as exc:
            self._count("list", "bad_body", started)
            log.warning("list: the answer is not a node list: %s", exc)
            return None
        self._count("list", "ok", started)
        return nodes


def _inflater(encoding: str) -> Any:
    """A decoder of an answer's Content-Encoding (gzip or deflate), or None for none. httpx's
    own decodes each chunk read whole: 64 KiB of a gzip'd answer were 64 MiB of body, read
    before it was cut (a review: 10 creates at once took 1.3 GB)."""
    coding = encoding.strip().lower()
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if coding == "deflate":
        return _Deflate()
    return None  # identity, or one httpx has no decoder for either: read as it came


class _Deflate:
    """`deflate` as httpx's own decoder reads it: zlib's header (or gzip's), else raw deflate
    (no header), which servers send under that name too."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self._first = True

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        first, self._first = self._first, False
        try:
            return self._inner.decompress(data, max_length)
        except zlib.error:
            if not first:
                raise
            self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._inner.decompress(data, max_length)


#: the longest node path sent: servers answer 414 past about 8 KiB, httpx refuses past 64 KiB
MAX_PATH = 8 * 1024


def node_path(node_id: str) -> str:
    """The node's URL path, its id percent-encoded: an id the pool cannot take (a space, a '/')
    is still deleted as itself. ValueError for an id no path can name, or none a server takes
    (past MAX_PATH: one past httpx's longest URL raised httpx.InvalidURL, no HTTPError, out of
    `delete`, a review)."""
    path = "" if node_id in ("", ".", "..") else "/api/nodes/" + quote(node_id, safe=":@")
    if not path or len(path) > MAX_PATH:
        raise ValueError(f"no node path for the id {node_id!r}"[:200])
    return path


def _said(exc: BaseException) -> str:
    """An error's kind and, where it has one, its message (httpcore's timeouts have none)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _id_text(value: object) -> str:
    """An id as the API wrote it: a non-empty string, or an integer (not a bool, which JSON
    spells true/false); ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ValueError(f"not a node id: {value!r}"[:100])
    return str(value)


def _node_id(response: _Answer) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    try:
        return _id_text(body.get("id") if isinstance(body, dict) else None)
    except ValueError:
        return ""
