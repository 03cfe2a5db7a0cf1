#!/usr/bin/env python3
"""Generate the Grafana dashboards (JSON) that the compose stack provisions.

    .venv/bin/python docker/grafana/gen_dashboards.py           # rewrite dashboards/*.json
    .venv/bin/python docker/grafana/gen_dashboards.py --check   # exit 1 if one is stale

Panels are described below as (title, PromQL, unit) and laid out on Grafana's 24-column grid.
Queries use only metrics the node exports (tests/test_deploy_live.py checks them against a live
``/metrics`` scrape and runs every query through a real Prometheus). Shard-state value mappings
come from :data:`tplr.data.shard_state.STATE_CODES`, so they cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from tplr.data.shard_state import STATE_CODES  # noqa: E402

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
PER_WINDOW = "30m"  # once-per-window events (uploads, gathers): a few windows per point
PER_SHARD = "6h"  # once-per-shard events (swaps): several shards per point
GRID_WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | state-timeline | bargauge
    width: int = 8
    height: int = 8
    description: str = ""
    mappings: tuple[dict, ...] = ()
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "{{instance}}") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, what: str, over: str = RATE) -> tuple[Query, ...]:
    """p50 and p95 of a histogram, per instance, over ``over`` (longer for rare events)."""
    return tuple(
        q(
            f"histogram_quantile({p}, "
            f"sum by (le, instance) (rate({metric}_bucket{{{SEL}}}[{over}])))",
            f"{{{{instance}}}} {what} p{int(p * 100)}",
        )
        for p in (0.5, 0.95)
    )


def shard_state_mappings() -> tuple[dict, ...]:
    colors = {"remote": "blue", "downloading": "orange", "ready": "yellow"}
    colors |= {"active": "green", "retired": "gray"}
    options = {
        str(code): {"text": state.value, "color": colors.get(state.value, "text"), "index": code}
        for state, code in STATE_CODES.items()
    }
    return ({"type": "value", "options": options},)


def progress_row() -> Row:
    return Row(
        "Progress",
        (
            Panel("Window", (q(f"tplr_window{{{SEL}}}"),), kind="stat", width=6, height=5),
            Panel(
                "Since last completed window",
                (q(f"time() - tplr_last_window_progress_timestamp_seconds{{{SEL}}}"),),
                unit="s",
                kind="stat",
                width=6,
                height=5,
                description="Alert TplrNoWindowProgress fires past 3 windows.",
            ),
            Panel(
                "Tokens / s",
                (q(f"tplr_tokens_per_second{{{SEL}}}"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "MFU",
                (q(f"tplr_mfu_ratio{{{SEL}}}"),),
                unit="percentunit",
                kind="stat",
                width=6,
                height=5,
                description="Empty (NaN) on CPU or an unknown GPU.",
            ),
        ),
    )


def training_row() -> Row:
    return Row(
        "Training",
        (
            Panel(
                "Loss and validation loss",
                (
                    q(f"tplr_loss{{{SEL}}}", "{{instance}} train"),
                    q(f"tplr_train_eval_loss{{{SEL}}}", "{{instance}} validation"),
                ),
            ),
            Panel("Tokens / s", (q(f"tplr_tokens_per_second{{{SEL}}}"),)),
            Panel("MFU", (q(f"tplr_mfu_ratio{{{SEL}}}"),), unit="percentunit"),
            Panel("Inner step time", quantiles("tplr_inner_step_seconds", "step"), unit="s"),
            Panel(
                "Outer step norm and clipped peers",
                (
                    q(f"tplr_outer_step_norm{{{SEL}}}", "{{instance}} norm"),
                    q(f"tplr_aggregation_clipped_peers{{{SEL}}}", "{{instance}} clipped"),
                ),
            ),
            Panel("Window", (q(f"tplr_window{{{SEL}}}"),)),
        ),
    )


def data_row() -> Row:
    by_dir = "sum by (instance, direction)"
    return Row(
        "Data: shards, downloads, disk",
        (
            Panel(
                "Shard state",
                (q(f"tplr_dataset_shard_state{{{SEL}}}", "{{instance}} shard {{shard}}"),),
                kind="state-timeline",
                width=12,
                mappings=shard_state_mappings(),
            ),
            Panel("Active shard", (q(f"tplr_dataset_active_shard{{{SEL}}}"),), width=6),
            Panel(
                "Prefetch lead time",
                quantiles("tplr_dataset_prefetch_lead_seconds", "lead", over=PER_SHARD),
                unit="s",
                width=6,
                description="How long before its window the next shard was ready (higher is "
                "safer; 0 means training waited).",
            ),
            Panel(
                "Download / upload throughput",
                (
                    q(
                        f"{by_dir} (rate(tplr_transfer_bytes_total{{{SEL}}}[{RATE}]))",
                        "{{instance}} {{direction}}",
                    ),
                ),
                unit="Bps",
            ),
            Panel(
                "Retries by reason",
                (
                    q(
                        f"sum by (instance, direction, reason) "
                        f"(rate(tplr_transfer_retries_total{{{SEL}}}[{RATE}]))",
                        "{{instance}} {{direction}} {{reason}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel("Part latency", quantiles("tplr_transfer_part_seconds", "part"), unit="s"),
            Panel(
                "Disk",
                (
                    q(f"tplr_dataset_disk_free_bytes{{{SEL}}}", "{{instance}} free"),
                    q(f"tplr_dataset_next_shard_bytes{{{SEL}}}", "{{instance}} next shard"),
                    q(f"tplr_dataset_bytes_on_disk{{{SEL}}}", "{{instance}} shards on disk"),
                ),
                unit="bytes",
            ),
            Panel(
                "Training stalled waiting for data",
                (q(f"increase(tplr_dataset_stall_seconds_total{{{SEL}}}[{RATE}])"),),
                unit="s",
            ),
            Panel(
                "Shard download failures and disk refusals",
                (
                    q(
                        f"sum by (instance, reason) "
                        f"(increase(tplr_dataset_download_failures_total{{{SEL}}}[{RATE}]))",
                        "{{instance}} failed: {{reason}}",
                    ),
                    q(
                        f"increase(tplr_dataset_disk_refusals_total{{{SEL}}}[{RATE}])",
                        "{{instance}} disk refusals",
                    ),
                ),
            ),
        ),
    )


def exchange_row() -> Row:
    return Row(
        "Exchange: uploads, gathers, peers",
        (
            Panel("Upload time", quantiles("tplr_upload_seconds", "up", PER_WINDOW), unit="s"),
            Panel("Gather time", quantiles("tplr_gather_seconds", "gather", PER_WINDOW), unit="s"),
            Panel("Payload size", (q(f"tplr_payload_bytes{{{SEL}}}"),), unit="bytes"),
            Panel("Peers gathered", (q(f"tplr_peers_gathered{{{SEL}}}"),), width=12),
            rejections_panel(width=12),
        ),
    )


def rejections_panel(width: int = 12) -> Panel:
    return Panel(
        "Peers rejected by reason",
        (
            q(
                f"sum by (reason) (increase(tplr_peers_rejected_total{{{SEL}}}[{RATE}])) > 0",
                "{{reason}}",
            ),
        ),
        width=width,
        description="Reasons: see docs/protocol.md (payload checks).",
    )


def validator_rows() -> tuple[Row, ...]:
    scores = Row(
        "Scores",
        (
            Panel(
                "Score per miner uid",
                (q(f"tplr_peer_score{{{SEL}}}", "uid {{uid}}"),),
                width=16,
                height=10,
            ),
            Panel(
                "Current scores",
                (q(f"sort_desc(tplr_peer_score{{{SEL}}})", "uid {{uid}}"),),
                kind="bargauge",
                width=8,
                height=10,
                options={"orientation": "horizontal", "displayMode": "basic"},
            ),
            rejections_panel(width=12),
            Panel(
                "Rejections by reason, last 24h",
                (
                    q(
                        f"sum by (reason) (increase(tplr_peers_rejected_total{{{SEL}}}[24h]))",
                        "{{reason}}",
                    ),
                ),
                kind="bargauge",
                width=12,
                options={"orientation": "horizontal", "displayMode": "basic"},
            ),
        ),
    )
    state = Row(
        "Validator state",
        (
            Panel(
                "Checkpoint age",
                (q(f"tplr_checkpoint_age_seconds{{{SEL}}}"),),
                unit="s",
                kind="stat",
                width=6,
                height=5,
                description="Since the last checkpoint was saved or loaded.",
            ),
            Panel("Window", (q(f"tplr_window{{{SEL}}}"),), kind="stat", width=6, height=5),
            Panel(
                "Miners scored",
                (q(f"count by (instance) (tplr_peer_score{{{SEL}}})"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Peers gathered",
                (q(f"tplr_peers_gathered{{{SEL}}}"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Checkpoint age over time", (q(f"tplr_checkpoint_age_seconds{{{SEL}}}"),), unit="s"
            ),
            Panel("Gather time", quantiles("tplr_gather_seconds", "gather", PER_WINDOW), unit="s"),
            Panel("Loss", (q(f"tplr_loss{{{SEL}}}"),)),
        ),
    )
    return state, scores


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
    selector = f'{{role="{role}"}}' if role else ""
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
                    "label": "node",
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
                    "allValue": ".*",
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
    node_rows = (progress_row(), training_row(), data_row(), exchange_row())
    return {
        "tplr-node.json": dashboard("tplr-node", "tplr node", node_rows, None),
        "tplr-validator.json": dashboard(
            "tplr-validator", "tplr validator", validator_rows(), "validator"
        ),
    }


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
