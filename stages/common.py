"""What every stage does the same way: load params, report errors as one clear line."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clic.config import METHODS
from clic.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
log = logging.getLogger("stages")
QUIET = ("great_expectations", "mlflow.system_metrics")


def params() -> dict[str, Any]:
    return load_params(PARAMS)


def method_arg(allowed: tuple[str, ...] = METHODS) -> str:
    if len(sys.argv) != 2 or sys.argv[1] not in allowed:
        raise SystemExit(f"usage: python -m {sys.argv[0]} {{{','.join(allowed)}}}")
    return sys.argv[1]


def main(stage: str, fn: Callable[[], None]) -> None:
    """Run ``fn``; a ValueError (bad input, bad params, unreachable store) exits 2 with one line,
    anything else exits 1 with the traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in QUIET:  # their INFO lines are import-time chatter, not the stage's progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        fn()
    except ValueError as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print(f"{stage}: failed (see the traceback above)", file=sys.stderr)
        sys.exit(1)
