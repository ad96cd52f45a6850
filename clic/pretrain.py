"""Pretraining entry point: config -> data, views, model, optimiser -> epochs with resumable checkpoints.

``DIR/checkpoint.pt``: everything needed to continue (model, optimiser, queue, RNG states, epoch and
step, resolved config, git revision), written atomically every ``checkpoint_every`` steps and at
each epoch's end. ``DIR/encoder.pt``: the final online backbone with its config, for embedding and
probing. ``DIR/metrics.jsonl``: one JSON line of averaged metrics per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from clic import atomic, methods
from clic import distributed as dist
from clic.config import PretrainConfig
from clic.cores import usable_cores
from clic.data.corpus import CORPUS_DIR, corpus_records
from clic.data.dataset import EpochBatches, ViewDataset
from clic.data.shards import is_shard_index
from clic.data.table import Record, read_table
from clic.engine import checkpoint as ckpt
from clic.engine.schedule import cosine_lr, cosine_momentum
from clic.engine.train import NonFiniteLossError, train_one_epoch
from clic.models.backbones import ResNetBackbone, ViTBackbone, build_backbone
from clic.params import to_dict
from clic.transforms.batch import DeviceViews
from clic.transforms.decode import DecodeThenViews, DeviceDecode, PlanBoxes, collate_encoded

log = logging.getLogger(__name__)


def build_views(cfg: PretrainConfig) -> Callable:
    """The loader's half of the method's views: all of them, or geometry only when
    ``augment_on: device`` (then :func:`build_device_views` finishes them)."""
    if cfg.decode_on == "device":  # crop boxes only: the device decodes and cuts (DeviceDecode)
        return build_boxes(cfg)
    return methods.get(cfg.method).views(cfg, photometric=cfg.augment_on == "loader")


def build_boxes(cfg: PretrainConfig) -> PlanBoxes:
    """The loader's half with ``decode_on: device``: the plan of the method's views."""
    return PlanBoxes(methods.get(cfg.method).plan(cfg))


def build_device_views(cfg: PretrainConfig, device: torch.device | None = None) -> DeviceViews | DecodeThenViews | None:
    """The batched photometric half of the views (``augment_on: device``), preceded by decoding
    and cutting the views on ``device`` with ``decode_on: device``; else None."""
    if cfg.augment_on == "loader":
        return None
    views = methods.get(cfg.method).device_views(cfg)
    if cfg.decode_on == "loader":
        return views
    return DecodeThenViews(DeviceDecode.of(build_boxes(cfg)), views, device or torch.device("cpu"))


def build_model(cfg: PretrainConfig) -> nn.Module:
    backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth, cfg.pool)
    return methods.get(cfg.method).model(cfg, backbone)


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters exempt from weight decay as timm's ``param_groups_weight_decay``
    exempts them: the 1-D ones (biases, norms, CLICv2's mask token) and those a timm module names
    in its ``no_weight_decay()`` (a ViT's position embedding and class token)."""
    named = {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
             if callable(getattr(m, "no_weight_decay", None)) for n in m.no_weight_decay()}
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n in named}


def build_optimizer(model: nn.Module, cfg: PretrainConfig, lr: float) -> torch.optim.Optimizer:
    """Weight decay on every parameter (MoCo v2, the CLIC code), or with ``optim.decay_all: false``
    none on :func:`no_weight_decay`'s (timm's ``param_groups_weight_decay``)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    spared = set() if cfg.optim.decay_all else no_weight_decay(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if n in spared else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels: one launch per step instead of one per parameter (CUDA only)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, **fused)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, **fused)


def intra_op_threads(cfg: PretrainConfig, nprocs: int = 1) -> int:
    """Threads for one training process: ``cfg.threads``, else the cores this process may use
    shared by the node's ``nprocs`` training processes (two processes that each take every core
    ran 5x slower here). The loader workers' cores are not subtracted: the views need 1/4 to 1/8
    of the training time (``views_margin`` in bench/bench_pretrain.py), so workers idle most of
    the time, and giving MoCo 1 thread of 2 beside 2 workers cost 38% (101 -> 63 img/s).
    Set ``threads`` on nodes where the loader is the bottleneck."""
    if cfg.threads:
        return cfg.threads
    return max(1, usable_cores() // max(nprocs, 1))


def pick_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``), else CUDA when there is one; ``cuda`` without an
    index is this process's local rank (``torch.cuda.set_device`` refuses an index-less device)."""
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device("cuda", dist.local_rank()) if dev.type == "cuda" and dev.index is None else dev


def encoder_payload(model: nn.Module, cfg: PretrainConfig) -> dict[str, Any]:
    bb: ResNetBackbone | ViTBackbone = model.backbone  # type: ignore[assignment]
    return {"kind": "clic-encoder", "backbone": {k: v.detach().cpu() for k, v in bb.state_dict().items()},
            "feature_dim": int(bb.feature_dim), "config": to_dict(cfg), "git": ckpt.git_revision()}


# what a pretraining folder holds (one written before folders were marked is recognised by these names
# and its metrics.jsonl; DVC writes a .gitignore beside the outputs of a stage in a git repository)
PRETRAIN_NAMES = ("checkpoint.pt", "checkpoint.stale.pt", "encoder.pt", "metrics.jsonl", ".gitignore")


def run(cfg: PretrainConfig, data_dir: str | Path, out_dir: str | Path, device: str | None = None,
        progress: bool = True, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        code_version: str = "", corpus_dir: str | Path = CORPUS_DIR) -> Path:
    """Pretrain (or resume) into ``out_dir``; returns the path of ``encoder.pt``.

    The images are the corpus ``cfg.data`` when it is set (archives extracted under
    ``corpus_dir``), else the splits ``cfg.splits`` of the prepared dataset ``data_dir``.

    ``code_version``: when given, a checkpoint is resumed only if it was written by the same code
    version (the pipeline passes a hash of the package source, so a changed loss retrains).
    """
    out = Path(out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # before any work: a folder of the user's is refused whole
        atomic.check_output(out, [data_dir, *cfg.data], PRETRAIN_NAMES, proof=("metrics.jsonl", "epoch"))
        atomic.mark(out, "clic pretrain")
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed = dist.init_from_env(dev)
    rank, world = dist.rank(), dist.world_size()
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    loader, feed, n_images = build_loader(cfg, data_dir, corpus_dir, rank, world, pin_memory=dev.type == "cuda")

    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(intra_op_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    model = build_model(cfg).to(dev)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and dev.type == "cuda"
                                                   and not cfg.backbone.startswith("vit"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr(world)
    optimizer = build_optimizer(model, cfg, lr)
    resolved = to_dict(cfg)

    start_epoch, start_step = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if dist.is_main():
        ckpt.remove_leftovers(ckpt_path)  # temporaries of a run killed while saving
    if ckpt_path.is_file():
        state = ckpt.load(ckpt_path, dev)
        if (_without_epochs(state.get("config", {})) != _without_epochs(resolved)
                or (code_version and state.get("code_version", "") != code_version)):
            stale = ckpt_path.with_name("checkpoint.stale.pt")
            if dist.is_main():
                log.warning("%s was written with a different config or code; moving it to %s and starting over",
                            ckpt_path, stale)
                os.replace(ckpt_path, stale)
            dist.barrier()
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, start_step = int(state["epoch"]), int(state["step"])
            ckpt.set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            log.info("resuming from %s at epoch %d step %d", ckpt_path, start_epoch, start_step)

    train_model: nn.Module = model
    if distributed:
        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:  # checkpoints keep saving ``model``: the compiled wrapper shares its parameters
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    def save(epoch: int, step: int) -> None:
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # a finite loss can still leave inf/nan weights behind: never checkpoint them
            raise NonFiniteLossError(f"parameters became non-finite before epoch {epoch} step {step} "
                                     f"({', '.join(bad[:3])}); stopping, {ckpt_path} keeps the last good state")
        rngs = _gather_rng()
        if dist.is_main():
            ckpt.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                              "step": step, "rng": rngs, "config": resolved, "git": ckpt.git_revision(),
                              "world_size": world, "code_version": code_version}, ckpt_path)
        dist.barrier()

    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if (start_epoch, start_step) == (0, 0):  # a fresh start: no metrics of an earlier run
            (out / "metrics.jsonl").unlink(missing_ok=True)
        log.info("pretraining %s (%s, %d px) on %d images: %d epochs x %d steps, lr %.4g, %d process(es), %s",
                 cfg.method, cfg.backbone, cfg.image_size, n_images, cfg.epochs, feed.steps_per_epoch, lr, world, dev)
    augment = build_device_views(cfg, dev)  # None unless augment_on: device
    for epoch in range(start_epoch, cfg.epochs):
        skip = start_step if epoch == start_epoch else 0
        feed.set_epoch(epoch, skip=skip)
        metrics = train_one_epoch(
            train_model, loader, optimizer, epoch, feed.steps_per_epoch, skip,
            lr_at=lambda t: cosine_lr(t, lr, cfg.epochs, cfg.optim.warmup_epochs, cfg.optim.min_lr_ratio),
            momentum_at=momentum_schedule(cfg), device=dev, amp=cfg.amp, clip_grad=cfg.optim.clip_grad,
            channels_last=channels_last, on_checkpoint=save, checkpoint_every=cfg.checkpoint_every,
            sync_every=cfg.sync_every, augment=augment, augment_seed=cfg.seed + 7919 * rank,
            progress=progress and dist.is_main())
        metrics = {k: dist.all_reduce_mean(v, dev) for k, v in metrics.items()}
        metrics["images_per_s"] *= world
        save(epoch + 1, 0)
        if dist.is_main():
            with (out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    encoder = out / "encoder.pt"
    if dist.is_main():
        ckpt.save_atomic(encoder_payload(model, cfg), encoder)
    dist.barrier()
    return encoder


def build_loader(cfg: PretrainConfig, data_dir: str | Path, corpus_dir: str | Path, rank: int, world: int,
                 pin_memory: bool) -> tuple[DataLoader, Any, int]:
    """The training loader, what sets its epoch (``set_epoch(epoch, skip)``, ``steps_per_epoch``)
    and the number of images: shards streamed when ``cfg.data`` names shard indexes, else the
    records of a corpus or prepared dataset."""
    # the loader has its own generator so that iterating it never draws from the global RNG (exact
    # resumption); encoded images (decode_on: device) differ in length
    common: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": pin_memory,
                              "prefetch_factor": 4 if cfg.num_workers else None,
                              "collate_fn": collate_encoded if cfg.decode_on == "device" else None,
                              "generator": torch.Generator().manual_seed(cfg.seed)}
    method = methods.get(cfg.method)
    if any(is_shard_index(entry) for entry in cfg.data):
        method.check_images(cfg, None, sharded=True)  # before the stream is opened (and, remote, fetched)
        stream = shard_stream(cfg, corpus_dir)
        method.check_images(cfg, stream.num_samples, sharded=True)
        # workers start afresh each epoch and copy the stream's epoch and skip
        return DataLoader(stream, batch_size=cfg.batch_size, drop_last=True, **common), stream, stream.num_samples
    records = pretraining_records(cfg, data_dir, corpus_dir)
    extra, per_image = method.extra_images(cfg, records, data_dir)
    dataset = ViewDataset(records, data_dir, build_views(cfg), cfg.seed, extra, per_image,
                          decode_side=2 * cfg.image_size, encoded=cfg.decode_on == "device")
    method.check_images(cfg, len(records), sharded=False)
    batches = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, rank, world)
    # workers persist across epochs (the sampler hands out (epoch, index) keys)
    loader = DataLoader(dataset, batch_sampler=batches, persistent_workers=cfg.num_workers > 0, **common)
    return loader, batches, len(dataset)


def shard_stream(cfg: PretrainConfig, corpus_dir: str | Path) -> Any:
    """The sharded corpora of ``cfg.data`` streamed as this rank's part of each epoch
    (:class:`clic.data.shard_stream.ShardStream`; remote ones cached under ``corpus_dir``)."""
    mixed = [f"pretrain.data[{i}]" for i, entry in enumerate(cfg.data) if not is_shard_index(entry)]
    if mixed:
        raise ValueError(f"{', '.join(mixed)}: not a sharded corpus, and shards cannot be mixed with folders, "
                         "archives or prepared datasets; shard those too (clic data shard) and list every folder")
    if cfg.max_images:
        raise ValueError(f"pretrain.max_images={cfg.max_images} does not apply to shards (pretrain.data); set it to "
                         "0, or shard fewer images")
    from clic.data.shard_stream import ShardStream  # MosaicML streaming: only sharded corpora need it
    return ShardStream(cfg.data, corpus_dir, build_views(cfg), cfg.batch_size, cfg.seed,
                       decode_side=2 * cfg.image_size, encoded=cfg.decode_on == "device",
                       cache_limit=cfg.shard_cache or None)


def pretraining_records(cfg: PretrainConfig, data_dir: str | Path, corpus_dir: str | Path = CORPUS_DIR) -> list[Record]:
    """The corpus ``cfg.data`` (``max_images`` of it evenly spread over the sorted listing, so
    every source folder contributes), else the first ``max_images`` of the prepared ``splits``."""
    if not cfg.data:
        records = read_table(data_dir, cfg.splits)
        return records[: cfg.max_images] if cfg.max_images else records
    records = corpus_records(cfg.data, corpus_dir)
    if cfg.max_images and cfg.max_images < len(records):
        records = [records[i * len(records) // cfg.max_images] for i in range(cfg.max_images)]
    log.info("pretraining corpus: %d images from %s", len(records), ", ".join(cfg.data))
    return records


def momentum_schedule(cfg: PretrainConfig) -> Callable[[float], float]:
    """The key encoder's momentum at fractional epoch ``t``: constant (MoCo v2, CLIC) or rising to
    1 on a cosine (MoCo v3; ``momentum_schedule`` of the method's moco/clicv2 section)."""
    sec = methods.get(cfg.method).momentum(cfg)
    if sec.momentum_schedule == "constant":
        return lambda t: sec.momentum
    return lambda t: cosine_momentum(t, sec.momentum, cfg.epochs)


def _without_epochs(config: dict[str, Any]) -> dict[str, Any]:
    """Settings that must match to resume (epochs may grow; workers, threads and the host-sync
    cadence do not change what is trained; compilation changes only rounding and the key
    shuffle's random stream)."""
    return {k: v for k, v in config.items()
            if k not in ("epochs", "num_workers", "checkpoint_every", "sync_every", "threads", "compile",
                         "shard_cache")}


def _gather_rng() -> list[dict[str, Any]] | dict[str, Any]:
    """Every rank's RNG state (list indexed by rank under DDP)."""
    state = ckpt.rng_state()
    if dist.world_size() == 1:
        return state
    gathered: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered
