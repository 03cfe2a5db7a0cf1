"""A miner process in miniature, for the restart test (test_node_miner_state.py): the node's
own worker, assignment, window training, compression, miner state and payload encoding, on
a one-miner network whose aggregate is that miner's payload.

Usage: python miner_restart.py HOME SHARDS OUT START_WINDOW END_WINDOW [--pause-after W]

Per window: train on the assignment, compress with error feedback (saving the miner state),
"upload" ``OUT/w<window>.safetensors``, apply the outer step, and publish the global model
``OUT/global-w<window>.safetensors`` every other window, as a lead would. A process that
starts at a later window joins as a node does: the newest global model at or before it,
then a replay of the payloads since, then the saved miner state if it matches.
``--pause-after W``: after window W's upload, train a little of the next window (state in
memory only), print ``paused`` and sleep until killed.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from tplr.comms.manifest import read_manifest
from tplr.data.dataset import SharedShardedDataset
from tplr.data.dataset_manifest import dataset_info
from tplr.node.miner import train_window
from tplr.node.miner_state import MinerState, compress_and_save, miner_compressor, resume
from tplr.node.network.checkpoints import model_digest
from tplr.node.network.stores import cache_dir_for
from tplr.node.process.settings import NodeConfig
from tplr.node.ranks import SingleProcess
from tplr.node.worker_setup import build_worker
from tplr.protocol.aggregation import (
    normalisation_weights,
    reference_norm,
    total_norm,
    weighted_sum,
)
from tplr.protocol.assignment import assignment_for
from tplr.protocol.payload import (
    PayloadExpectation,
    PayloadMeta,
    PayloadSchema,
    decode_payload,
    encode_payload,
)
from tplr.protocol.run_spec import RunSpec
from tplr.train.compression import decompress_all
from tplr.train.worker import TrainWorker

UID = 3
CHECKPOINT_EVERY = 2


def run_spec(vocab_size: int, seq_len: int) -> RunSpec:
    return RunSpec(
        run_id="restart-run",
        genesis_s=0.0,
        window_seconds=60.0,
        inner_steps=3,
        inner_lr=3e-3,
        outer_lr=0.7,
        micro_batch_size=4,
        batch_size=8,
        sequence_length=seq_len,
        model="tiny",
        vocab_size=vocab_size,
        compression_chunk_size=64,
        compression_topk=8,
        windows_per_shard=1000,
        seed=11,
    )


def outer_step(worker: TrainWorker, spec: RunSpec, out: Path, window: int) -> None:
    """The network's aggregate of ``window`` (this miner's payload) applied to the model."""
    schema = PayloadSchema.for_model(
        {n: p.shape for n, p in worker.model.named_parameters()}, spec.compression_settings()
    )
    data = (out / f"w{window}.safetensors").read_bytes()
    payload = decode_payload(data, schema, PayloadExpectation(spec.run_id, window, UID))
    deltas = {UID: decompress_all(payload.tensors, spec.compression_chunk_size)}
    norms = {UID: total_norm(deltas[UID])}
    aggregate, _ = weighted_sum(deltas, normalisation_weights(norms, reference_norm(norms)))
    worker.apply_update(aggregate, spec.outer_lr)


def join(worker: TrainWorker, spec: RunSpec, out: Path, start: int) -> dict[int, str]:
    """The newest global model at or before ``start``, then replay; digests per window."""
    published = [w for w in range(start + 1) if (out / f"global-w{w}.safetensors").is_file()]
    first = max(published, default=0)
    if published:
        worker.restore(load_file(out / f"global-w{first}.safetensors"))
    digests = {first: model_digest(worker.full_parameters())}
    for window in range(first, start):
        outer_step(worker, spec, out, window)
        digests[window + 1] = model_digest(worker.full_parameters())
    return digests


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    home, shards, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    start, end = int(sys.argv[4]), int(sys.argv[5])
    pause_after = (
        int(sys.argv[sys.argv.index("--pause-after") + 1]) if "--pause-after" in sys.argv else None
    )
    info = dataset_info(read_manifest(shards / "manifest.json"))
    assert info is not None
    spec = run_spec(info.vocab_size, info.seq_len)
    dataset = SharedShardedDataset.open(
        shards / "train_000000.npy",
        ids_path=shards / "sample_ids_000000.bin",
        seq_len=spec.sequence_length,
        shard_index=0,
    )
    node = NodeConfig(uid=UID, home=home, device="cpu")
    worker = build_worker(spec, node, dataset.context_len, CollectorRegistry())
    compressor = miner_compressor(spec, worker.context)
    every = 0 if "--no-state" in sys.argv else 1
    state = MinerState(cache_dir_for(node), spec, every_windows=every)
    digests = join(worker, spec, out, start)
    resume(state, worker, compressor, SingleProcess(worker.context), digests, start)
    for window in range(start, end):
        if window % CHECKPOINT_EVERY == 0:
            save_file(worker.full_parameters(), out / f"global-w{window}.safetensors")
        if not state.already_done(window):
            assignment = assignment_for(spec, dataset, UID, window)
            _, delta = train_window(worker, spec, dataset, assignment.indices)
            compressed = compress_and_save(
                worker, compressor, state, window, delta, base_digest=digests[window]
            )
            meta = PayloadMeta(
                spec.run_id, window, UID, digests[window], assignment.digest, assignment.count
            )
            (out / f"w{window}.safetensors").write_bytes(encode_payload(meta, compressed))
        if window == pause_after:
            pause(worker, spec, dataset, window + 1)
        outer_step(worker, spec, out, window)
        digests[window + 1] = model_digest(worker.full_parameters())
    save_file(worker.full_parameters(), out / "final.safetensors")


def pause(worker: TrainWorker, spec: RunSpec, dataset: SharedShardedDataset, window: int) -> None:
    """Half a window of training that only memory sees, then wait to be killed (-9)."""
    indices = assignment_for(spec, dataset, UID, window).indices
    worker.train_steps(
        ((torch.from_numpy(dataset[i][:-1]).long()[None].repeat(4, 1),) * 2 for i in indices), 1
    )
    print("paused", flush=True)
    time.sleep(120)
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
