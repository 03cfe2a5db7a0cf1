"""The monitoring stack against a running demo network (scripts/demo_network.py: a lead
validator and two miners on the embedded store, CPU, tiny model):

- every metric the dashboards and alert rules use appears in the nodes' live /metrics;
- a real Prometheus server (/usr/bin/prometheus, temp config and storage, 1 s scrapes on a
  free loopback port) scrapes the nodes and answers ``tplr_window`` through its HTTP API;
- every dashboard and alert query runs on that server, and every alert rule evaluates;
- every dashboard query returns data from the demo (except those that need a GPU, a
  failure or a shard swap, each marked so in docker/grafana/dashboard_panels.py), and none
  plots only zeros unless zero is a measured value there (an event count, a 0/1 outcome).

Prometheus is required: a missing binary fails the test (scripts/setup_env.sh installs it).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docker"))
sys.path.insert(0, str(REPO / "docker" / "grafana"))
sys.path.insert(0, str(REPO / "scripts"))
import demo_network  # noqa: E402
import gen_dashboards  # noqa: E402
import monitoring_queries as mq  # noqa: E402

WINDOW_SECONDS = 4.0
WINDOWS_BEFORE_CHECKS = 2
pytestmark = pytest.mark.timeout(600)


@dataclass
class DemoNetwork:
    nodes: list[demo_network.Node]
    home: Path

    def scrape(self, node: demo_network.Node) -> str:
        url = f"http://127.0.0.1:{node.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoNetwork]:
    home = tmp_path_factory.mktemp("demo")
    init_model = demo_network.prepare_home(home)
    nodes = demo_network.plan_nodes(home, WINDOW_SECONDS, init_model)
    shared = demo_network.LocalStore(home / "shared")
    try:
        for node in nodes:
            demo_network.start(node, home)
        demo_network.wait_for_windows(shared, nodes, WINDOWS_BEFORE_CHECKS, timeout_s=240)
        yield DemoNetwork(nodes, home)
    finally:
        codes = demo_network.stop_all(nodes)
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture(scope="module")
def prometheus(demo: DemoNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.fail("prometheus is not installed; run scripts/setup_env.sh as root")
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy(REPO / "docker" / "prometheus" / "alerts.yml", folder / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "tplr",
                "static_configs": [{"targets": [f"127.0.0.1:{node.port}" for node in demo.nodes]}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = demo_network.free_port()
    command = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(folder / "prometheus.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: _ready(server, process, folder), 60, "Prometheus to start")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(server: Prometheus, process: subprocess.Popen, folder: Path) -> bool:
    if process.poll() is not None:
        log = (folder / "prometheus.log").read_text()[-2000:]
        raise AssertionError(f"prometheus exited with {process.returncode}:\n{log}")
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def live_series_names(demo: DemoNetwork) -> set[str]:
    families = set()
    for node in demo.nodes:
        for family in text_string_to_metric_families(demo.scrape(node)):
            families.add((family.name, family.type))
    return mq.series_names(families)


def window_of(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "tplr_window":
            return family.samples[0].value
    raise AssertionError("no tplr_window in /metrics")


def test_dashboards_and_alerts_use_only_metrics_the_running_nodes_export(demo: DemoNetwork):
    known = live_series_names(demo)
    assert {"tplr_window", "tplr_peer_score", "tplr_transfer_bytes_total"} <= known
    unknown = list(mq.unknown_metrics(mq.alert_queries() + mq.dashboard_queries(), known))
    assert not unknown, f"not exported by the demo nodes: {unknown}"


def test_prometheus_scrapes_the_nodes_and_serves_their_window(demo, prometheus):
    def windows_of_all_nodes() -> dict[str, float] | None:
        result = prometheus.query('tplr_window{job="tplr"}')
        found = {r["metric"]["instance"]: float(r["value"][1]) for r in result}
        return found if len(found) == len(demo.nodes) else None

    windows = wait_until(windows_of_all_nodes, 60, "tplr_window of every node in Prometheus")
    for node in demo.nodes:
        live = window_of(demo.scrape(node))
        served = windows[f"127.0.0.1:{node.port}"]
        assert served >= WINDOWS_BEFORE_CHECKS - 1
        assert live - 2 <= served <= live, (node.name, served, live)
    up = prometheus.query('up{job="tplr"} == 1')
    assert len(up) == len(demo.nodes)


def test_every_dashboard_and_alert_query_runs_on_prometheus(demo, prometheus):
    wait_until(lambda: prometheus.query("tplr_window"), 60, "a first scrape")
    failures = []
    for query in mq.alert_queries() + mq.dashboard_queries():
        expr = mq.runnable(query.expr)
        if expr.startswith("label_values("):  # Grafana's variable query: run its selector
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        try:
            prometheus.query(expr)
        except urllib.error.HTTPError as exc:
            failures.append(f"{query.source}: {exc.read().decode()[:300]}")
    assert not failures, failures


def query_problem(prometheus: Prometheus, expr: str, zero_ok: bool) -> str | None:
    """Why this panel query would show nothing useful now, or None if it shows data."""
    values = [float(r["value"][1]) for r in prometheus.query(mq.runnable(expr))]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "no data" if not values else "only NaN/Inf"
    if not zero_ok and any(v == 0 for v in finite):
        return f"a series at exactly 0 (a placeholder?): {values}"
    return None


def test_every_dashboard_query_shows_data_from_the_demo(demo, prometheus):
    expectations = gen_dashboards.query_expectations()
    assert {q.expr for q in expectations.values()} == {
        target["expr"]
        for board in gen_dashboards.build_dashboards().values()
        for panel in board["panels"]
        for target in panel.get("targets", [])
    }
    required = {expr: q for expr, q in expectations.items() if not q.needs}
    assert len(required) >= 35, "most panels must show data on the CPU demo"
    problems: dict[str, str | None] = dict.fromkeys(required, "not run")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for expr, query in required.items():
            if problems[expr] is not None:
                problems[expr] = query_problem(prometheus, expr, query.zero_ok)
        if not any(problems.values()):
            break
        time.sleep(1)
    failing = {expr: why for expr, why in problems.items() if why}
    assert not failing, failing


def test_only_gpu_failure_and_swap_panels_may_be_empty():
    allowed = {"a CUDA GPU", "a failure of that kind", "a shard swap"}
    assert {q.needs for q in gen_dashboards.query_expectations().values()} <= {"", *allowed}


def test_every_alert_rule_loads_and_evaluates(demo, prometheus):
    expected = {
        rule.get("alert") or rule.get("record")
        for group in yaml.safe_load((REPO / "docker/prometheus/alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }

    def evaluated_rules() -> dict[str, dict] | None:
        groups = prometheus.api("rules")["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        done = all(r.get("lastEvaluation", "").startswith("20") for r in rules.values())
        return rules if rules and done else None

    rules = wait_until(evaluated_rules, 60, "every rule to be evaluated once")
    assert set(rules) == expected
    broken = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not broken, broken
