"""Transfer-probe feature extraction at scale: images/s and peak memory; prints JSON.

Writes ``--n`` small synthetic JPEGs (default 100,000) and streams their features through
:func:`clic.evaluation.transfer.stream_features` into an on-disk memmap, as the ImageNet linear
probe does. Memory must stay flat in ``n``: compare ``peak_rss_mb`` of two sizes.

    python bench/bench_transfer.py [--n 100000] [--size 32] [--workers 2] [--backbone resnet18]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clic.evaluation.transfer import stream_features
from clic.models.backbones import build_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backbone", default="resnet18")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        tiles = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(64)]
        start = time.perf_counter()
        for i in range(args.n):
            p = Path(tmp, f"{i % 1000:03d}", f"{i}.jpg")
            p.parent.mkdir(exist_ok=True)
            tiles[i % 64].save(p, quality=85)
            paths.append(p)
        write_s = time.perf_counter() - start
        backbone = build_backbone(args.backbone, args.size).eval()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        feats = stream_features(backbone, paths, args.size, Path(tmp, "features.npy"), workers=args.workers)
        elapsed = time.perf_counter() - start
        result = {"n": args.n, "size": args.size, "backbone": args.backbone, "workers": args.workers,
                  "feature_shape": list(feats.shape), "images_per_s": round(args.n / elapsed, 1),
                  "write_jpegs_s": round(write_s, 1), "peak_rss_mb_before": round(rss_before, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "peak_rss_mb_workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
