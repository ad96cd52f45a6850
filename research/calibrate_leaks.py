"""Calibrate the near-duplicate leak check (``validate.near_duplicate_bits``): how far a resized,
re-encoded copy of an evaluation photo lies from it, against how near distinct photos come.

    python research/calibrate_leaks.py --eval ../shared/data/savoias-dev/Images --corpus ../shared/data/unlabeled

Copies: each evaluation image resized to a short side of 256 / 128 px and saved as JPEG at
quality 90 / 75 / 50 (the way a web corpus holds a photo), plus a 5% border crop. Distinct: every
(corpus, evaluation) pair and every pair of evaluation images. Prints JSON: the Hamming
distances' quantiles for both, and how many pairs each threshold would flag.
"""

from __future__ import annotations

import argparse
import io
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from clic.data.corpus import walk_images
from clic.data.imageio import hamming, load_rgb, perceptual_hash, resize_short

VARIANTS = [(256, 90), (256, 75), (256, 50), (128, 75), ("crop", 90)]


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(path: Path) -> tuple[int, list[int]]:
    """The image's hash and its copies' hashes (one per :data:`VARIANTS`)."""
    img = load_rgb(path)
    out = []
    for side, quality in VARIANTS:
        if side == "crop":
            w, h = img.size
            dx, dy = w // 20, h // 20
            copy = resize_short(img.crop((dx, dy, w - dx, h - dy)), 256)
        else:
            copy = resize_short(img, int(side))
        out.append(perceptual_hash(_jpeg(copy, quality)))
    return perceptual_hash(img), out


def plain(path: Path) -> int:
    return perceptual_hash(load_rgb(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    evals, corpus = list(walk_images(args.eval)), list(walk_images(args.corpus))
    with ProcessPoolExecutor(args.workers) as pool:
        ev = list(pool.map(copies, evals, chunksize=16))
        co = np.array(list(pool.map(plain, corpus, chunksize=64)), dtype=np.uint64)
    originals = np.array([h for h, _ in ev], dtype=np.uint64)
    copy_bits = np.bitwise_count(originals[:, None] ^ np.array([c for _, c in ev], dtype=np.uint64))  # (eval, variant)
    copy_d = {f"{s}/q{q}": copy_bits[:, j] for j, (s, q) in enumerate(VARIANTS)}
    cross = hamming(co, originals)  # (corpus, eval)
    within = hamming(originals, originals)[np.triu_indices(len(originals), 1)]
    distinct = np.concatenate([cross.ravel(), within])
    q = [0, 0.0001, 0.001, 0.01, 0.5]
    report = {
        "eval_images": len(evals), "corpus_images": len(corpus),
        "copies_max_bits": {k: int(v.max()) for k, v in copy_d.items()},
        "copies_quantiles_bits": {k: np.quantile(v, [0.5, 0.99, 1.0]).tolist() for k, v in copy_d.items()},
        "distinct_pairs": int(distinct.size),
        "distinct_quantiles_bits": dict(zip(map(str, q), np.quantile(distinct, q).tolist(), strict=True)),
        "nearest_corpus_image_per_eval_image_min": int(cross.min()),
        "flagged_distinct_pairs_at": {t: int((distinct <= t).sum()) for t in range(0, 17, 2)},
        "missed_copies_at": {t: int(sum((v > t).sum() for v in copy_d.values())) for t in range(0, 17, 2)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
