"""One rank of the two-process shard-manager test (run by test_shard_manager_dist.py).

Usage: python dist_manager_worker.py RANK WORLD PORT BUCKET_DIR LOCAL_DIR OUT_JSON
Rank 0 gets a LocalStore; every other rank gets no store at all, so it cannot download.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.manager import ShardUnavailable, SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_catalog import TorchDistChannel
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.sampler import WindowSampler, sample_ids_digest
from tplr.data.shard_state import ShardState


async def run(rank: int, bucket_dir: Path, local_dir: Path) -> dict:
    store = LocalStore(bucket_dir) if rank == 0 else None
    config = DatasetConfig(bins_path="remote/tokenized/", local_dir=local_dir, rank_poll_s=0.05)
    transfer = TransferConfig(transfer_max_attempts=2)
    sampler = WindowSampler(run_seed=1234, samples_per_window=16)
    seen: dict[str, object] = {"rank": rank, "windows": {}}
    async with SharedShardedDatasetManager(
        store,
        config,
        windows_per_shard=2,
        open_shard=dataset_opener(64),
        transfer=transfer,
        channel=TorchDistChannel(),
        metrics=DatasetMetrics(CollectorRegistry()),
    ) as manager:
        for window in (0, 1, 2, 3, 4):
            dataset = await manager.dataset_for(window)
            indices = sampler.indices(
                uid=7, window=window, shard_index=manager.active_index, num_samples=len(dataset)
            )
            rows = np.stack([dataset[int(i)] for i in indices])
            mine = {
                "shard": manager.active_index,
                "ids_digest": sample_ids_digest(dataset.sample_ids(indices)),
                "rows_sum": int(rows.astype(np.int64).sum()),
            }
            # Ranks step windows together, as DDP training keeps them; compare as we go.
            everyone: list[object] = [None, None]
            await asyncio.to_thread(dist.all_gather_object, everyone, mine)
            seen["windows"][str(window)] = mine
            seen.setdefault("peers_agree", []).append(everyone[0] == everyone[1])
        while manager.slots[1].state is not ShardState.REMOTE:  # let the retirement finish
            await asyncio.sleep(0.01)
    return seen


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    bucket_dir, local_dir, out = Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        try:
            result = asyncio.run(run(rank, bucket_dir, local_dir))
        except ShardUnavailable as exc:  # reported, as the node would, instead of hanging
            result = {"rank": rank, "error": str(exc)}
        out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
