"""Prometheus config and alert rules (promtool), the compose file (docker-compose config),
and the Grafana dashboards and provisioning: valid, consistent, and using only metrics the
code registers. The tools are required: a missing one fails the test (make test installs
them through scripts/setup_env.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tplr.comms.transfer_metrics import TransferMetrics
from tplr.data.manager_metrics import DatasetMetrics
from tplr.node.process.metrics import NodeMetrics
from tplr.protocol.clock import FakeClock
from tplr.train.metrics import TrainMetrics

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
GRAFANA_DIR = DOCKER / "grafana"
sys.path.insert(0, str(DOCKER))
import monitoring_queries as mq  # noqa: E402

REQUIRED_ALERTS = {
    "TplrNodeDown",
    "TplrNoWindowProgress",
    "TplrDownloadStalled",
    "TplrRetryStorm",
    "TplrDiskAlmostFullForNextShard",
    "TplrLossNotFinite",
    "TplrLossRising",
    "TplrGradientUploadMissing",
    "TplrValidatorScoresNotPublished",
}
NODE_DASHBOARD_METRICS = {
    "tplr_node_state",
    "tplr_run_window_seconds",
    "tplr_window",
    "tplr_loss",
    "tplr_validation_loss",
    "tplr_gpu_utilization_ratio",
    "tplr_gpu_memory_used_bytes",
    "tplr_tokens_per_second",
    "tplr_mfu_ratio",
    "tplr_dataset_shard_state",
    "tplr_dataset_prefetch_lead_seconds_bucket",
    "tplr_transfer_bytes_total",
    "tplr_transfer_retries_total",
    "tplr_dataset_disk_free_bytes",
    "tplr_upload_seconds_bucket",
    "tplr_gather_seconds_bucket",
    "tplr_peers_gathered",
    "tplr_peers_rejected_total",
}
VALIDATOR_DASHBOARD_METRICS = {
    "tplr_peer_score",
    "tplr_peers_rejected_total",
    "tplr_checkpoint_age_seconds",
    "tplr_validation_loss",
}
NETWORK_DASHBOARD_METRICS = {
    "tplr_peer_score",
    "tplr_peer_on_time",
    "tplr_peer_approved",
    "tplr_peer_gate_passed",
    "tplr_peer_reward",
}
TRAIN_WORKER_GAUGES = {"tplr_train_loss", "tplr_train_eval_loss", "tplr_train_mfu_ratio"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed; run scripts/setup_env.sh as root "
            "(apt-get install prometheus docker-compose)"
        )
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def registered_series_names() -> set[str]:
    """Series names of every metric class in the code, on one fresh registry."""
    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=0, registry=registry, clock=FakeClock())
    TransferMetrics(registry)
    DatasetMetrics(registry)
    TrainMetrics(registry)
    return mq.series_names((family.name, family.type) for family in registry.collect())


# --- Prometheus ------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config_and_rules():
    promtool = tool("promtool")
    result = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_fail_when_a_rule_is_broken(tmp_path: Path):
    """The unit tests can fail: with the NaN check removed, the NaN case must not pass."""
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    broken = rules.replace("(tplr_loss != tplr_loss) or ", "")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS_DIR / "alerts_test.yml", tmp_path)
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "TplrLossNotFinite" in result.stdout + result.stderr


def test_the_required_alerts_exist_with_severity_and_summary():
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert set(rules) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name


def test_alerts_and_dashboards_use_only_metrics_the_code_registers():
    known = registered_series_names()
    unknown = list(mq.unknown_metrics(mq.alert_queries() + mq.dashboard_queries(), known))
    assert not unknown, unknown


def test_metric_name_extraction_maps_suffixes_and_ignores_label_values():
    expr = 'rate(tplr_upload_seconds_bucket{role="tplr_fake"}[5m]) / tplr_peers_rejected_total'
    assert mq.metric_names_in(expr) == {"tplr_upload_seconds_bucket", "tplr_peers_rejected_total"}
    names = mq.series_names([("tplr_upload_seconds", "histogram"), ("tplr_x", "counter")])
    assert {"tplr_upload_seconds_count", "tplr_x_total"} <= names
    assert list(mq.unknown_metrics([mq.Query("q", "tplr_nope + tplr_x_total")], names)) == [
        "q: tplr_nope"
    ]


# --- docker compose --------------------------------------------------------------------------


def compose_dir(tmp_path: Path, env_text: str | None, docker_env: dict[str, str] | None) -> Path:
    """A copy of docker/ with ``env_text`` as ../.env and docker/.env from its example."""
    shutil.copytree(DOCKER, tmp_path / "docker", ignore=shutil.ignore_patterns("__pycache__"))
    if env_text is not None:
        (tmp_path / ".env").write_text(env_text)
    if docker_env is not None:
        lines = []
        for line in (DOCKER / ".env.example").read_text().splitlines():
            name = line.split("=", 1)[0]
            lines.append(f"{name}={docker_env[name]}" if name in docker_env else line)
        (tmp_path / "docker" / ".env").write_text("\n".join(lines) + "\n")
    return tmp_path / "docker"


def compose(folder: Path, file: str = "compose.yml") -> subprocess.CompletedProcess:
    return run(tool("docker-compose"), "-f", str(folder / file), "config")


def compose_config(tmp_path: Path, env_text: str, file: str = "compose.yml", **docker_env) -> dict:
    docker_env = {"GRAFANA_ADMIN_PASSWORD": "not-admin", **docker_env}
    result = compose(compose_dir(tmp_path, env_text, docker_env), file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def volume_targets(service: dict) -> dict[str, str]:
    """``{target: source}`` of a service's volumes (short syntax, as compose prints it)."""
    return {entry.split(":")[1]: entry.split(":")[0] for entry in service.get("volumes", [])}


def test_compose_file_is_valid_and_wires_the_stack(tmp_path: Path):
    env_text = (REPO / ".env.example").read_text() + "R2_DATASET_BUCKET_NAME=marker-bucket\n"
    config = compose_config(tmp_path, env_text)
    services = config["services"]
    assert set(services) == {"miner", "validator", "prometheus", "grafana"}
    assert services["miner"]["profiles"] == ["miner"]
    assert services["validator"]["profiles"] == ["validator"]
    for name in ("prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with any node profile"
        assert "R2_DATASET_BUCKET_NAME" not in services[name].get("environment", {})
    for name, service in services.items():
        logging = service["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-file"] == "5", name
    for role in ("miner", "validator"):
        node = services[role]
        assert node["environment"]["NODE_TYPE"] == role
        assert node["environment"]["R2_DATASET_BUCKET_NAME"] == "marker-bucket"  # env_file
        assert node["restart"] == "unless-stopped"
        assert "ports" not in node, "nodes are scraped over the compose network"
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        volumes = volume_targets(node)
        assert volumes["/data/shards"] == "shards"
        assert volumes["/data/checkpoints"] == "checkpoints"
        assert Path(volumes["/config"]) == tmp_path / "config", "the peers file's folder"
    named = {v for s in services.values() for v in volume_targets(s).values() if "/" not in v}
    assert named <= set(config["volumes"])
    prometheus_mounts = volume_targets(services["prometheus"])
    assert Path(prometheus_mounts["/etc/prometheus"]) == tmp_path / "docker" / "prometheus"
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "not-admin"
    assert Path(volume_targets(grafana)["/etc/grafana/provisioning"]).is_dir()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).is_file()


def test_compose_refuses_to_start_without_the_env_file(tmp_path: Path):
    result = compose(compose_dir(tmp_path, None, {"GRAFANA_ADMIN_PASSWORD": "x"}))
    assert result.returncode != 0
    assert ".env" in result.stderr


def test_compose_refuses_a_default_grafana_password(tmp_path: Path):
    result = compose(compose_dir(tmp_path, "TPLR_UID=1\n", {}))
    assert result.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD in docker/.env" in result.stderr


SELFHOST_ENV = {
    "MINIO_ROOT_USER": "root-user",
    "MINIO_ROOT_PASSWORD": "root-password",
    "MINIO_READER_ACCESS_KEY": "tplr-reader",
    "MINIO_READER_SECRET_KEY": "reader-secret",
}


def test_selfhost_minio_gets_only_its_own_variables_on_loopback(tmp_path: Path):
    node_env = (REPO / ".env.example").read_text() + "R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY=s3kr1t\n"
    config = compose_config(tmp_path, node_env, "selfhost.yml", **SELFHOST_ENV)
    services = config["services"]
    assert set(services) == {"minio", "minio-init"}
    for name, service in services.items():
        assert "env_file" not in service, f"{name} must not see the node secrets"
        assert all(key.startswith("MINIO_") for key in service["environment"]), name
        assert "s3kr1t" not in json.dumps(service), name
    for port in services["minio"]["ports"]:  # short syntax (compose v1) or long (v2)
        host = port.split(":")[0] if isinstance(port, str) else port["host_ip"]
        assert host == "127.0.0.1", port
    script = " ".join(services["minio-init"]["command"])
    assert "mc admin user add" in script and "tplr-dataset-read" in script
    assert '"s3:GetObject"' in script and "s3:PutObject" not in script


def test_selfhost_requires_minio_credentials(tmp_path: Path):
    folder = compose_dir(tmp_path, "", {k: "" for k in SELFHOST_ENV})
    result = compose(folder, "selfhost.yml")
    assert result.returncode != 0
    assert "set MINIO_" in result.stderr and "in docker/.env" in result.stderr


def test_prometheus_scrapes_the_compose_services_on_the_metrics_port():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tplr")
    (discovery,) = job["dns_sd_configs"]
    assert set(discovery["names"]) == {"miner", "validator"}
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    for role in ("miner", "validator"):
        assert compose["services"][role]["environment"]["METRICS_PORT"] == str(discovery["port"])


# --- Grafana ---------------------------------------------------------------------------------


def dashboards() -> dict[str, dict]:
    return {
        path.name: json.loads(path.read_text())
        for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    }


def test_committed_dashboards_match_their_generator():
    result = run(sys.executable, str(GRAFANA_DIR / "gen_dashboards.py"), "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_use_the_provisioned_datasource_and_a_valid_layout():
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioning["datasources"][0]["uid"]
    boards = dashboards()
    assert set(boards) == {"tplr-node.json", "tplr-validator.json", "tplr-network.json"}
    for name, board in boards.items():
        panels = board["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} is too wide"
            area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                    for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
            assert not area & cells, f"{name}: {panel['title']} overlaps another panel"
            cells |= area
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == uid, f"{name}: {panel['title']}"


def test_dashboards_show_what_operators_watch():
    boards = dashboards()

    def used(board: dict) -> set[str]:
        return {
            name
            for panel in board["panels"]
            for target in panel.get("targets", [])
            for name in mq.metric_names_in(target["expr"])
        }

    assert used(boards["tplr-node.json"]) >= NODE_DASHBOARD_METRICS
    assert used(boards["tplr-validator.json"]) >= VALIDATOR_DASHBOARD_METRICS
    assert used(boards["tplr-network.json"]) >= NETWORK_DASHBOARD_METRICS
    for name, board in boards.items():  # per training process; the node's gauges are per node
        assert not used(board) & TRAIN_WORKER_GAUGES, name


def test_node_selection_of_a_role_dashboard_holds_only_that_role():
    """ "All" must not be a regex matching every instance (it pulled the miners in)."""
    for name, board in dashboards().items():
        (variable,) = board["templating"]["list"]
        assert "allValue" not in variable, name
        if name != "tplr-node.json":
            assert 'tplr_node_info{role="validator"}' in variable["definition"], name


def test_prometheus_names_instances_after_the_compose_service():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tplr")
    targets = {rule["target_label"]: rule["source_labels"] for rule in job["relabel_configs"]}
    assert targets["instance"] == ["__meta_dns_name"], "not the container IP, which changes"


def test_dashboard_provider_points_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "tplr.yml").read_text()
    )["providers"][0]
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
