"""``tplr doctor ROLE [node flags]``: check a host before (or while) it runs a node.

Reads the same settings as ``neurons/ROLE.py`` (flags, environment, ``.env``) and prints
one line per check (``ok``, ``warn``, ``fail``, ``skip``). Exit code 0 when nothing
failed, 1 when a check failed, 2 when the settings themselves are invalid.
"""

from __future__ import annotations

import argparse
import asyncio

from tplr.doctor.report import exit_code

EPILOG = """checks: settings; clock skew against each bucket's Date header; read rights on the
dataset bucket; put/get/delete on this node's gradients bucket (and that the READ_* key
reads but may not write); the peers file; the dataset layout and free disk for the next
shard; run.json (reachable, agrees with the local TPLR_RUN_* settings); GPU visibility and
memory for the run's model; for a running node its last upload (or scores), its score and
its place in the peer list."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this host, its settings, buckets, dataset and run (one line each)",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
    )
    parser.add_argument("role", choices=("miner", "validator"), help="the node to check for")
    parser.add_argument(
        "--max-clock-skew-s",
        type=float,
        default=None,
        help="fail when a store's clock differs from ours by more (default 10)",
    )
    parser.add_argument(
        "node_args",
        nargs=argparse.REMAINDER,
        help="the node's own flags (e.g. --uid 3 --env-file .env); see neurons/ROLE.py --help",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tplr.doctor.run import DEFAULT_MAX_CLOCK_SKEW_S, DoctorOptions, run_doctor
    from tplr.node.process.settings_cli import load_settings

    settings = load_settings(args.role, args.node_args)  # a ConfigError exits 2
    for notice in settings.notices:
        print(f"warn  settings: {notice}")
    skew = DEFAULT_MAX_CLOCK_SKEW_S if args.max_clock_skew_s is None else args.max_clock_skew_s
    results = asyncio.run(run_doctor(settings, DoctorOptions(max_clock_skew_s=skew)))
    print(f"ok    settings: {args.role} uid {settings.node.uid}")
    for result in results:
        print(result.line(), flush=True)
    failed = sum(result.status == "fail" for result in results)
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    return exit_code(results)
