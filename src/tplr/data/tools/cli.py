"""``tplr shards ...``: prepare, convert, inspect, upload.

Arguments are parsed here; the work lives in :mod:`tplr.data.tools.prepare`,
:mod:`tplr.data.tools.convert`, :mod:`tplr.data.tools.inspect_shards` and
:mod:`tplr.data.tools.upload_shards` (imported when their command runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tplr.units import parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shards", help="prepare, convert, inspect and upload token shards")
    commands = p.add_subparsers(dest="shards_command", metavar="SHARDS_COMMAND", required=True)
    _register_prepare(commands)
    _register_convert(commands)
    _register_inspect(commands)
    _register_upload(commands)


def _register_prepare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "prepare",
        help="tokenize .txt/.jsonl/.parquet into shards + sample ids + manifest",
        description=(
            "Tokenize text into token shards (deterministic: the same input gives the same "
            "bytes for any input order and worker count). Documents are separated by the "
            "end-of-text token; the manifest is written last."
        ),
    )
    p.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        type=Path,
        required=True,
        help="input files or folders (.txt, .jsonl with 'text', .parquet with 'text')",
    )
    p.add_argument(
        "--out", dest="out_dir", type=Path, required=True, help="output folder (new or empty)"
    )
    p.add_argument(
        "--tokenizer",
        choices=("gpt2", "bytes"),
        default="gpt2",
        help="gpt2 (tiktoken, from its offline cache) or bytes (vocab 257)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        required=True,
        help="templar: tokens per stored sequence; llmc: model context (rows of N+1)",
    )
    p.add_argument("--shard-tokens", type=int, required=True, help="tokens per shard (at most)")
    p.add_argument(
        "--format",
        choices=("templar", "llmc"),
        default="templar",
        help="templar (.npy + sample ids, default) or llmc (.bin with header)",
    )
    p.add_argument(
        "--val-shards",
        type=int,
        default=1,
        help="shards held out for validation (the last K; default 1)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column of the text")
    p.add_argument(
        "--part-size", type=parse_size, default=None, help="manifest hash part size (default 32MiB)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from tplr.comms.manifest import DEFAULT_PART_SIZE
    from tplr.data.tools.prepare import PrepareConfig, prepare_shards

    config = PrepareConfig.from_values(
        inputs=args.inputs,
        out_dir=args.out_dir,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        shard_tokens=args.shard_tokens,
        format=args.format,
        val_shards=args.val_shards,
        workers=args.workers,
        text_field=args.text_field,
        part_size=args.part_size or DEFAULT_PART_SIZE,
        progress=not args.no_progress,
    )
    result = prepare_shards(config)
    tokens = sum(r.num_tokens for r in result.records)
    print(
        f"wrote {len(result.records)} shard(s), {tokens} tokens, to {config.out_dir} "
        f"({result.dropped_tokens} trailing tokens dropped; manifest.json written last)"
    )
    return 0


def _register_convert(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "convert",
        help="llm.c .bin shards -> templar .npy + sample ids + manifest",
        description="Convert llm.c shards (header checked, never read as tokens) to templar.",
    )
    p.add_argument("sources", nargs="+", type=Path, help="llm.c .bin file(s)")
    p.add_argument("dst", type=Path, help="output folder (new or empty)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per templar sequence")
    p.add_argument(
        "--val-shards",
        type=int,
        default=None,
        help="shards held out for validation (default: 1 if >1 source, else 0)",
    )
    p.add_argument(
        "--part-size", type=parse_size, default=None, help="manifest hash part size (default 32MiB)"
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from tplr.comms.manifest import DEFAULT_PART_SIZE
    from tplr.data.tools.convert import convert_llmc_to_templar

    result = convert_llmc_to_templar(
        args.sources,
        args.dst,
        seq_len=args.seq_len,
        val_shards=args.val_shards,
        part_size=args.part_size or DEFAULT_PART_SIZE,
    )
    print(
        f"converted {len(result.records)} shard(s) into {args.dst} "
        f"({result.dropped_tokens} trailing tokens dropped)"
    )
    return 0


def _register_inspect(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="detect and validate token files; one JSON object per file",
        description="Exit status 1 when any file is invalid.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="token files or dataset folders")
    p.add_argument(
        "--raw-uint16",
        action="store_true",
        help="the files are headerless uint16 tokens (never guessed)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length (templar: checked; llm.c: to count windows of N+1)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="fail when a token id is >= this vocabulary size",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="max token id from a sample of each file instead of a full scan",
    )
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tplr.data.tools.inspect_shards import inspect_paths

    reports, all_ok = inspect_paths(
        args.paths,
        raw_uint16=args.raw_uint16,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        sample_only=args.sample,
    )
    for report in reports:
        print(json.dumps(report))
    sys.stdout.flush()
    return 0 if all_ok else 1


def _register_upload(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "upload",
        help="upload a prepared dataset folder; manifest.json last",
        description=(
            "Upload every file named by DIR/manifest.json (multipart, retried) to "
            "s3://BUCKET/PREFIX (or file://...), then the manifest, so a reader never sees "
            "a manifest naming missing files."
        ),
    )
    p.add_argument("src", type=Path, help="dataset folder holding manifest.json")
    p.add_argument("url", help="destination, e.g. s3://bucket/remote/tokenized/")
    p.add_argument("--concurrency", type=int, default=2, help="files uploaded at once")
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint URL (overrides AWS_ENDPOINT_URL / R2_*_ENDPOINT_URL)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_upload)


def _cmd_upload(args: argparse.Namespace) -> int:
    from tplr.data.tools.upload_shards import run_upload_command

    return run_upload_command(args)
