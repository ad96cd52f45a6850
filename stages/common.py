"""What every stage does the same way: its params and method argument, JSON outputs, errors as one
clear line."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clic import methods
from clic.params import load_params

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("great_expectations", "mlflow.system_metrics")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(rel: str, data: Any, **dump: Any) -> Path:
    """``data`` as indented JSON in ``ROOT / rel``, its folder made; ``dump``: more ``json.dumps``
    arguments (``sort_keys``, ``default``)."""
    out = ROOT / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, **dump) + "\n")
    return out


def main(stage: str, fn: Callable[..., None], per_method: bool = False) -> None:
    """Run ``fn(params)``, or ``fn(params, method)`` for a ``per_method`` stage (``python -m
    stages.<stage> <method>``); a ValueError (bad input, bad params, unreachable store) exits 2
    with one line, anything else exits 1 with the traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in QUIET:  # their INFO lines are import-time chatter, not the stage's progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if per_method and (len(sys.argv) != 2 or sys.argv[1] not in methods.names()):
        raise SystemExit(f"usage: python -m {sys.argv[0]} {{{','.join(methods.names())}}}")
    try:
        fn(load_params(ROOT / "params.yaml"), *(sys.argv[1:2] if per_method else ()))
    except ValueError as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print(f"{stage}: failed (see the traceback above)", file=sys.stderr)
        sys.exit(1)
