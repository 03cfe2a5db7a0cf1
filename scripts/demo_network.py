"""A whole tplr network on this machine: a lead validator and two miners, CPU, tiny model.

    python scripts/demo_network.py            # what `make demo` runs

1. Builds a small dataset offline (once): the Python standard library's sources as text,
   tokenized with the ``bytes`` tokenizer by ``tplr shards prepare``, into the embedded
   dataset store ``.tplr/demo/dataset/``.
2. Starts ``neurons/validator.py --lead`` and two ``neurons/miner.py`` as separate
   processes on the embedded store (no keys, no network), for a few short windows.
   Protocol v2: every window the miners commit, then reveal; the lead checks, evaluates
   (the gate and the held-out reward) and approves. Per window it prints the approved
   miners and each miner's verdict, gate statistic and reward. The run starts from a
   random model, so its first ``bootstrap_windows`` approve on held-out improvement alone
   (the gate is still measured and gates the rewards).
3. Stops them with SIGTERM (they exit 0), then prints the validation loss per window,
   the miners' scores, the bytes moved, and where the metrics and logs are.

Each run starts a fresh run (the shared store is cleared; the dataset is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tplr.comms.errors import NotFound
from tplr.comms.stores.local import LocalStore
from tplr.node.network.directory import embedded_prefix
from tplr.node.network.prefixed_store import PrefixedStore
from tplr.node.network.reports import WindowReport, read_report, report_windows
from tplr.node.scoring import ScoreBoard, read_scores, scores_key
from tplr.protocol.approval import approval_key
from tplr.untrusted import load_json

ROOT = Path(__file__).resolve().parents[1]
BINS_PATH = "remote/tokenized/"
LEAD_UID = 0
MINER_UIDS = (1, 2)
SEQ_LEN = 128
WARMUP_STEPS = 800
RUN_FLAGS = {
    "--run-model": "tiny",
    "--run-inner-steps": "16",
    "--run-inner-lr": "0.01",
    "--run-outer-lr": "1.0",
    "--run-micro-batch-size": "8",
    "--run-batch-size": "8",
    "--run-compression-chunk-size": "128",
    "--run-compression-topk": "32",
    "--run-windows-per-shard": "1",
    "--run-checkpoint-every-windows": "4",
    "--run-bootstrap-windows": "2",
    "--run-heldout-samples": "256",
    "--run-seed": "1234",
}


@dataclass
class Node:
    name: str
    args: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_text_corpus(folder: Path, max_bytes: int, *, doc_bytes: int = 1500) -> int:
    """Text that ships with Python: the standard library's sources (tests excluded) cut at
    blank lines into documents of about ``doc_bytes`` and shuffled with a fixed seed, as a
    pretraining corpus is (no shard holds another distribution than the next)."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(
        path
        for path in stdlib.rglob("*.py")
        if not {"test", "tests", "site-packages", "idle_test"} & set(path.parts)
    )
    documents: list[str] = []
    for source in sources:
        lines, size = [], 0
        for line in source.read_text(encoding="utf-8", errors="replace").splitlines(True):
            lines.append(line)
            size += len(line)
            if size >= doc_bytes and not line.strip():
                documents.append("".join(lines))
                lines, size = [], 0
        if lines:
            documents.append("".join(lines))
    random.Random(0).shuffle(documents)
    total, batch = 0, []
    for document in documents:
        if total >= max_bytes:
            break
        batch.append(document)
        total += len(document)
    for start in range(0, len(batch), 500):
        text = "".join(batch[start : start + 500])
        (folder / f"{start // 500:04d}.txt").write_text(text, encoding="utf-8")
    return total


def build_dataset(home: Path) -> Path:
    out = home / "dataset" / BINS_PATH
    if (out / "manifest.json").is_file():
        print(f"dataset: reusing {out}")
        return out
    text_dir = home / "text"
    size = write_text_corpus(text_dir, max_bytes=4_000_000)
    print(f"dataset: tokenizing {size / 1e6:.1f} MB of the standard library's sources -> {out}")
    if out.exists():
        shutil.rmtree(out)
    command = [
        sys.executable,
        "-m",
        "tplr",
        "shards",
        "prepare",
        "--input",
        str(text_dir),
        "--out",
        str(out),
        "--tokenizer",
        "bytes",
        "--seq-len",
        str(SEQ_LEN),
        "--shard-tokens",
        str(SEQ_LEN * 2048),
        "--val-shards",
        "1",
        "--no-progress",
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def warm_model(shard: Path, out: Path, *, steps: int = WARMUP_STEPS, seed: int = 0) -> Path:
    """A checkpoint file of the tiny model after ``steps`` steps on ``shard`` (a shard the run
    does not train on), to start the run from: the gate needs a model past its first steps.
    Built once; later calls reuse it."""
    import numpy as np
    import torch

    from tplr.data.dataset import SharedShardedDataset
    from tplr.data.loader import BatchLoader, LoaderConfig
    from tplr.node.network.checkpoints import model_digest, write_checkpoint_file
    from tplr.train.config import ModelConfig, TrainConfig
    from tplr.train.worker import TrainWorker

    if out.is_file():
        return out
    ids = shard.with_name(shard.name.replace("train_", "sample_ids_").replace(".npy", ".bin"))
    dataset = SharedShardedDataset.open(shard, ids_path=ids, seq_len=SEQ_LEN, shard_index=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ModelConfig.preset("tiny", vocab_size=257)
        config = TrainConfig(
            lr=float(RUN_FLAGS["--run-inner-lr"]),
            micro_batch_size=8,
            global_batch_size=8,
            seq_len=dataset.context_len,
            device="cpu",
            warmup_steps=0,
            total_steps=1 << 40,
            min_lr_ratio=1.0,
            prefetch_batches=0,
            seed=int(RUN_FLAGS["--run-seed"]),
        )
        worker = TrainWorker(model, config)
        rows = np.random.default_rng(seed).choice(len(dataset), steps * 8)
        with BatchLoader(dataset, rows, config=LoaderConfig(batch_size=8)) as batches:
            worker.train_steps(batches, steps)
        params = {name: p.detach().clone() for name, p in worker.model.named_parameters()}
    finally:
        torch.set_num_threads(threads)
    write_checkpoint_file(params, out, run_id="warm-up", window=0, digest=model_digest(params))
    return out


def prepare_home(home: Path) -> Path:
    """The demo's dataset and warmed-up initial model (both built once); returns the model."""
    shards = build_dataset(home)
    warm_shard = sorted(shards.glob("train_*.npy"))[-2]  # the last one is held out
    print(f"model: the tiny model warmed up on {warm_shard.name} (built once)")
    return warm_model(warm_shard, home / "init.safetensors")


def node_env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("R2_", "TPLR_"))}
    env.update(
        TPLR_HOME=str(home),
        METRICS_PORT=str(port),
        METRICS_HOST="127.0.0.1",
        TPLR_TORCH_THREADS="1",
        TPLR_POLL_INTERVAL_S="0.5",
        TPLR_STOP_GRACE_S="10",
        DATASET_BINS_PATH=BINS_PATH,
        PYTHONUNBUFFERED="1",
    )
    return env


def start(node: Node, home: Path) -> None:
    node.log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(node.log_path, "w")  # noqa: SIM115 - closed when the process ends
    node.process = subprocess.Popen(
        [sys.executable, *node.args],
        cwd=ROOT,
        env=node_env(home, node.port),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def plan_nodes(home: Path, window_seconds: float, init_model: Path | None = None) -> list[Node]:
    logs = home / "logs"
    lead_args = ["neurons/validator.py", "--lead", "--uid", str(LEAD_UID)]
    lead_args += ["--run-window-seconds", str(window_seconds)]
    if init_model is not None:
        lead_args += ["--validator-init-model", str(init_model)]
    for flag, value in RUN_FLAGS.items():
        lead_args += [flag, value]
    nodes = [Node("validator-0", lead_args, free_port(), logs / "validator-0.log")]
    for uid in MINER_UIDS:
        args = ["neurons/miner.py", "--uid", str(uid), "--lead-uid", str(LEAD_UID)]
        nodes.append(Node(f"miner-{uid}", args, free_port(), logs / f"miner-{uid}.log"))
    return nodes


async def lead_reports(shared: LocalStore) -> list[WindowReport]:
    store = PrefixedStore(shared, embedded_prefix(LEAD_UID))
    reports = []
    for window in await report_windows(store):
        try:
            reports.append(await read_report(store, window))
        except NotFound:
            continue
    return reports


def check_alive(nodes: list[Node]) -> None:
    for node in nodes:
        assert node.process is not None
        if node.process.poll() is not None:
            tail = node.log_path.read_text()[-3000:]
            raise SystemExit(f"{node.name} exited with {node.process.returncode}:\n{tail}")


async def window_lines(shared: LocalStore, report: WindowReport) -> list[str]:
    """The lead's approval and every miner's verdict for one window, as printed lines."""
    lead = PrefixedStore(shared, embedded_prefix(LEAD_UID))
    what = f"window {report.window}"
    approval = load_json(await lead.get(approval_key(report.window)), what=what, max_bytes=1 << 24)
    scores = load_json(await lead.get(scores_key(report.window)), what=what, max_bytes=1 << 24)
    loss = "n/a" if report.val_loss is None else f"{report.val_loss:.4f}"
    phase = " (bootstrap: approved on held-out improvement)" if approval["bootstrap"] else ""
    approved = sorted(int(uid) for uid in approval["approved"])
    lines = [f"  window {report.window}: approved {approved}{phase}; validation loss {loss}"]
    for uid, verdict in sorted(scores["verdicts"].items(), key=lambda item: int(item[0])):
        gate = "not measured"
        if verdict["gate_z"] is not None:
            outcome = "passed" if verdict["gate_passed"] else "failed"
            gate = f"{outcome} (z {verdict['gate_z']:.2f})"
        reason = verdict["reason"] or "approved"
        reward = verdict["window_score"]
        lines.append(f"    miner {uid}: {reason:<14} gate {gate:<22} reward {reward:.3f}")
    return lines


def wait_for_windows(shared: LocalStore, nodes: list[Node], count: int, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        check_alive(nodes)
        reports = asyncio.run(lead_reports(shared))
        for report in reports[seen:]:
            for line in asyncio.run(window_lines(shared, report)):
                print(line)
        seen = len(reports)
        if seen >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"the network did not complete {count} windows in {timeout_s:.0f}s")


def scrape_metrics(nodes: list[Node], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for node in nodes:
        url = f"http://127.0.0.1:{node.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read()
        except OSError as exc:
            print(f"  could not scrape {url}: {exc}")
            continue
        path = folder / f"{node.name}.prom"
        path.write_bytes(body)
        saved[node.name] = path
    return saved


def stop_all(nodes: list[Node]) -> dict[str, int]:
    for node in nodes:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    codes = {}
    for node in nodes:
        assert node.process is not None
        try:
            codes[node.name] = node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.process.kill()
            codes[node.name] = node.process.wait()
    return codes


async def gather_summary(shared: LocalStore) -> tuple[list[WindowReport], ScoreBoard | None, int]:
    reports = await lead_reports(shared)
    lead = PrefixedStore(shared, embedded_prefix(LEAD_UID))
    board = await read_scores(lead, reports[-1].window) if reports else None
    moved = 0
    for uid in (LEAD_UID, *MINER_UIDS):
        store = PrefixedStore(shared, embedded_prefix(uid))
        for window in await report_windows(store):
            report = await read_report(store, window)
            moved += report.uploaded_bytes + report.downloaded_bytes
    return reports, board, moved


def print_summary(home: Path, nodes, codes, metrics_files, summary, started: float) -> None:
    reports, board, moved = summary
    print("\n=== summary ===")
    print("validation loss per window (lead validator, held-out shard):")
    for report in reports:
        loss = "n/a" if report.val_loss is None else f"{report.val_loss:.4f}"
        print(f"  window {report.window:>3}: {loss}")
    losses = [r.val_loss for r in reports if r.val_loss is not None]
    if len(losses) >= 2:
        trend = "falling" if losses[-1] < losses[0] else "NOT falling"
        print(f"  {losses[0]:.4f} -> {losses[-1]:.4f} ({trend})")
    if board is not None:
        print(f"miner scores (moving average, after window {board.window}):")
        for uid, score in board.scores().items():
            print(f"  uid {uid}: {score:.5f}")
    print(f"payload bytes moved (uploads + gathers, all nodes): {moved / 1e6:.2f} MB")
    print(f"exit codes after SIGTERM: {codes}")
    print("metrics (Prometheus text, scraped before stopping):")
    for node in nodes:
        where = metrics_files.get(node.name, "not scraped")
        print(f"  {node.name}: http://127.0.0.1:{node.port}/metrics -> {where}")
    print(f"logs: {home / 'logs'}; store: {home / 'shared'}")
    print(f"demo took {time.monotonic() - started:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=ROOT / ".tplr" / "demo")
    parser.add_argument("--windows", type=int, default=10, help="windows to run")
    parser.add_argument("--window-seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    home = args.home.absolute()
    init_model = prepare_home(home)
    for stale in ("shared", "cache", "metrics"):
        shutil.rmtree(home / stale, ignore_errors=True)
    nodes = plan_nodes(home, args.window_seconds, init_model)
    print(
        f"starting a lead validator and {len(MINER_UIDS)} miners ({args.windows} windows of "
        f"{args.window_seconds:g}s, tiny model, CPU); logs in {home / 'logs'}"
    )
    shared = LocalStore(home / "shared")
    try:
        for node in nodes:
            start(node, home)
        timeout_s = 60 + 3 * args.windows * args.window_seconds
        wait_for_windows(shared, nodes, args.windows, timeout_s=timeout_s)
        metrics_files = scrape_metrics(nodes, home / "metrics")
    finally:
        codes = stop_all(nodes)
    summary = asyncio.run(gather_summary(shared))
    print_summary(home, nodes, codes, metrics_files, summary, started)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
