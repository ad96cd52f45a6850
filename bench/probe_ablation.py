"""Why do learned features fall short of the hand-crafted probe? Probe-side ablations on the
encoders ``bench/real_data.py`` trained (no retraining), on the same folds:

- probe protocol: closed-form ridge (default) against the papers' SGD-trained linear head;
- ViT pooling: mean of patch tokens (default) against the CLS token;
- resolution: encoders evaluated above their training size (``--eval-sizes``; ViTs get a resampled
  position embedding), and the hand-crafted measures at the encoders' 96 px as well as at 128 px.

    python bench/probe_ablation.py --params params/real-photos.yaml --out runs/savoias

Prints a JSON table of SRCC (out-of-fold, all categories pooled) and writes it to
``OUT/probe_ablation.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import parser  # this folder's shared helpers (on sys.path)

from clic.data.imageio import load_rgb, resize_short
from clic.data.prepare import prepare
from clic.embed import load_encoder
from clic.evaluation import handcrafted
from clic.evaluation.evaluate import evaluate_backbone, labelled, probe
from clic.evaluation.features import file_digest
from clic.evaluation.metrics import regression_metrics
from clic.models.backbones import at_resolution
from clic.params import data_config, load_params, probe_config


def _handcrafted_srcc(data_dir: Path, pcfg, size: int, seed: int) -> float:
    fit, _ = labelled(data_dir, pcfg)
    x = np.array([[handcrafted.measure(resize_short(load_rgb(r.image_path(data_dir)), size))[m]
                   for m in handcrafted.MEASURES] for r in fit], np.float64)
    feats = np.log1p(np.abs(x))
    pred, _ = probe(feats, fit, feats, fit, pcfg.model_copy(update={"protocol": "ridge"}), seed)
    return regression_metrics(pred, np.array([r.score for r in fit]))["srcc"]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params/real-photos.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/savoias")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128], help="hand-crafted measure resolutions")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[128], help="encoder input sides to probe at")
    ap.add_argument("--skip-handcrafted", action="store_true")
    args = ap.parse_args()
    params = load_params(args.params, args.overrides)
    seed, pcfg, out = int(params.get("seed", 0)), probe_config(params), Path(args.out)
    data_dir = prepare(data_config(params), seed)
    dev = torch.device("cpu")
    sizes = [] if args.skip_handcrafted else args.sizes
    table: dict = {f"handcrafted_{s}px": round(_handcrafted_srcc(data_dir, pcfg, s, seed), 4) for s in sizes}
    print(json.dumps(table), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in sorted(out.glob("models/*/encoder.pt")):
            method = encoder.parent.name
            backbone, cfg = load_encoder(encoder, dev)
            key = file_digest(encoder)

            def srcc(variant: str, probe_cfg, arch, bb=backbone, key=key) -> float:
                rep = evaluate_backbone(bb, arch, f"{key}-{variant}", data_dir, probe_cfg, Path(tmp) / variant,
                                        seed, dev, None, variant)
                return round(rep["srcc"], 4)

            row = {"ridge": srcc(f"{method}-ridge", pcfg, cfg),
                   "sgd": srcc(f"{method}-sgd", pcfg.model_copy(update={"protocol": "sgd"}), cfg)}
            if getattr(backbone, "is_vit", False):
                backbone.pool = "cls"
                row["cls_token"] = srcc(f"{method}-cls", pcfg, cfg)
                backbone.pool = cfg.pool
            for size in args.eval_sizes:
                bb, arch = at_resolution(backbone, cfg, size)
                row[f"eval_{size}px"] = srcc(f"{method}-{size}", pcfg, arch, bb)
            table[method] = row
            print(json.dumps({method: row}), flush=True)
    (out / "probe_ablation.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
