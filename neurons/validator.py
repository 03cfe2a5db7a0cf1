"""tplr validator: score the miners each window, publish scores, peer lists and (lead) checkpoints.

    python neurons/validator.py --lead --uid 0  # the lead: creates run.json, publishes checkpoints
    python neurons/validator.py --help          # every setting, its env var and its default

Settings come from flags, the environment and .env (flags win). The run's hyperparameters
come from run.json, which the lead creates from its own settings.
"""

from __future__ import annotations

import os

from tplr.errors import TplrError
from tplr.node.process.lifecycle import (
    EXIT_CONFIG,
    check_single_process,
    configure_node_process,
    report_error,
    run_node,
)
from tplr.node.process.settings_cli import load_settings
from tplr.node.validator import run_validator


def main(argv: list[str] | None = None) -> int:
    try:
        check_single_process(os.environ)
        settings = load_settings("validator", argv)
    except TplrError as exc:
        report_error(exc)
        return EXIT_CONFIG
    configure_node_process(settings, os.environ)
    return run_node(
        lambda shutdown: run_validator(settings, shutdown), grace_s=settings.node.stop_grace_s
    )


if __name__ == "__main__":
    raise SystemExit(main())
