"""The GPU run of docs/results.md, as one command: CLIC (ResNet-50) and CLICv2 (ViT-S/16) at 224 px
pretrained on the unlabelled corpus with the recipe card's settings (``params/gpu-corpus.yaml``),
each in its share of a fixed GPU time; then, on any CPU, the unseen-kinds probe of those encoders.

    python bench/gpu_corpus.py --out runs/gpu --seconds 400 --phase train    # on the GPU machine
    python bench/gpu_corpus.py --out runs/gpu --phase probe                  # here, on CPU

``train``: per method, a calibration run (2 short epochs; the first compiles, and torch's compile
cache serves the main run) measures the steady images/s; the main run's ``epochs`` (and CLICv2's
warm-up, 1/15 of the run as the recipe's 20 of 300) fit the method's share of ``--seconds``; it is
stopped at 1.5x its share plus two minutes, its last checkpoint then the encoder. Writes
``OUT/<method>/`` and ``OUT/gpu.json`` (rates, epochs, seconds, whether a run was cut). ``probe``:
the product's own commands on those encoders (no pretraining): ``clic data prepare`` of the
profile's scored photos into ``OUT/probe/prepared``, then ``clic probe --model`` per method into
``OUT/probe/<method>/`` (metrics.json, predictions.csv).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, parser  # this folder's shared helpers (on sys.path)

from clic.data.corpus import corpus_records
from clic.params import Params, load_params, pretrain_config


def clic(args: list[str], timeout: float | None = None) -> tuple[int, float]:
    """Run ``python -m clic.cli ARGS`` in the project; (exit status, seconds). A timeout stops it."""
    start = time.perf_counter()
    try:
        rc = subprocess.run([sys.executable, "-m", "clic.cli", *args], cwd=REPO, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.perf_counter() - start


def last_metrics(folder: Path) -> dict[str, Any]:
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else {}


def corpus_size(params: Params, method: str) -> tuple[int, int]:
    """The images the method pretrains on, and its samples per epoch: CLIC with offline-style
    mosaics (``rcm.pairing`` extra/both) trains on each image and its mosaics."""
    cfg = pretrain_config(params, method)
    n = len(corpus_records(cfg.data))
    images = min(n, cfg.max_images) if cfg.max_images else n
    extra = cfg.rcm.extra_per_image if method == "clic" and cfg.rcm.pairing in ("extra", "both") else 0
    return images, images * (1 + extra)


def train(args: argparse.Namespace) -> dict[str, Any]:
    params = load_params(args.params, args.overrides)
    sets = [x for o in args.overrides for x in ("--set", o)]
    share = args.seconds / len(args.methods)
    out: dict[str, Any] = {"params": str(args.params), "overrides": args.overrides, "seconds": args.seconds,
                           "methods": {}}
    for method in args.methods:
        base = ["pretrain", "--params", str(args.params), "--method", method, *sets]
        batch = pretrain_config(params, method).batch_size
        calib_images = batch * args.calibration_steps
        calib_dir = args.out / "calibration" / method
        rc, calib_s = clic([*base, "--out", str(calib_dir), "--set", "epochs=2",
                            "--set", f"max_images={calib_images}"], timeout=share)
        rate = float(last_metrics(calib_dir).get("images_per_s", 0.0))
        if rc != 0 or rate <= 0:
            raise SystemExit(f"{method}: the calibration run failed (exit {rc}); see the output above")
        images, samples = corpus_size(params, method)
        left = max(share - calib_s, share / 3)
        epochs = max(1, math.floor(left * rate * args.fill / samples))
        extra = ["--set", f"epochs={epochs}"]
        if method == "clicv2":
            extra += ["--set", f"optim.warmup_epochs={round(epochs / 15, 2)}"]
        run_dir = args.out / method
        rc, run_s = clic([*base, "--out", str(run_dir), *extra], timeout=1.5 * left + 120)
        done = last_metrics(run_dir)
        out["methods"][method] = {"calibration_images_per_s": round(rate, 1), "calibration_s": round(calib_s, 1),
                                  "corpus_images": images, "epochs": epochs, "run_s": round(run_s, 1),
                                  "epochs_done": int(done.get("epoch", -1)) + 1, "cut": rc != 0,
                                  "encoder": str(run_dir / ("encoder.pt" if rc == 0 else "checkpoint.pt"))}
        (args.out / "gpu.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"{method}: {rate:.0f} img/s, {epochs} epochs in {run_s:.0f} s" + (" (cut)" if rc else ""), flush=True)
    return out


def probe(args: argparse.Namespace) -> None:
    summary = json.loads((args.out / "gpu.json").read_text())
    clic = [sys.executable, "-m", "clic.cli"]
    sets = [x for o in [f"data.out_dir={args.out / 'probe' / 'prepared'}", *args.overrides] for x in ("--set", o)]
    subprocess.run([*clic, "data", "prepare", "--params", str(args.params), *sets], cwd=REPO, check=True)
    for method, run in summary["methods"].items():
        subprocess.run([*clic, "probe", "--params", str(args.params), *sets, "--model", run["encoder"],
                        "--out", str(args.out / "probe" / method)], cwd=REPO, check=True)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--params", type=Path, default=REPO / "params" / "gpu-corpus.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--methods", nargs="+", default=["clic", "clicv2"])
    ap.add_argument("--seconds", type=float, default=400.0, help="GPU time for all methods (default 400)")
    ap.add_argument("--calibration-steps", type=int, default=24)
    ap.add_argument("--fill", type=float, default=0.85, help="fraction of the measured rate planned for")
    ap.add_argument("--phase", choices=("train", "probe", "both"), default="both")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("train", "both"):
        train(args)
    if args.phase in ("probe", "both"):
        probe(args)


if __name__ == "__main__":
    main()
