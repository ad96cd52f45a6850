"""Does a kept streaming library give what the hand-made shard reader (clic/data/shard_stream.py)
was written for? litdata against its guarantees: every rank the same number of steps, each sample
exactly once per epoch over ranks x loader workers, another order each epoch, and a loader resumed
at a step (its state_dict) giving the uninterrupted remainder. Two gloo ranks on the CPU.

    pip install --no-deps --target /tmp/ldlib litdata==0.2.76 lightning-utilities boto3 botocore jmespath s3transfer
    PYTHONPATH=/tmp/ldlib python bench/streaming_libs.py

Measured (litdata 0.2.76, 48 samples in chunks of 7, batch 4, 2 ranks x 2 workers): 6 and 6
batches per rank, 48 distinct samples each epoch, the epochs' orders differ, and the resumed epoch
equals the uninterrupted one on both ranks: the reason given for the hand-made reader does not
hold. Not measured yet: throughput against the shard reader, object-store URLs, MosaicML streaming.

The case it fails: a chunk folder's index.json names each field's serializer (``data_format``) and
the reader obeys it; ``pickle`` (and ``graph:pickle``) run ``pickle.loads`` on the chunk's bytes,
so reading a corpus someone else wrote runs their code (``executed on read: True`` below, a
``print`` call smuggled into a sample). Adopting litdata needs an allow-list of the index's
formats, checked on the copy the reader then uses, before any sample is read.
"""
import json
import os
import tempfile

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

N, BATCH, WORKERS, WORLD = 48, 4, 2, 2
ROOT = os.path.join(tempfile.gettempdir(), "clic-litdata-check")


def item(i):
    return {"id": i, "image": np.full((4, 4, 3), i % 255, np.uint8).tobytes()}


def build():
    import litdata
    if not os.path.isdir(ROOT):
        litdata.optimize(fn=item, inputs=list(range(N)), output_dir=ROOT, chunk_size=7, num_workers=1, mode="overwrite")


def ids(batch):
    return batch["id"].tolist()


def worker(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from litdata import StreamingDataLoader, StreamingDataset
    res = {}
    ds = StreamingDataset(ROOT, shuffle=True, drop_last=True, seed=5)
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, drop_last=True)
    res["epochs"] = [[ids(b) for b in dl] for _ in range(2)]
    # resume: stop after 3 batches of epoch 0, resume in a fresh loader
    ds = StreamingDataset(ROOT, shuffle=True, drop_last=True, seed=5)
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, drop_last=True)
    seen, state = [], None
    for i, b in enumerate(dl):
        seen.append(ids(b))
        if i == 2:
            state = dl.state_dict()
            break
    ds2 = StreamingDataset(ROOT, shuffle=True, drop_last=True, seed=5)
    dl2 = StreamingDataLoader(ds2, batch_size=BATCH, num_workers=WORKERS, drop_last=True)
    dl2.load_state_dict(state)
    rest = [ids(b) for b in dl2]
    res["resumed"] = seen + rest
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()


class Smuggled:
    """A sample whose unpickling calls a function of the writer's choosing (here: print)."""

    def __reduce__(self):
        return (print, ("executed on read: True",))


def smuggled(i):
    return {"x": Smuggled()}


def executes_on_read():
    """A corpus written with an arbitrary object: the reader unpickles it, calling the writer's code."""
    import litdata
    root = os.path.join(tempfile.gettempdir(), "clic-litdata-pickle")
    litdata.optimize(fn=smuggled, inputs=[0], output_dir=root, chunk_size=1,
                     num_workers=1, mode="overwrite")
    with open(os.path.join(root, "index.json")) as fh:
        print("index data_format:", json.load(fh)["config"]["data_format"])
    litdata.StreamingDataset(root)[0]


if __name__ == "__main__":
    executes_on_read()
    build()
    out = tempfile.mkdtemp()
    mp.spawn(worker, args=(out,), nprocs=WORLD)
    r = []
    for k in range(WORLD):
        with open(f"{out}/rank{k}.json") as fh:
            r.append(json.load(fh))
    for e in range(2):
        per = [sum(r[k]["epochs"][e], []) for k in range(WORLD)]
        flat = sum(per, [])
        print(f"epoch {e}: batches per rank {[len(r[k]['epochs'][e]) for k in range(WORLD)]}, samples {len(flat)}, "
              f"distinct {len(set(flat))} of {N}")
    same_order = all(r[k]["epochs"][0] != r[k]["epochs"][1] for k in range(WORLD))
    print("epoch orders differ:", same_order)
    for k in range(WORLD):
        print(f"rank {k}: resumed == uninterrupted epoch 0: {r[k]['resumed'] == r[k]['epochs'][0]}",
              len(r[k]['resumed']), len(r[k]['epochs'][0]))
