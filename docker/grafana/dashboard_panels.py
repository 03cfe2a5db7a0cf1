"""The panels of the provisioned dashboards, as (title, PromQL, unit) data.

A :class:`Query` says what it needs to return data (``needs``: a GPU, a failure, a shard
swap), and whether a zero is a measurement (``zero_ok``: counts and rates of events, 0/1
outcomes) rather than a placeholder; tests/test_deploy_live.py runs every query against the
demo network and holds each one to that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
PER_WINDOW = "30m"  # once-per-window events (uploads, gathers): a few windows per point
PER_SHARD = "6h"  # once-per-shard events (swaps): several shards per point
NEEDS_GPU = "a CUDA GPU"
NEEDS_FAILURE = "a failure of that kind"
NEEDS_SWAP = "a shard swap"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    needs: str = ""  # empty: the demo network must return data for it
    zero_ok: bool = False  # a 0 is a measured value (an event count, a 0/1 outcome)


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


def q(expr: str, legend: str = "{{instance}}", **kwargs) -> Query:
    return Query(expr, legend, **kwargs)


def quantiles(metric: str, what: str, over: str = RATE, needs: str = "") -> tuple[Query, ...]:
    """p50 and p95 of a histogram, per instance, over ``over`` (longer for rare events)."""
    return tuple(
        q(
            f"histogram_quantile({p}, "
            f"sum by (le, instance) (rate({metric}_bucket{{{SEL}}}[{over}])))",
            f"{{{{instance}}}} {what} p{int(p * 100)}",
            needs=needs,
        )
        for p in (0.5, 0.95)
    )


def value_mappings(names: dict[int, tuple[str, str]]) -> tuple[dict, ...]:
    """``{value: (text, color)}`` as one Grafana value mapping."""
    options = {
        str(value): {"text": text, "color": color, "index": index}
        for index, (value, (text, color)) in enumerate(sorted(names.items()))
    }
    return ({"type": "value", "options": options},)


def shard_state_mappings(state_codes: dict) -> tuple[dict, ...]:
    colors = {"remote": "blue", "downloading": "orange", "ready": "yellow"}
    colors |= {"active": "green", "retired": "gray"}
    return value_mappings(
        {
            code: (state.value, colors.get(state.value, "text"))
            for state, code in state_codes.items()
        }
    )


STAT = {"kind": "stat", "width": 4, "height": 5}


def progress_row() -> Row:
    return Row(
        "Progress",
        (
            Panel(
                "State",
                (q(f"tplr_node_state{{{SEL}}} == 1", "{{instance}}: {{state}}"),),
                options={"textMode": "name", "colorMode": "background"},
                description="starting / joining / downloading / training / validating / "
                "stalled; /healthz says what a starting node waits for.",
                **STAT,
            ),
            Panel("Window", (q(f"tplr_window{{{SEL}}}"),), **STAT),
            Panel(
                "Since last completed window",
                (q(f"time() - tplr_last_window_progress_timestamp_seconds{{{SEL}}}"),),
                unit="s",
                description="Alert TplrNoWindowProgress fires past 3 windows of the run.",
                **STAT,
            ),
            Panel("Run window", (q(f"tplr_run_window_seconds{{{SEL}}}"),), unit="s", **STAT),
            Panel("Tokens / s", (q(f"tplr_tokens_per_second{{{SEL}}}"),), **STAT),
            Panel(
                "MFU",
                (q(f"tplr_mfu_ratio{{{SEL}}}", needs=NEEDS_GPU),),
                unit="percentunit",
                description="Absent on CPU or an unknown GPU.",
                **STAT,
            ),
        ),
    )


def training_row() -> Row:
    return Row(
        "Training (miners; validation loss from the lead)",
        (
            Panel(
                "Training and validation loss",
                (
                    q(f"tplr_loss{{{SEL}}}", "{{instance}} train"),
                    q(f"tplr_validation_loss{{{SEL}}}", "{{instance}} validation (lead)"),
                ),
            ),
            Panel("Tokens / s", (q(f"tplr_tokens_per_second{{{SEL}}}"),)),
            Panel("MFU", (q(f"tplr_mfu_ratio{{{SEL}}}", needs=NEEDS_GPU),), unit="percentunit"),
            Panel("Inner step time", quantiles("tplr_inner_step_seconds", "step"), unit="s"),
            Panel(
                "Outer step norm and approved payloads",
                (
                    q(f"tplr_outer_step_norm{{{SEL}}}", "{{instance}} norm"),
                    q(
                        f"tplr_aggregation_approved_peers{{{SEL}}}",
                        "{{instance}} approved",
                        zero_ok=True,
                    ),
                ),
            ),
            Panel("Window", (q(f"tplr_window{{{SEL}}}"),)),
        ),
    )


def gpu_row() -> Row:
    by_gpu = "{{instance}} gpu {{gpu}}"
    return Row(
        "GPU",
        (
            Panel(
                "GPU utilisation (NVML)",
                (q(f"tplr_gpu_utilization_ratio{{{SEL}}}", by_gpu, needs=NEEDS_GPU),),
                unit="percentunit",
                width=6,
            ),
            Panel(
                "GPU memory used / total",
                (
                    q(f"tplr_gpu_memory_used_bytes{{{SEL}}}", f"{by_gpu} used", needs=NEEDS_GPU),
                    q(f"tplr_gpu_memory_total_bytes{{{SEL}}}", f"{by_gpu} total", needs=NEEDS_GPU),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "This process: allocated / reserved",
                (
                    q(
                        f"tplr_gpu_memory_allocated_bytes{{{SEL}}}",
                        f"{by_gpu} allocated",
                        needs=NEEDS_GPU,
                    ),
                    q(
                        f"tplr_gpu_memory_reserved_bytes{{{SEL}}}",
                        f"{by_gpu} reserved",
                        needs=NEEDS_GPU,
                    ),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "GPU power (NVML)",
                (q(f"tplr_gpu_power_watts{{{SEL}}}", by_gpu, needs=NEEDS_GPU),),
                unit="watt",
                width=6,
            ),
        ),
    )


def data_row(state_codes: dict) -> Row:
    by_dir = "sum by (instance, direction)"
    return Row(
        "Data: shards, downloads, disk",
        (
            Panel(
                "Shard state",
                (
                    q(
                        f"tplr_dataset_shard_state{{{SEL}}}",
                        "{{instance}} shard {{shard}}",
                        zero_ok=True,
                    ),
                ),
                kind="state-timeline",
                width=12,
                mappings=shard_state_mappings(state_codes),
            ),
            Panel(
                "Active shard",
                (q(f"tplr_dataset_active_shard{{{SEL}}}", zero_ok=True),),
                width=6,
            ),
            Panel(
                "Prefetch lead time",
                quantiles("tplr_dataset_prefetch_lead_seconds", "lead", PER_SHARD, NEEDS_SWAP),
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
                        zero_ok=True,
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
                        needs=NEEDS_FAILURE,
                        zero_ok=True,
                    ),
                ),
                unit="reqps",
            ),
            Panel("Part latency", quantiles("tplr_transfer_part_seconds", "part"), unit="s"),
            Panel(
                "Disk",
                (
                    q(f"tplr_dataset_disk_free_bytes{{{SEL}}}", "{{instance}} free"),
                    q(
                        f"tplr_dataset_next_shard_bytes{{{SEL}}}",
                        "{{instance}} next shard",
                        zero_ok=True,
                    ),
                    q(
                        f"tplr_dataset_bytes_on_disk{{{SEL}}}",
                        "{{instance}} shards on disk",
                        zero_ok=True,
                    ),
                ),
                unit="bytes",
            ),
            Panel(
                "Training stalled waiting for data",
                (
                    q(
                        f"increase(tplr_dataset_stall_seconds_total{{{SEL}}}[{RATE}])",
                        zero_ok=True,
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Shard download failures and disk refusals",
                (
                    q(
                        f"sum by (instance, reason) "
                        f"(increase(tplr_dataset_download_failures_total{{{SEL}}}[{RATE}]))",
                        "{{instance}} failed: {{reason}}",
                        needs=NEEDS_FAILURE,
                        zero_ok=True,
                    ),
                    q(
                        f"increase(tplr_dataset_disk_refusals_total{{{SEL}}}[{RATE}])",
                        "{{instance}} disk refusals",
                        zero_ok=True,
                    ),
                ),
            ),
        ),
    )


def rejections_panel(width: int = 12) -> Panel:
    return Panel(
        "Peers rejected by reason",
        (
            q(
                f"sum by (reason) (increase(tplr_peers_rejected_total{{{SEL}}}[{RATE}])) > 0",
                "{{reason}}",
                needs=NEEDS_FAILURE,
            ),
        ),
        width=width,
        description="Reasons: see docs/protocol.md (payload checks).",
    )


def exchange_row() -> Row:
    return Row(
        "Exchange: uploads, gathers, peers",
        (
            Panel("Upload time", quantiles("tplr_upload_seconds", "up", PER_WINDOW), unit="s"),
            Panel("Gather time", quantiles("tplr_gather_seconds", "gather", PER_WINDOW), unit="s"),
            Panel("Payload size", (q(f"tplr_payload_bytes{{{SEL}}}"),), unit="bytes"),
            Panel("Peers gathered", (q(f"tplr_peers_gathered{{{SEL}}}", zero_ok=True),), width=12),
            rejections_panel(width=12),
        ),
    )


def validator_rows() -> tuple[Row, ...]:
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
                (q(f"tplr_peers_gathered{{{SEL}}}", zero_ok=True),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Validation loss (lead, held-out shard)",
                (q(f"tplr_validation_loss{{{SEL}}}"),),
            ),
            Panel("Gather time", quantiles("tplr_gather_seconds", "gather", PER_WINDOW), unit="s"),
            Panel(
                "Checkpoint age over time", (q(f"tplr_checkpoint_age_seconds{{{SEL}}}"),), unit="s"
            ),
        ),
    )
    scores = Row(
        "Scores",
        (
            Panel(
                "Score per miner uid",
                (q(f"tplr_peer_score{{{SEL}}}", "uid {{uid}}", zero_ok=True),),
                width=16,
                height=10,
            ),
            Panel(
                "Current scores",
                (q(f"sort_desc(tplr_peer_score{{{SEL}}})", "uid {{uid}}", zero_ok=True),),
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
                        zero_ok=True,
                    ),
                ),
                kind="bargauge",
                width=12,
                options={"orientation": "horizontal", "displayMode": "basic"},
            ),
        ),
    )
    return state, scores


YES_NO = value_mappings({0: ("no", "red"), 1: ("yes", "green")})


def network_rows() -> tuple[Row, ...]:
    """Every miner as the selected validator judged it in its last window."""
    by_uid = "uid {{uid}}"
    outcomes = Row(
        "Every miner, last window (as the selected validator saw it)",
        (
            Panel(
                "Score per uid (moving average)",
                (q(f"sort_desc(tplr_peer_score{{{SEL}}})", by_uid, zero_ok=True),),
                kind="bargauge",
                width=8,
                height=10,
                options={"orientation": "horizontal", "displayMode": "basic"},
            ),
            Panel(
                "Upload on time",
                (q(f"tplr_peer_on_time{{{SEL}}}", by_uid, zero_ok=True),),
                kind="state-timeline",
                width=8,
                height=10,
                mappings=YES_NO,
            ),
            Panel(
                "Approved (aggregated)",
                (q(f"tplr_peer_approved{{{SEL}}}", by_uid, zero_ok=True),),
                kind="state-timeline",
                width=8,
                height=10,
                mappings=YES_NO,
            ),
            Panel(
                "Passed the score gate",
                (q(f"tplr_peer_gate_passed{{{SEL}}}", by_uid, zero_ok=True),),
                kind="state-timeline",
                width=8,
                mappings=YES_NO,
            ),
            Panel(
                "Reward per window",
                (q(f"tplr_peer_reward{{{SEL}}}", by_uid, zero_ok=True),),
                width=8,
            ),
            Panel(
                "Miners on time / approved",
                (
                    q(f"sum by (instance) (tplr_peer_on_time{{{SEL}}})", "on time", zero_ok=True),
                    q(f"sum by (instance) (tplr_peer_approved{{{SEL}}})", "approved", zero_ok=True),
                    q(f"count by (instance) (tplr_peer_on_time{{{SEL}}})", "judged"),
                ),
                width=8,
            ),
        ),
    )
    return (outcomes,)
