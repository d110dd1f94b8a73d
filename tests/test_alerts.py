"""The Prometheus alert rules shipped in docker-compose.yml (configs.alerts)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from provisioner.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def rules_text() -> str:
    # Compose interpolates `$`: the file writes the templates' `$labels` as `$$labels`.
    content: str = compose()["configs"]["alerts"]["content"]
    return content.replace("$$", "$")


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(rules_text())["groups"] for rule in group["rules"]]


def exported_series() -> set[str]:
    """Every series name a replica's /metrics can carry."""
    names = {"up"}
    metrics = Metrics()
    names |= {sample.name for family in metrics.registry.collect()
              if family.name.startswith("process_") for sample in family.samples}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind = metric._name, metric._type
        if kind == "counter":
            names |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            names.add(name)
    return names


def test_prometheus_loads_the_rules_compose_mounts() -> None:
    spec = compose()
    prometheus = yaml.safe_load(spec["configs"]["prometheus"]["content"])
    mounted = {c["target"]: c["source"] for c in spec["services"]["prometheus"]["configs"]}
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounted["/etc/prometheus/alerts.yml"] == "alerts"


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def test_a_replica_removed_leaves_the_targets_well_within_the_replica_down_alert_s_hold() -> None:
    """A Docker drill of the README's rolling upgrade: the old replicas, removed, stayed
    listed as down for about 34 s (Prometheus asks the DNS again every 30 s by default), and
    `ProvisionerReplicaDown` was pending for about 40 s of its minute. The discovery is asked
    again at the scrape interval, so a replica removed leaves within a few scrapes."""
    prometheus = yaml.safe_load(compose()["configs"]["prometheus"]["content"])
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "provisioner"]
    [discovery] = job["dns_sd_configs"]
    refresh = _seconds(discovery.get("refresh_interval", "30s"))
    [down] = [rule for rule in rules() if rule.get("alert") == "ProvisionerReplicaDown"]
    assert refresh <= _seconds(prometheus["global"]["scrape_interval"])
    assert 3 * (refresh + _seconds(prometheus["global"]["evaluation_interval"])) \
        <= _seconds(down["for"])


def test_every_template_dollar_is_escaped_for_compose() -> None:
    raw = compose()["configs"]["alerts"]["content"]
    assert "{{" in raw and not re.search(r"(?<!\$)\$(?!\$)", raw.replace("$$", ""))


def test_every_series_an_alert_reads_is_one_the_replicas_export() -> None:
    exported = exported_series()
    assert "provisioner_event_lag_seconds" in exported and "provisioner_misses_total" in exported
    read = set()
    for rule in rules():
        names = set(re.findall(r"\b((?:provisioner|process)_[a-z_]+|up)\b(?=\s*[{\[)=<> ]|$)",
                               rule["expr"]))
        assert names, rule["alert"]
        read |= names
    assert read <= exported, read - exported


def test_a_registry_given_that_holds_the_process_series_takes_the_metrics() -> None:
    """The process's series (the stall alert reads its start time) are added to a registry
    of the replica's own; one given may hold them already, as prometheus_client's default
    does, and registering them twice raised (a review)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    given = CollectorRegistry(auto_describe=True)  # as the default registry is
    ProcessCollector(registry=given)
    Metrics(registry=given)
    assert "process_start_time_seconds" in exported_series() or not Path("/proc/self").exists()


def test_every_alert_says_how_bad_and_what_to_look_at() -> None:
    found = rules()
    assert len(found) >= 8
    for rule in found:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["alert"].startswith("Provisioner")


def test_promtool_accepts_the_rules_and_they_fire_as_their_tests_say(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    (tmp_path / "alerts.yml").write_text(rules_text())
    shutil.copy(ROOT / "tests" / "alerts_test.yml", tmp_path / "alerts_test.yml")
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *command], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_place_the_replica_counts_errors_in_is_exported_from_the_start() -> None:
    """`provisioner_errors_total{where}` is exported at 0 for each of ERROR_PLACES, so a query
    on one reads 0 until it counts (README, "Debugging"); the heartbeat's look for other pools
    counted in `other_pools`, which was not among them."""
    from provisioner.metrics import ERROR_PLACES

    source = (ROOT / "provisioner" / "service.py").read_text()
    counted = set(re.findall(r'errors\.labels\("(\w+)"\)', source))
    counted |= set(re.findall(r'self\._every\([^"]*"(\w+)"', source))
    assert {"event", "tick", "reconcile", "heartbeat"} <= counted
    assert counted <= set(ERROR_PLACES), counted - set(ERROR_PLACES)
