"""The alert rules whose durations follow the run's window length, unit-tested with promtool
at 120 s (a fresh run's default), 360 s and 1500 s (templar-like) windows.

For each window length the test writes a promtool case per rule (series minute by minute,
one that must fire and a near miss that must not), renders the expected annotations from
alerts.yml itself, and runs ``promtool test rules``. A rule with a hard-coded duration (the
old ``20m``) fails these cases: the last test shows it.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
WINDOWS_S = (120, 360, 1500)
STOP_WINDOW = 4  # the faulty node stops after this many windows
MINUTE = 60


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run scripts/setup_env.sh --with-test-tools as root")
    return path


def humanize_duration(seconds: float) -> str:
    """Prometheus' ``humanizeDuration`` for values of one second or more."""
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def expected(alert: str, instance: str, value: float | None = None, **labels: str) -> dict:
    rule = rules()[alert]
    annotations = {}
    for name, text in rule["annotations"].items():
        text = text.replace("{{ $labels.instance }}", instance)
        if value is not None:
            text = text.replace("{{ $value | humanizeDuration }}", humanize_duration(value))
        annotations[name] = text
    return {
        "exp_labels": {**rule["labels"], "job": "tplr", "instance": instance, **labels},
        "exp_annotations": annotations,
    }


class Series:
    """Minute-by-minute values of the series of one case."""

    def __init__(self, minutes: int) -> None:
        self.minutes = minutes
        self.items: list[dict] = []

    def add(self, name: str, instance: str, value_at, **labels: str) -> None:
        label_text = ", ".join(f'{k}="{v}"' for k, v in {"job": "tplr", "instance": instance,
                                                          **labels}.items())  # fmt: skip
        values = " ".join(_number(value_at(m * MINUTE)) for m in range(self.minutes + 1))
        self.items.append({"series": f"{name}{{{label_text}}}", "values": values})

    def info(self, instance: str, role: str) -> None:
        labels = {"role": role, "uid": "1", "run_id": "r", "version": "0"}
        self.add("tplr_node_info", instance, lambda t: 1, **labels)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def last_window_start(t: float, window_s: int, stop_window: int | None = None) -> float:
    done = math.floor(t / window_s)
    return float((done if stop_window is None else min(done, stop_window)) * window_s)


def case(name: str, series: Series, checks: list[tuple[int, str, list[dict]]]) -> dict:
    return {
        "name": name,
        "interval": "1m",
        "input_series": series.items,
        "alert_rule_test": [
            {"eval_time": f"{at}s", "alertname": alert, "exp_alerts": alerts}
            for at, alert, alerts in checks
        ],
    }


def no_progress_case(w: int) -> dict:
    stop = STOP_WINDOW * w
    fire_at = stop + 3 * w + 3 * MINUTE
    series = Series(fire_at // MINUTE + 2)
    for instance, stop_window in (("stuck", STOP_WINDOW), ("fine", None)):
        series.add("tplr_run_window_seconds", instance, lambda t: w)
        series.add(
            "tplr_last_window_progress_timestamp_seconds",
            instance,
            lambda t, s=stop_window: last_window_start(t, w, s),
        )
    return case(
        f"no window progress for 3 windows of {w}s",
        series,
        [
            (stop + 3 * w - MINUTE, "TplrNoWindowProgress", []),
            (fire_at, "TplrNoWindowProgress",
             [expected("TplrNoWindowProgress", "stuck", fire_at - stop)]),
        ],
    )  # fmt: skip


def uploads_case(w: int, alert: str, role: str, timestamp: str) -> dict:
    """``stops`` does it until window 4, ``never`` never does, ``fine`` always; a node of the
    other role never does it and is not alerted on."""
    stop = STOP_WINDOW * w
    fire_at = stop + 3 * w + 3 * MINUTE
    series = Series(fire_at // MINUTE + 2)
    other = "validator" if role == "miner" else "miner"
    for instance, node_role in (("stops", role), ("never", role), ("fine", role), ("other", other)):
        series.info(instance, node_role)
        series.add("tplr_run_window_seconds", instance, lambda t: w)
        series.add("tplr_windows_completed_total", instance, lambda t: math.floor(t / w))
        if instance in ("stops", "fine"):
            stop_window = STOP_WINDOW if instance == "stops" else None
            series.add(timestamp, instance, lambda t, s=stop_window: last_window_start(t, w, s))
    never = expected(alert, "never")
    return case(
        f"{alert} at {w}s windows",
        series,
        [
            (3 * w - MINUTE, alert, []),
            (stop + 3 * w - MINUTE, alert, [never]),
            (fire_at, alert, [never, expected(alert, "stops")]),
        ],
    )


def checkpoint_case(w: int) -> dict:
    every = 2
    threshold = 3 * every * w
    fire_at = threshold + MINUTE + 5 * MINUTE + MINUTE  # first true evaluation, for: 5m, margin
    series = Series(fire_at // MINUTE + 2)
    for instance, role in (("lead", "validator"), ("miner", "miner")):
        series.info(instance, role)
        series.add("tplr_run_window_seconds", instance, lambda t: w)
        series.add("tplr_run_checkpoint_every_windows", instance, lambda t: every)
        series.add("tplr_checkpoint_age_seconds", instance, lambda t: t + 10)
    return case(
        f"checkpoint older than 3 intervals of {every} x {w}s",
        series,
        [
            (threshold - 2 * MINUTE, "TplrCheckpointStale", []),
            (fire_at, "TplrCheckpointStale",
             [expected("TplrCheckpointStale", "lead", fire_at + 10)]),
        ],
    )  # fmt: skip


def window_cases(w: int) -> list[dict]:
    return [
        no_progress_case(w),
        uploads_case(w, "TplrGradientUploadMissing", "miner", "tplr_last_upload_timestamp_seconds"),
        uploads_case(
            w,
            "TplrValidatorScoresNotPublished",
            "validator",
            "tplr_scores_published_timestamp_seconds",
        ),
        checkpoint_case(w),
    ]


def run_promtool(folder: Path, alerts_text: str, tests: list[dict]) -> subprocess.CompletedProcess:
    (folder / "alerts.yml").write_text(alerts_text)
    document = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (folder / "window_test.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    return subprocess.run(
        [promtool(), "test", "rules", "window_test.yml"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("window_s", WINDOWS_S)
def test_window_alerts_follow_the_run_window_length(window_s: int, tmp_path: Path):
    result = run_promtool(tmp_path, ALERTS.read_text(), window_cases(window_s))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "SUCCESS" in result.stdout


def test_a_hard_coded_duration_fails_at_other_window_lengths(tmp_path: Path):
    """The rule as it was (3 windows written as 20 minutes) passes at 360 s only."""
    hard_coded = ALERTS.read_text().replace(
        "(time() - tplr_last_window_progress_timestamp_seconds)\n"
        "          > on (job, instance) (3 * tplr_run_window_seconds)",
        "(time() - tplr_last_window_progress_timestamp_seconds) > 20 * 60",
    )
    assert hard_coded != ALERTS.read_text()
    for window_s in (120, 1500):
        result = run_promtool(tmp_path, hard_coded, [no_progress_case(window_s)])
        assert result.returncode != 0, window_s
        assert "TplrNoWindowProgress" in result.stdout + result.stderr
