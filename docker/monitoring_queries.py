"""Every PromQL query the deployment runs (dashboard panels, alert rules) and the metric
names they use, for the checks in tests/test_deploy_*.py.

A histogram's ``_bucket``/``_sum``/``_count`` series and a counter's ``_total`` series map
back to the metric family that prometheus-client registers, so names can be compared with
a registry or a live ``/metrics`` scrape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

DOCKER_DIR = Path(__file__).resolve().parent
DASHBOARD_DIR = DOCKER_DIR / "grafana" / "dashboards"
ALERTS_PATH = DOCKER_DIR / "prometheus" / "alerts.yml"

_METRIC_RE = re.compile(r"\btplr_[a-zA-Z0-9_]*[a-zA-Z0-9]\b")
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "info": ("_info",),
}
# Values Grafana substitutes before a query reaches Prometheus (for running them directly).
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}


@dataclass(frozen=True, slots=True)
class Query:
    source: str  # "tplr-node.json: Window" or "alerts.yml: TplrNodeDown"
    expr: str


def dashboard_queries(directory: Path = DASHBOARD_DIR) -> list[Query]:
    """Every panel target and template-variable query of every dashboard."""
    found = []
    for path in sorted(directory.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append(Query(f"{path.name}: {panel['title']}", target["expr"]))
        for variable in board.get("templating", {}).get("list", []):
            found.append(Query(f"{path.name}: ${variable['name']}", variable["definition"]))
    return found


def alert_queries(path: Path = ALERTS_PATH) -> list[Query]:
    """Every rule expression, plus the queries inside annotation templates."""
    found = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            found.append(Query(f"{path.name}: {name}", rule["expr"]))
            for text in rule.get("annotations", {}).values():
                for inner in re.findall(r'printf "([^"]+)"', text):
                    found.append(Query(f"{path.name}: {name} (annotation)", inner))
    return found


def metric_names_in(expr: str) -> set[str]:
    """The ``tplr_*`` series names an expression selects (label values are not names)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_METRIC_RE.findall(without_strings))


def series_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """Series names a query may use, from ``(family name, type)`` pairs."""
    names = set()
    for name, kind in families:
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


def unknown_metrics(queries: Iterable[Query], known: set[str]) -> Iterator[str]:
    """``"source: name"`` for every metric a query uses that is not in ``known``."""
    for query in queries:
        for name in sorted(metric_names_in(query.expr) - known):
            yield f"{query.source}: {name}"


def runnable(expr: str) -> str:
    """The query as Grafana sends it to Prometheus (template variables filled in)."""
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr
