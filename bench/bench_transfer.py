"""Transfer-probe feature extraction at scale: images/s and peak memory; prints JSON.

Writes ``--n`` small synthetic JPEGs (default 100,000) and streams their features through
:func:`clic.evaluation.transfer.stream_features` into an on-disk memmap, as the ImageNet linear
probe does. Memory must stay flat in ``n``: compare ``peak_rss_mb`` of two sizes.

    python bench/bench_transfer.py [--n 100000] [--size 32] [--workers 2] [--backbone resnet18]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import emit, parser, peak_rss_mb, timed  # this folder's shared helpers (on sys.path)
from PIL import Image

from clic.evaluation.transfer import stream_features
from clic.models.backbones import build_backbone


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backbone", default="resnet18")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tiles = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(64)]
        paths = [Path(tmp, f"{i % 1000:03d}", f"{i}.jpg") for i in range(args.n)]

        def write() -> None:
            for i, p in enumerate(paths):
                p.parent.mkdir(exist_ok=True)
                tiles[i % 64].save(p, quality=85)

        _, write_s = timed(write)
        backbone = build_backbone(args.backbone, args.size).eval()
        rss_before = peak_rss_mb()
        feats, elapsed = timed(stream_features, backbone, paths, args.size, Path(tmp, "features.npy"),
                               workers=args.workers)
        result = {"n": args.n, "size": args.size, "backbone": args.backbone, "workers": args.workers,
                  "feature_shape": list(feats.shape), "images_per_s": round(args.n / elapsed, 1),
                  "write_jpegs_s": round(write_s, 1), "peak_rss_mb_before": rss_before, "peak_rss_mb": peak_rss_mb(),
                  "peak_rss_mb_workers": peak_rss_mb(workers=True)}
    emit(result)


if __name__ == "__main__":
    main()
