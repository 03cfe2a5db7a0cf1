#!/usr/bin/env python3
"""Generate the Grafana dashboards (JSON) that the compose stack provisions.

    .venv/bin/python docker/grafana/gen_dashboards.py           # rewrite dashboards/*.json
    .venv/bin/python docker/grafana/gen_dashboards.py --check   # exit 1 if one is stale

Panels are described in ``dashboard_panels.py`` as (title, PromQL, unit) and laid out here on
Grafana's 24-column grid. Queries use only metrics the node exports (tests/test_deploy_live.py
checks them against a live ``/metrics`` scrape, runs every query through a real Prometheus
scraping the demo network, and requires data that is not a placeholder zero). Shard-state value
mappings come from :data:`tplr.data.shard_state.STATE_CODES`, so they cannot drift from the
code. Dashboards: ``tplr-node`` (any node), ``tplr-validator`` (validators only) and
``tplr-network`` (every miner's score, upload on time, approval, as a validator judged it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard_panels import (  # noqa: E402
    Panel,
    Query,
    Row,
    data_row,
    exchange_row,
    gpu_row,
    network_rows,
    progress_row,
    training_row,
    validator_rows,
)

from tplr.data.shard_state import STATE_CODES  # noqa: E402

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/
GRID_WIDTH = 24


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    body: dict = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
            }
            for i, query in enumerate(panel.queries)
        ],
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "mappings": list(panel.mappings)},
            "overrides": [],
        },
        "options": dict(panel.options),
    }
    if panel.description:
        body["description"] = panel.description
    return body


def layout(rows: tuple[Row, ...]) -> list[dict]:
    """Rows of panels, wrapped at 24 columns, with unique ids."""
    panels: list[dict] = []
    y = 0
    next_id = 1
    for row in rows:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": GRID_WIDTH, "h": 1},
                "panels": [],
            }
        )
        next_id, y, x, line_height = next_id + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, next_id, x, y))
            next_id, x, line_height = next_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return panels


def dashboard(uid: str, title: str, rows: tuple[Row, ...], role: str | None) -> dict:
    """``$instance`` lists the nodes of ``role``; "All" means exactly those (no regex that
    would pull in the other role's nodes)."""
    selector = f'{{role="{role}"}}' if role else ""
    label = f"{role} node" if role else "node"
    return {
        "uid": uid,
        "title": title,
        "tags": ["tplr"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": label,
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": f"label_values(tplr_node_info{selector}, instance)",
                        "refId": "instance",
                    },
                    "definition": f"label_values(tplr_node_info{selector}, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": layout(rows),
    }


def build_dashboards() -> dict[str, dict]:
    """``{file name: dashboard}`` for every provisioned dashboard."""
    node_rows = (progress_row(), training_row(), gpu_row(), data_row(STATE_CODES), exchange_row())
    return {
        "tplr-node.json": dashboard("tplr-node", "tplr node", node_rows, None),
        "tplr-validator.json": dashboard(
            "tplr-validator", "tplr validator", validator_rows(), "validator"
        ),
        "tplr-network.json": dashboard("tplr-network", "tplr network", network_rows(), "validator"),
    }


def query_expectations() -> dict[str, Query]:
    """Every panel query's expression -> its :class:`Query` (needs, zero_ok), for the tests."""
    found: dict[str, Query] = {}
    for rows in ((progress_row(), training_row(), gpu_row(), data_row(STATE_CODES),
                  exchange_row()), validator_rows(), network_rows()):  # fmt: skip
        for row in rows:
            for panel in row.panels:
                for query in panel.queries:
                    found[query.expr] = query
    return found


def render(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a dashboard is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, board in build_dashboards().items():
        path = DASHBOARD_DIR / name
        text = render(board)
        if (path.read_text() if path.exists() else "") != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        names = ", ".join(p.name for p in stale)
        print(f"stale dashboards: {names}; run docker/grafana/gen_dashboards.py", file=sys.stderr)
        return 1
    print(f"{len(stale)} dashboard(s) {'stale' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
