"""MosaicML streaming against the same cases as bench/streaming_libs.py (litdata): a corpus whose
index names pickle, each sample exactly once per epoch over ranks x loader workers with every
rank the same number of batches, a loader resumed at a step, and read throughput against the
hand-made shard reader (clic/data/shard_stream.py) on the same JPEGs.

    pip install --no-deps --target /tmp/ms mosaicml-streaming==0.10.0 xxhash zstd python-snappy \
        cramjam brotli transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 safetensors regex
    PYTHONPATH=/tmp/ms python bench/streaming_mosaic.py [--images DIR] [--count 2000]

(0.10.0 is what pip resolves beside the lock's numpy 2.4.6: later releases pin numpy < 2.2. A
normal install pulls ~35 packages: transformers, boto3, azure, oci, google-cloud-storage.)

Measured (0.10.0; 48 samples, batch 4, 2 gloo ranks x 2 workers; 1,000 corpus JPEGs of 256 px,
one process, three alternating runs, two training jobs on the two cores meanwhile):
- a corpus whose index names ``pkl`` is refused by default (``allow_unsafe_types=False``): the
  case litdata fails, MosaicML holds;
- 6 and 6 batches per rank, 48 distinct samples each epoch, orders differ between epochs, the
  loader resumed from its state_dict after 3 batches gives the uninterrupted epoch on both ranks;
- read + decode: shard reader 2,150 img/s (median 1,863), MosaicML 775 (median 756): about
  0.8 ms more per sample, which a loader worker pays beside ~10 ms of view augmentation.
Not measured: object-store URLs (no network here), the whole pretraining loop on it.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

N, BATCH, WORKERS, WORLD = 48, 4, 2, 2
TMP = tempfile.gettempdir()


class Smuggled:
    """A sample whose unpickling calls a function of the writer's choosing (here: print)."""

    def __reduce__(self):
        return (print, ("executed on read: True",))


def executes_on_read():
    from streaming import MDSWriter, StreamingDataset
    root = os.path.join(TMP, "clic-mds-pickle")
    shutil.rmtree(root, ignore_errors=True)
    with MDSWriter(out=root, columns={"x": "pkl"}) as w:
        w.write({"x": Smuggled()})
    try:
        StreamingDataset(local=root)[0]
        print("pickle corpus read with the defaults: yes")
    except ValueError as exc:
        print("pickle corpus read with the defaults: refused:", str(exc)[:120])


def load(path):
    with open(path) as fh:
        return json.load(fh)


def build(root):
    from streaming import MDSWriter
    if not os.path.isdir(root):
        with MDSWriter(out=root, columns={"id": "int", "image": "bytes"}, size_limit=7 * 64) as w:
            for i in range(N):
                w.write({"id": i, "image": np.full((4, 4, 3), i % 255, np.uint8).tobytes()})


def worker(rank, phase, root, out):
    """One phase per spawn (MosaicML keeps a dataset's shared memory until its process ends):
    ``epochs`` two whole epochs; ``stop`` three batches, then the loader's state; ``resume`` the rest."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29572", RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from streaming import StreamingDataLoader, StreamingDataset
    ds = StreamingDataset(local=root, shuffle=True, shuffle_seed=5, batch_size=BATCH)
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, drop_last=True)
    path = f"{out}/{phase}{rank}.json"
    if phase == "epochs":
        res = [[b["id"].tolist() for b in dl] for _ in range(2)]
    elif phase == "stop":
        res = {"seen": [], "state": None}
        for i, b in enumerate(dl):
            res["seen"].append(b["id"].tolist())
            if i == 2:
                res["state"] = dl.state_dict()
                break
    else:
        dl.load_state_dict(load(f"{out}/stop{rank}.json")["state"])
        res = [b["id"].tolist() for b in dl]
    with open(path, "w") as fh:
        json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


def ranks():
    from streaming.base.util import clean_stale_shared_memory
    root = os.path.join(TMP, "clic-mds-check")
    build(root)
    out = tempfile.mkdtemp()
    for phase in ("epochs", "stop", "resume"):
        clean_stale_shared_memory()
        mp.spawn(worker, args=(phase, root, out), nprocs=WORLD)
    r = [load(f"{out}/epochs{k}.json") for k in range(WORLD)]
    for e in range(2):
        flat = sum((sum(r[k][e], []) for k in range(WORLD)), [])
        print(f"epoch {e}: batches per rank {[len(r[k][e]) for k in range(WORLD)]}, samples {len(flat)}, "
              f"distinct {len(set(flat))} of {N}")
    print("epoch orders differ:", all(r[k][0] != r[k][1] for k in range(WORLD)))
    for k in range(WORLD):
        resumed = load(f"{out}/stop{k}.json")["seen"] + load(f"{out}/resume{k}.json")
        print(f"rank {k}: resumed == uninterrupted epoch 0: {resumed == r[k][0]}")


def throughput(images, count, repeats):
    """Seconds to read and decode ``count`` corpus JPEGs: the shard reader vs MosaicML (one process)."""
    from streaming import MDSWriter, StreamingDataset

    from clic.data.corpus import corpus_records
    from clic.data.imageio import decode_bytes
    from clic.data.shard_stream import ShardStream
    from clic.data.shards import ShardIndex, write_shards
    records = corpus_records([images])[:count]
    ours, mds = os.path.join(TMP, "clic-tp-shards"), os.path.join(TMP, "clic-tp-mds")
    for d in (ours, mds):
        shutil.rmtree(d, ignore_errors=True)
    write_shards(records, ours, per_shard=500, progress=False)
    index = ShardIndex.load([ours])
    with MDSWriter(out=mds, columns={"name": "str", "image": "bytes"}, size_limit="64mb") as w:
        for _, data, meta in ShardStream(index, dict, 1, shuffle_buffer=1).samples():
            w.write({"name": meta["name"], "image": data})

    def read_ours():
        for _, data, meta in ShardStream(index, dict, 1, shuffle_buffer=1000).samples():
            decode_bytes(data, meta["name"])

    def read_mds():
        for s in StreamingDataset(local=mds, shuffle=True, batch_size=1):
            decode_bytes(s["image"], s["name"])

    times = {"shard reader": [], "mosaicml": []}
    for _ in range(repeats):  # alternating, so a noisy machine hits both alike
        for name, fn in (("shard reader", read_ours), ("mosaicml", read_mds)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: {count / min(ts):.0f} img/s best, {count / np.median(ts):.0f} median over {repeats}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="../shared/data/unlabeled")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    executes_on_read()
    ranks()
    if os.path.isdir(args.images):
        throughput(args.images, args.count, args.repeats)
