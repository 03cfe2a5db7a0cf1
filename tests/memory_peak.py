"""Measure one training configuration's peak memory on the CPU (run by test_train_memory.py).

Usage: MALLOC_MMAP_THRESHOLD_=65536 python memory_peak.py '<json config>'

Prints JSON: the peak of the process's anonymous resident memory (RssAnon, sampled every
2 ms) while the worker is built and trains two optimizer steps of two micro-steps each,
above the level before it (after a tiny warm-up run has paged in the code paths), and the
estimator's figure. The fixed mmap threshold makes glibc hand freed blocks back at once,
so the resident size follows the live tensors rather than the allocator's retained pool.
"""

from __future__ import annotations

import gc
import itertools
import json
import sys
import threading
import time

import torch

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.model.memory import MemorySetup, estimate
from tplr.train.synthetic import random_batches
from tplr.train.worker import TrainWorker


def anonymous_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    def __init__(self) -> None:
        self.peak = anonymous_resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anonymous_resident_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_resident_bytes())


def build(spec: dict, **shape) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig.preset(
        spec["preset"], vocab_size=spec["vocab"], max_seq_len=spec["seq"], **shape
    )
    config = TrainConfig(
        optimizer=spec["optimizer"],
        micro_batch_size=spec["micro"],
        global_batch_size=2 * spec["micro"],
        seq_len=spec["seq"],
        device="cpu",
        activation_checkpointing=spec["checkpointing"],
        loss_chunk_tokens=spec.get("loss_chunk_tokens"),
        total_steps=100,
    )
    return model, config


def train(model: ModelConfig, config: TrainConfig, vocab: int) -> None:
    batches = itertools.islice(random_batches(vocab, config.micro_batch_size, config.seq_len), 4)
    TrainWorker(model, config).train_steps(iter(list(batches)), 2)


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    tiny = {**spec["shape"], "n_layer": 1, "d_model": 64, "n_head": 2}
    if "n_kv_head" in tiny:
        tiny["n_kv_head"] = 1
    if "ffn_hidden" in tiny:
        tiny["ffn_hidden"] = 64
    small_spec = {**spec, "vocab": 256, "seq": 16, "micro": 1}
    if spec.get("loss_chunk_tokens"):
        small_spec["loss_chunk_tokens"] = 8
    train(*build(small_spec, **tiny), vocab=256)  # page in the code paths
    gc.collect()
    model, config = build(spec, **spec["shape"])
    before = anonymous_resident_bytes()
    sampler = PeakSampler()
    started = time.perf_counter()
    train(model, config, spec["vocab"])
    measured = sampler.stop() - before
    setup = MemorySetup.for_training(model, config, parallel="single", world_size=1, cuda=False)
    print(json.dumps({
        "measured_bytes": measured,
        "estimated_bytes": estimate(setup).total,
        "seconds": time.perf_counter() - started,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
