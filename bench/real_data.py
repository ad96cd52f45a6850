"""Does it learn complexity from real photos? Pretrain each method on a real dataset's images
(labels unused), probe every encoder and the baselines on the same folds, print a JSON table.

    python bench/real_data.py --params params/real-photos.yaml --out runs/savoias [--methods ...]

Resumable: each method trains into ``OUT/models/<method>`` (re-running continues from checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from clic.config import data_config, load_params, pretrain_config, probe_config
from clic.data.prepare import prepare
from clic.evaluation.evaluate import evaluate_encoder, evaluate_handcrafted, evaluate_random
from clic.pretrain import run


def _row(report: dict, seconds: float | None = None) -> dict:
    row = {k: round(report[k], 4) for k in ("pcc", "srcc", "krcc", "rmse")}
    row["srcc_ci95"] = [round(v, 3) for v in report.get("srcc_ci95", [])]
    row["srcc_per_category"] = {c: round(m["srcc"], 4) for c, m in report.get("per_category", {}).items()}
    if seconds is not None:
        row["pretrain_minutes"] = round(seconds / 60, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/real-photos.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/savoias")
    ap.add_argument("--methods", nargs="+", default=["moco", "clic", "clicv2"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    seed, pcfg, out = int(params.get("seed", 0)), probe_config(params), Path(args.out)
    data_dir = prepare(data_config(params), seed)
    table: dict = {}
    hc = evaluate_handcrafted(data_dir, pcfg, out / "reports" / "handcrafted", seed)
    table["handcrafted_probe"] = _row(hc)
    table["handcrafted_zero_shot"] = {m: round(v["srcc"], 4) for m, v in hc["zero_shot"].items()}
    table["handcrafted_zero_shot_mean_category_srcc"] = {
        m: round(v.get("srcc_mean_category", float("nan")), 4) for m, v in hc["zero_shot"].items()}
    randoms_done = set()
    for method in args.methods:
        cfg = pretrain_config(params, method)
        key = (cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth)
        if key not in randoms_done:
            rep = evaluate_random(cfg, data_dir, pcfg, out / "reports" / f"random_{method}", seed)
            table[f"random_{cfg.backbone}"] = _row(rep)
            randoms_done.add(key)
        start = time.time()
        encoder = run(cfg, data_dir, out / "models" / method, progress=False)
        seconds = time.time() - start
        table[method] = _row(evaluate_encoder(encoder, data_dir, pcfg, out / "reports" / method, seed), seconds)
        print(json.dumps(table, indent=2), flush=True)
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
