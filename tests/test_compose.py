"""docker-compose.yml as an operator runs it: what comes back by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_every_long_running_service_comes_back_after_a_crash() -> None:
    """A replica started while Redis does not answer exits (2, "cannot run"), and one killed
    (SIGKILL) stays down: with no restart policy, in the Docker sandbox each stayed Exited,
    its target left Prometheus's discovery and no alert fired. With `unless-stopped` one whose
    process was killed ran again within 2 s. The CLI, run by hand, has none."""
    services = compose()["services"]
    long_running = [name for name, spec in services.items() if not spec.get("profiles")]
    assert {"redis", "provisioner", "node-api", "prometheus"} <= set(long_running)
    missing = {name: services[name].get("restart") for name in long_running
               if services[name].get("restart") not in ("unless-stopped", "always")}
    assert not missing, missing
    assert "restart" not in services["cli"]


def test_redis_is_healthy_only_once_it_answers_ping_with_pong() -> None:
    """`redis-cli ping` exits 0 on an error reply: a server loading its append-only file
    answers LOADING, and compose took it for healthy and started what waits on it. In the
    Docker sandbox, with a 13 s load, each replica and the simulator exited 4 times ("cannot
    run: Redis is loading the dataset in memory") before it was done; without a restart
    policy the whole pool stays down. `-e` makes redis-cli exit 1 on an error reply."""
    services = compose()["services"]
    test = services["redis"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "redis-cli"] and "-e" in test and test[-1] == "ping", test
    for name in ("provisioner", "node-api", "simulator", "cli"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_the_cli_reaches_what_its_repair_commands_ask() -> None:
    """`docker compose run --rm cli reconcile` stopped on --node-api-url missing (a review):
    the CLI is given the replicas' Redis and Node API, and no replica id of one of theirs (a
    shared id would set every replica to one, whose marks each overwrites)."""
    services = compose()["services"]
    cli, replica = services["cli"]["environment"], services["provisioner"]["environment"]
    for name in ("PROVISIONER_REDIS_URL", "PROVISIONER_NODE_API_URL"):
        assert cli[name] == replica[name], name
    assert "PROVISIONER_REPLICA_ID" not in replica


def test_the_simulator_waits_for_a_subscribed_replica() -> None:
    """Started once Redis answered, the simulator's first events could reach no replica:
    pub/sub keeps nothing for a subscriber yet to come (a review). It waits for the replicas'
    healthcheck, which is /readyz (subscribed)."""
    services = compose()["services"]
    waits = services["simulator"]["depends_on"]
    assert waits["provisioner"] == {"condition": "service_healthy"}
    assert "/readyz" in " ".join(services["provisioner"]["healthcheck"]["test"])
