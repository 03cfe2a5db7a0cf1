"""``python -m tplr.train --data DIR``: train on local shards, with or without torchrun.

    torchrun --standalone --nproc_per_node=8 -m tplr.train --data /data/fineweb10B
    python -m tplr.train --data /data/fineweb10B --model small --steps 5000

Logs loss, tokens/s and MFU, evaluates on the validation shard every ``--eval-every-steps``
and writes checkpoints with ``--save`` (resume with ``--resume``). The global batch is the
same for any number of GPUs: fewer GPUs accumulate more micro-steps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tplr.errors import TplrError
from tplr.train.config import ModelConfig, TrainConfig, build_config, flag_for
from tplr.train.entry_memory import add_estimate_flags, print_estimate
from tplr.train.errors import TrainConfigError
from tplr.train.local_data import (
    BatchPlan,
    LocalDataset,
    RecordedLength,
    data_vocab,
    open_local_dataset,
    read_local_manifest,
    recorded_seq_len,
    train_batches,
    validation_batches,
)
from tplr.train.model.vocab import check_vocab
from tplr.train.parallel.distributed import LaunchEnv, distributed_context
from tplr.train.worker import TrainStats, TrainWorker

log = logging.getLogger("tplr.train")
ENTRY_LOG_EVERY_STEPS = 10
# TrainConfig fields settable by a flag of the same name (``--micro-batch-size``):
# field -> (type, help, choices)
_TRAIN_FLAGS: dict[str, tuple[type, str, tuple[str, ...] | None]] = {
    "optimizer": (str, "adamw, or muon (Muon for hidden matrices, AdamW for the rest)",
                  ("adamw", "muon")),
    "lr": (float, "peak AdamW learning rate (default 6e-4)", None),
    "muon_lr": (float, "peak Muon learning rate (default 0.02)", None),
    "weight_decay": (float, "decoupled weight decay of matrices (default 0.1)", None),
    "grad_clip_norm": (float, "clip the global gradient norm to this (default 1.0)", None),
    "warmup_steps": (int, "linear warmup steps (default 0)", None),
    "min_lr_ratio": (float, "cosine decay ends at this x lr (default 0.1)", None),
    "micro_batch_size": (int, "sequences per forward/backward on one device (default 16)", None),
    "global_batch_size": (int, "sequences per optimizer step, all devices (default 512)", None),
    "device": (str, "auto (cuda when present), cuda or cpu", ("auto", "cuda", "cpu")),
    "dtype": (str, "auto (bf16 autocast on CUDA, fp32 on CPU), bfloat16 or float32",
              ("auto", "bfloat16", "float32")),
    "parallel": (str, "under torchrun: ddp (replicas) or fsdp (FSDP2 sharding); auto: fsdp "
                 "when a replica does not fit the GPU", ("auto", "ddp", "fsdp")),
    "activation_checkpointing": (str, "recompute activations in the backward pass: full, "
                                 "selective (keeps matmul/attention outputs) or none",
                                 ("none", "full", "selective")),
    "loss_chunk_tokens": (int, "tokens per chunk of the head loss (default: chunk when the "
                          "logits are large; 0 = never)", None),
    "log_every_steps": (int, "log loss, tokens/s and MFU every N steps (default 10; 0 = off)",
                        None),
    "peak_tflops": (float, "the device's peak bf16 TFLOP/s for MFU (default: from the GPU "
                    "table)", None),
    "seed": (int, "model init and data order (default 1337)", None),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tplr.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="folder of token shards (required to train)")
    parser.add_argument(
        "--model", default="small", help="preset: " + ", ".join(ModelConfig.preset_names())
    )
    parser.add_argument(
        "--vocab-size", type=int, help="default: the manifest's, else the preset's usual one"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sample; default: the dataset's recorded length (rows of stored "
        "shards, or the manifest's seq_len), else the model's max_seq_len",
    )
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    parser.add_argument(
        "--eval-every-steps", type=int, default=250, help="validation loss every N steps; 0 = never"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=20, help="validation micro-batches per rank"
    )
    parser.add_argument("--val-shards", type=int, help="shards held out for validation (default 1)")
    parser.add_argument("--save", type=Path, help="checkpoint file, rewritten atomically")
    parser.add_argument(
        "--save-every-steps", type=int, default=0, help="checkpoint every N steps; 0 = at the end"
    )
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from (any world size)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level",
    )
    for field, (kind, text, choices) in _TRAIN_FLAGS.items():
        parser.add_argument(flag_for(field), dest=field, type=kind, help=text, choices=choices)
    add_estimate_flags(parser)
    return parser


def _check_counts(args: argparse.Namespace) -> None:
    for name, minimum in (
        ("steps", 1),
        ("eval_batches", 1),
        ("eval_every_steps", 0),
        ("save_every_steps", 0),
    ):
        value = getattr(args, name)
        if value < minimum:
            raise TrainConfigError(f"{flag_for(name)} is {value}; it must be >= {minimum}")


def model_and_values(
    args: argparse.Namespace, vocab_size: int, seq_len: int | None
) -> tuple[ModelConfig, dict]:
    """The model preset (its max_seq_len raised to ``seq_len`` if needed) and the
    TrainConfig values the flags set."""
    _check_counts(args)
    model_config = ModelConfig.preset(args.model, vocab_size=vocab_size)
    if seq_len and seq_len > model_config.max_seq_len:
        model_config = ModelConfig.preset(args.model, vocab_size=vocab_size, max_seq_len=seq_len)
    values = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    values.update(compile=args.compile, total_steps=args.steps)
    values.setdefault("log_every_steps", ENTRY_LOG_EVERY_STEPS)
    return model_config, values


def _load_data(args: argparse.Namespace) -> tuple[LocalDataset, ModelConfig, dict]:
    if args.data is None or not args.data.is_dir():
        raise TrainConfigError(
            f"--data {args.data} is not a folder",
            hint="pass the shard folder (or --estimate-memory to only print the estimate)",
        )
    manifest = read_local_manifest(args.data)
    vocab = data_vocab(manifest)
    vocab_size = args.vocab_size or vocab.vocab_size or ModelConfig.default_vocab_size(args.model)
    source = f"the manifest in {args.data}"
    check_vocab(ModelConfig.preset(args.model, vocab_size=vocab_size), vocab, source=source)
    seq_len = resolve_seq_len(args.seq_len, recorded_seq_len(args.data, manifest))
    model_config, values = model_and_values(args, vocab_size, seq_len)
    seq_len = seq_len or model_config.max_seq_len
    data = open_local_dataset(
        args.data,
        seq_len=seq_len,
        vocab_size=model_config.vocab_size,
        manifest=manifest,
        val_shards=args.val_shards,
    )
    values["seq_len"] = data.context_len
    return data, model_config, values


def _next_stop(step: int, args: argparse.Namespace) -> int:
    stops = [args.steps]
    for every in (args.eval_every_steps, args.save_every_steps):
        if every:
            stops.append((step // every + 1) * every)
    return min(stops)


def _log_chunk(stats: TrainStats, worker: TrainWorker) -> None:
    util = "n/a" if stats.mfu is None else f"{stats.mfu:.1%}"
    log.info(
        "step %d/%d | loss %.4f | %s tok/s (%s per device) | MFU %s",
        stats.step,
        worker.config.total_steps,
        stats.loss,
        f"{stats.global_tokens_per_s:,.0f}",
        f"{stats.tokens_per_s:,.0f}",
        util,
    )


def train(args: argparse.Namespace, env: LaunchEnv) -> None:
    data, model_config, values = _load_data(args)
    config = build_config(TrainConfig, values)
    with distributed_context(env, device=config.device, timeout_s=config.dist_timeout_s) as ctx:
        worker = TrainWorker(model_config, config, context=ctx)
        if args.resume:
            worker.load_checkpoint(args.resume)
        plan = BatchPlan(
            seed=config.seed,
            global_batch_size=config.global_batch_size,
            micro_batch_size=config.micro_batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
            hold_batches=worker.prefetch_depth + 2,
        )
        if ctx.is_main:
            log.info(
                "training %s (%s) on %s: %d train / %d val shards, seq %d, global batch %d = "
                "%d micro x %d ranks x %d accumulation",
                args.model,
                model_config.padded_vocab_size,
                ctx.device,
                len(data.train),
                len(data.val),
                config.seq_len,
                config.global_batch_size,
                config.micro_batch_size,
                ctx.world_size,
                worker.accumulation_steps,
            )
        while worker.step < args.steps:
            stop = _next_stop(worker.step, args)
            batches = train_batches(data, plan, worker.step, stop - worker.step)
            with contextlib.closing(batches):
                stats = worker.train_steps(batches, stop - worker.step)
            if ctx.is_main:
                _log_chunk(stats, worker)
            _evaluate_and_save(worker, data, plan, args, final=worker.step >= args.steps)


def _evaluate_and_save(
    worker: TrainWorker, data: LocalDataset, plan: BatchPlan, args: argparse.Namespace, final: bool
) -> None:
    step = worker.step
    if data.val and args.eval_every_steps and (step % args.eval_every_steps == 0 or final):
        batches = validation_batches(data, plan, args.eval_batches)
        with contextlib.closing(batches):
            loss = worker.evaluate(batches)
        if worker.context.is_main:
            log.info("step %d | val loss %.4f", step, loss)
    due = args.save_every_steps and step % args.save_every_steps == 0
    if args.save and (due or final):
        worker.save_checkpoint(args.save)


def resolve_seq_len(given: int | None, recorded: RecordedLength | None) -> int | None:
    """``--seq-len``, else the dataset's recorded length; a conflict with rows the shards
    store (templar) is an error. None: neither says (the model's max_seq_len is used)."""
    if recorded is None:
        return given
    if given is None:
        return recorded.seq_len
    if recorded.fixed_rows and given != recorded.seq_len:
        raise TrainConfigError(
            f"--seq-len {given} conflicts with the dataset: its shards store rows of "
            f"{recorded.seq_len} tokens ({recorded.source})",
            hint=f"leave --seq-len out (the stored {recorded.seq_len} is used) or pass "
            f"--seq-len {recorded.seq_len}",
        )
    return given


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = LaunchEnv.from_environ(os.environ)
    try:
        if args.estimate_memory:
            return 0 if print_estimate(args, model_and_values) else 1
        train(args, env)
    except TplrError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    return 0
