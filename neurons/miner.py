"""tplr miner: train on the assigned samples each window, publish compressed pseudo-gradients.

    python neurons/miner.py --uid 1            # embedded store under ./.tplr/ (no R2 keys)
    python neurons/miner.py --help             # every setting, its env var and its default
    torchrun --standalone --nproc_per_node=8 neurons/miner.py --uid 1   # 8 GPUs, DDP

Settings come from flags, the environment and .env (flags win). The run's hyperparameters
come from the lead validator's run.json.
"""

from __future__ import annotations

import os

from tplr.errors import TplrError
from tplr.node.launch import run_miner_process
from tplr.node.process.lifecycle import EXIT_CONFIG, configure_node_process, report_error
from tplr.node.process.settings_cli import load_settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings("miner", argv)
    except TplrError as exc:
        report_error(exc)
        return EXIT_CONFIG
    configure_node_process(settings, os.environ)
    return run_miner_process(settings, os.environ)  # torchrun: rank 0 mines, others follow


if __name__ == "__main__":
    raise SystemExit(main())
