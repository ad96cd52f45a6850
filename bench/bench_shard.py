"""Preparing a large corpus: ``clic data shard`` throughput and memory; prints JSON (a script, not a test).

Generates ``--n`` small synthetic JPEGs (default 100,000) in folders of 1,000 (an ImageNet-like
layout), lists them (:func:`clic.data.corpus.corpus_records`) and writes them as MDS shards
(:func:`clic.data.shards.write_shards`, every core). Reports images/s (overall and per core) and
peak RSS of this process and of the largest worker (``ru_maxrss``), so memory growth with ``n``
shows by running two sizes. ``--resume`` then deletes the second half of the parts (as a kill
would leave them) and times the re-run that completes them; ``--read`` times one epoch read and
decoded through the training stream in one process.

    python bench/bench_shard.py [--n 100000] [--size 96x72] [--side 0] [--per-shard 1000] [--workers 0] \
        [--resume] [--read]

``--size 500x375`` gives ImageNet-sized files (decode-bound rather than overhead-bound).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import emit, parser, peak_rss_mb, timed  # this folder's shared helpers (on sys.path)
from PIL import Image

from clic.data.corpus import corpus_records
from clic.data.shards import INDEX_NAME, write_shards


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (96, 72)) -> None:
    """``n`` distinct JPEGs of ``size`` (a gradient plus noise, so each decodes differently)."""
    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 180, w, dtype=np.float32)[None, :, None]
    for i in range(n):
        folder = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        noise = rng.integers(0, 64, (h, w, 3), dtype=np.uint8)
        arr = (ramp + noise + (i % 7) * 4).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:07d}.jpg", quality=90)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", default="96x72", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--side", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="default: every core this process may use")
    ap.add_argument("--resume", action="store_true", help="also time completing a run killed half-way")
    ap.add_argument("--read", action="store_true", help="also time reading and decoding one epoch, one process")
    args = ap.parse_args()
    workers = args.workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "shards"
        w, h = (int(x) for x in args.size.split("x"))
        _, generated = timed(make_jpegs, src, args.n, (w, h))
        rss_before = peak_rss_mb()
        records, listed = timed(corpus_records, [src])
        summary, seconds = timed(write_shards, records, out, args.per_shard, args.side, workers=workers, progress=False)
        report = {"n": args.n, "size": args.size, "workers": workers, "per_shard": args.per_shard, "side": args.side,
                  "generate_seconds": round(generated, 1), "list_seconds": round(listed, 2),
                  "shard_seconds": round(seconds, 2), "images_per_s": round(args.n / seconds, 1),
                  "images_per_s_per_core": round(args.n / seconds / workers, 1),
                  "parts": summary.parts, "shard_bytes_mb": round(sum(p.stat().st_size for p in
                                                                      out.glob("part-*/*.mds")) / 2**20, 1),
                  "rss_before_listing_mb": rss_before, "peak_rss_main_mb": peak_rss_mb(),
                  "peak_rss_largest_worker_mb": peak_rss_mb(workers=True)}
        if args.read:  # one epoch through the training stream, decoded, no views
            from clic.data.shard_stream import ShardStream

            stream = ShardStream([out], Path(tmp) / "cache", lambda img: {"w": img.size[0]}, batch_size=1)
            stream.set_epoch(0)
            count, seconds = timed(lambda: sum(1 for _ in stream))
            report.update(read_images_per_s=round(count / seconds, 1))
        if args.resume:
            for p in sorted(out.glob("part-*"))[summary.parts // 2:]:
                shutil.rmtree(p)
            (out / INDEX_NAME).unlink()
            again, seconds = timed(write_shards, records, out, args.per_shard, args.side, workers=workers,
                                   progress=False)
            report.update(resume_seconds=round(seconds, 2), resume_written=again.written)
        emit(report)


if __name__ == "__main__":
    main()
