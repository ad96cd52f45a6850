"""Evaluation benchmarks; prints JSON (a script, not a test).

- ridge probe with 5-fold CV over 9 penalties on 10,000 x 2,048 features (target: a few seconds);
- ``clic score`` images/s on CPU (decode + resize in loader workers, model forward) compared, in
  the same run, with the bare model forward on pre-decoded tensors at the same thread count
  (target: at least 0.8 where the workers have spare cores). ``--threads`` defaults to the cores
  left beside ``--workers``; run it under ``taskset -c`` with threads + workers cores.

    python bench/bench_eval.py [--images 512] [--backbone resnet18] [--size 112] [--source 448]
        [--workers 1] [--threads T]

``--source`` is the side of the JPEGs scored (default 4x the model input); camera-sized photos
(e.g. ``--source 1536``) show the reduced-scale JPEG decoding of :func:`clic.data.imageio.load_rgb`.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import emit, parser, rate, timed  # this folder's shared helpers (on sys.path)
from PIL import Image

from clic.config import PretrainConfig
from clic.cores import torch_threads, usable_cores
from clic.data.synthetic import render
from clic.embed import eval_transform
from clic.evaluation.probe import fit_ridge
from clic.models.backbones import build_backbone
from clic.models.heads import LinearHead
from clic.params import from_dict
from clic.scorer import Scorer


def ridge_bench(n: int = 10_000, d: int = 2_048) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = x[:, :10] @ rng.normal(size=10) + rng.normal(size=n)
    head, seconds = timed(fit_ridge, x, y, folds=5)
    return {"ridge_cv_seconds": round(seconds, 2), "n": n, "d": d, "alpha": head.alpha}


def _write(job: tuple[int, int, str]) -> None:
    i, source, path = job
    img, _ = render(0, i, source, "mixed")  # larger than the model input: real decode + resize
    img.save(path, quality=92)


def score_bench(images: int, backbone: str, size: int, workers: int, source: int, threads: int) -> dict:
    torch.manual_seed(0)
    threads = threads or max(1, usable_cores() - workers)
    cfg = from_dict(PretrainConfig, {"backbone": backbone, "image_size": size})
    bb = build_backbone(backbone, size).eval()
    dim = bb.feature_dim
    head = LinearHead(np.zeros(dim), np.ones(dim), np.random.default_rng(0).normal(size=dim) / dim, np.array(0.5))
    scorer = Scorer(bb, cfg, head)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i}.jpg" for i in range(images)]
        with ProcessPoolExecutor(usable_cores()) as pool:
            list(pool.map(_write, [(i, source, str(p)) for i, p in enumerate(paths)], chunksize=16))
        scorer.score_files(paths[:64], batch_size=64, workers=workers, progress=False, threads=threads)  # warm-up
        (_, kept, _), seconds = timed(scorer.score_files, paths, batch_size=64, workers=workers, progress=False,
                                      threads=threads)
        scored = len(kept) / seconds
        tf = eval_transform(size)
        batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[:64]])
        with torch.no_grad(), torch_threads(threads):
            bb(batch)
            bare = rate(images, lambda: [bb(batch[: min(64, images - s)]) for s in range(0, images, 64)], ndigits=None)
    return {"score_images_per_s": round(scored, 1), "bare_forward_images_per_s": round(bare, 1),
            "score_vs_bare": round(scored / bare, 3), "backbone": backbone, "size": size, "source": source,
            "workers": workers, "threads": threads, "cores": usable_cores()}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=512,
                    help="images scored; use >= 16 batches of 64 per worker, or start-up and the pipeline's "
                    "fill (each worker builds whole batches) weigh on the rate")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0,
                    help="forward threads, scoring and bare alike (default: the cores the workers leave)")
    ap.add_argument("--source", type=int, default=0, help="side of the scored JPEGs (default 4 x size)")
    args = ap.parse_args()
    source = args.source or 4 * args.size
    scoring = score_bench(args.images, args.backbone, args.size, args.workers, source, args.threads)
    emit({**ridge_bench(), **scoring}, indent=2)


if __name__ == "__main__":
    main()
