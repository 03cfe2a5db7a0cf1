"""``python -m tplr.train --estimate-memory``: the peak memory per device, by arithmetic.

    python -m tplr.train --estimate-memory --model llama-8b --micro-batch-size 1 \\
        --seq-len 8192 --parallel fsdp --world-size 8 --activation-checkpointing full

Prints each component of the estimate (:mod:`tplr.train.model.memory`), whether it fits
``--device-memory-gib`` (default 80, an H100), and, when it does not, settings that do.
No data and no GPU are needed; nothing is allocated.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from tplr.train.config import TrainConfig, build_config
from tplr.train.model.memory import (
    GIB,
    MemorySetup,
    estimate,
    fitting_alternatives,
    parameter_counts,
)

H100_GIB = 80.0


def add_estimate_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory estimate (--estimate-memory)")
    group.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the expected peak memory per device for these settings and exit "
        "(no --data needed); exit 1 when it does not fit --device-memory-gib",
    )
    group.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="devices to estimate for (default: $WORLD_SIZE, else 1)",
    )
    group.add_argument(
        "--device-memory-gib",
        type=float,
        default=H100_GIB,
        help=f"memory of one device to check against (default {H100_GIB:g}, an H100)",
    )
    group.add_argument(
        "--error-feedback",
        action="store_true",
        help="include a miner's error-feedback buffers (4 bytes per parameter, split across "
        "the devices)",
    )


def estimate_setup(args: argparse.Namespace, model_and_values: Callable[..., tuple]) -> MemorySetup:
    vocab = args.vocab_size
    if vocab is None:
        from tplr.train.config import ModelConfig

        vocab = ModelConfig.default_vocab_size(args.model)
    model, values = model_and_values(args, vocab, args.seq_len)
    values.setdefault("seq_len", args.seq_len or model.max_seq_len)
    config = build_config(TrainConfig, values)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cuda = config.device != "cpu"
    parallel = "single" if world == 1 else ("ddp" if config.parallel == "auto" else config.parallel)
    setup = MemorySetup.for_training(
        model, config, parallel=parallel, world_size=world, cuda=cuda,
        error_feedback=args.error_feedback,
    )  # fmt: skip
    if world > 1 and config.parallel == "auto" and estimate(setup).total > capacity(args):
        setup = MemorySetup.for_training(
            model, config, parallel="fsdp", world_size=world, cuda=cuda,
            error_feedback=args.error_feedback,
        )  # fmt: skip
    return setup


def capacity(args: argparse.Namespace) -> int:
    return int(args.device_memory_gib * GIB)


def print_estimate(args: argparse.Namespace, model_and_values: Callable[..., tuple]) -> bool:
    """Print the estimate; True when it fits the device."""
    setup = estimate_setup(args, model_and_values)
    result = estimate(setup)
    params = parameter_counts(setup.model)["total"]
    print(f"model {args.model}: {params / 1e9:.2f}B parameters | {setup.describe()}")
    for name, value in result.table():
        print(f"  {name:<18} {value / GIB:8.2f} GiB")
    limit = capacity(args)
    fits = result.total <= limit
    verdict = "fits" if fits else "does NOT fit"
    print(f"{verdict} in {args.device_memory_gib:g} GiB per device")
    if not fits:
        alternatives = fitting_alternatives(setup, limit)
        if not alternatives:
            print("no setting tried fits: more devices (--world-size, FSDP2), or a smaller model")
        for alt in alternatives:
            print(f"  fits: {alt.describe()} -> {estimate(alt).total / GIB:.1f} GiB")
    return fits
