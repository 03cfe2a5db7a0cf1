"""The latency protocol v2 adds to a window (commit, reveal, approval), on this machine.

    .venv/bin/python scripts/bench_protocol.py            # demo settings and 124M, 8 miners

Against v1 (upload a payload before the deadline, gather every peer's payload at the next
window), v2 adds on each window's critical path:

- commit (miner): SHA-256 of the payload bytes and one small PUT;
- snapshot (validator): one small GET per miner, after the commit deadline;
- reveal check (validator): SHA-256 of each fetched payload against its commitment;
- approval (lead): copying the approved payloads to its bucket, then one small PUT;
- approval read (every node): one small GET (the approved payloads come from the lead's
  copies instead of the miners' buckets: the same bytes as v1's gather).

The payload upload and the gather itself exist in v1 too and are printed for scale. Every
step runs the node's own code against a moto S3 server in its own process (loopback), with
synthetic valid payloads of the tiny model at the demo's compression (chunk 128, top-32)
and of GPT-2 small at the default (chunk 4096, top-32). The phase waits themselves are
fixed fractions of the window (docs/protocol.md, "Timeline").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from bench_scale import Directory, create_bucket, start_moto, synthetic_parts

MINERS = 8


async def measure(endpoint: str, shapes, settings, label: str, rounds: int) -> dict[str, float]:
    from tplr.comms.retry import RetryPolicy
    from tplr.comms.stores.s3 import S3Store
    from tplr.comms.transfer_config import TransferConfig
    from tplr.comms.upload import upload_bytes
    from tplr.node.network.approvals import fetch_approved, publish_approval, read_approval
    from tplr.node.network.gather import PayloadFetcher, check_reveals
    from tplr.node.process.settings import GatherConfig
    from tplr.protocol.approval import Candidate, build_approval
    from tplr.protocol.clock import FakeClock, WindowClock
    from tplr.protocol.commitments import commit_to, commitment_key, payload_sha256
    from tplr.protocol.payload import PayloadMeta, PayloadSchema, encode_payload, payload_key

    config = create_bucket(endpoint, f"protocol-{label}")
    schema = PayloadSchema.for_model(shapes, settings)
    transfer = TransferConfig()
    generator = torch.Generator().manual_seed(0)
    base = "xxh3_128:" + "0" * 32
    timings: dict[str, list[float]] = {}

    def record(step: str, seconds: float) -> None:
        timings.setdefault(step, []).append(seconds)

    async with S3Store(config, transfer, max_connections=32) as store:
        directory = Directory(store, range(MINERS + 1))
        lead = directory.stores[MINERS]
        fetcher = PayloadFetcher(directory, GatherConfig(max_concurrency=16), RetryPolicy())
        for window in range(rounds):
            genesis = 1_800_000_000.0
            windows = WindowClock(genesis_s=genesis, window_seconds=60.0, clock=FakeClock(genesis))
            payloads = {}
            for uid in range(MINERS):
                meta = PayloadMeta("bench", window, uid, base, "blake2b:x", 8)
                payloads[uid] = encode_payload(meta, synthetic_parts(shapes, settings, generator))
            size = len(payloads[0])
            started = time.perf_counter()  # one miner's commit
            commitment = commit_to(payloads[0], run_id="bench", window=window, uid=0)
            await directory.stores[0].put(commitment_key(window, 0), commitment.to_json())
            record("commit (miner)", time.perf_counter() - started)
            for uid in range(1, MINERS):
                commitment = commit_to(payloads[uid], run_id="bench", window=window, uid=uid)
                await directory.stores[uid].put(commitment_key(window, uid), commitment.to_json())
            windows.clock.set(windows.commit_deadline_s(window) + 1)
            started = time.perf_counter()
            snapshot = await fetcher.snapshot_commitments(
                window, range(MINERS), run_id="bench", windows=windows, check_store_clock=False
            )
            record("snapshot (validator)", time.perf_counter() - started)
            started = time.perf_counter()  # one miner's reveal (the v1 upload)
            await upload_bytes(
                directory.stores[0], payloads[0], payload_key(window, 0), config=transfer
            )
            record("reveal upload (as v1's upload)", time.perf_counter() - started)
            for uid in range(1, MINERS):
                await upload_bytes(
                    directory.stores[uid], payloads[uid], payload_key(window, uid), config=transfer
                )
            started = time.perf_counter()
            outcome = await fetcher.fetch(window, range(MINERS), max_bytes=schema.max_bytes)
            record("gather (as v1's gather)", time.perf_counter() - started)
            started = time.perf_counter()
            matched, _ = check_reveals(outcome, snapshot, windows=windows, check_store_clock=False)
            record("reveal check (validator)", time.perf_counter() - started)
            assert len(matched) == MINERS
            approved = {
                uid: Candidate(uid, payload_sha256(payloads[uid]), len(payloads[uid]), 1.0)
                for uid in range(MINERS)
            }
            approval = build_approval(
                run_id="bench",
                window=window,
                base_digest=base,
                result_digest=base,
                reference_norm=1.0,
                bootstrap=False,
                approved=approved,
                weights=dict.fromkeys(approved, 1.0 / MINERS),
                excluded={},
                published_at_s=genesis,
            )
            started = time.perf_counter()
            await publish_approval(lead, approval, payloads, transfer=transfer)
            record("approval: copies + publish (lead)", time.perf_counter() - started)
            started = time.perf_counter()
            await read_approval(lead, run_id="bench", window=window)
            record("approval read (every node)", time.perf_counter() - started)
            started = time.perf_counter()
            await fetch_approved(fetcher, lead, approval, schema, run_id="bench")
            record(
                "approved payloads from the lead (as v1's gather)", time.perf_counter() - started
            )
    medians = {step: statistics.median(values) for step, values in timings.items()}
    medians["payload bytes"] = size
    return medians


ADDED = (
    "commit (miner)",
    "snapshot (validator)",
    "reveal check (validator)",
    "approval: copies + publish (lead)",
    "approval read (every node)",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from tplr.train.compression import CompressionSettings
    from tplr.train.config import ModelConfig
    from tplr.train.model.gpt import GPT

    cases = []
    for label, preset, vocab, chunk in (("demo", "tiny", 257, 128), ("124m", "small", 50257, 4096)):
        with torch.device("meta"):
            model = GPT(ModelConfig.preset(preset, vocab_size=vocab))
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        cases.append((label, shapes, CompressionSettings(chunk_size=chunk, topk=32)))
    process, endpoint = start_moto()
    results = {}
    try:
        for label, shapes, settings in cases:
            results[label] = asyncio.run(measure(endpoint, shapes, settings, label, args.rounds))
    finally:
        process.terminate()
        process.wait(timeout=10)
    print(f"\nmedian of {args.rounds} windows, {MINERS} miners, all approved (ms):")
    labels = list(results)
    print(f"{'step':<50} " + " ".join(f"{label:>10}" for label in labels))
    print(
        f"{'payload size (bytes)':<50} "
        + " ".join(f"{results[label]['payload bytes']:>10.0f}" for label in labels)
    )
    for step in results[labels[0]]:
        if step == "payload bytes":
            continue
        marker = "+" if step in ADDED else " "
        values = " ".join(f"{results[label][step] * 1000:>10.1f}" for label in labels)
        print(f"{marker} {step:<48} {values}")
    added = {label: sum(results[label][step] for step in ADDED) for label in labels}
    print(
        f"{'= added by v2 (the + rows)':<50} "
        + " ".join(f"{added[label] * 1000:>10.1f}" for label in labels)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
