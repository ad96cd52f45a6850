"""Pretraining throughput benchmark; prints JSON (a script, not a test).

For each method at the embedded default size (params.yaml):
- ``engine_images_per_s``: the real pretraining run (data loading, views, engine, checkpoints),
  averaged over the epochs after the first;
- ``bare_images_per_s``: the same model's forward/backward/step on pre-built tensors in memory;
- ``engine_overhead``: 1 - engine / bare (target under 0.10);
- ``views_per_s_per_core``: view-generation throughput of the method's recipe on one core,
  and ``views_margin`` = that / engine images/s (target at least 3).

``--gpu`` instead runs the papers' scale on CUDA with bf16: ResNet-50 CLIC and ViT-B/16 CLICv2
at 224 px on random tensors, reporting images/s and peak memory.

    python bench/bench_pretrain.py [--epochs 3] [--methods moco clic clicv2] [--gpu]
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch
from common import REPO, emit, parser, rate, timed  # this folder's shared helpers (on sys.path)
from torch.utils.data import default_collate

from clic.config import PretrainConfig
from clic.cores import torch_threads
from clic.data.dataset import ViewDataset
from clic.data.prepare import prepare
from clic.data.table import read_table
from clic.engine.train import autocast, train_one_epoch
from clic.params import data_config, from_dict, load_params, pretrain_config, to_dict
from clic.pretrain import build_device_views, build_model, build_optimizer, build_views, run
from clic.transforms.decode import collate_encoded


def model_and_optimizer(cfg: PretrainConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(cfg).to(device).train()
    if cfg.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    return model, build_optimizer(model, cfg, cfg.lr())


def bare_loop(cfg: PretrainConfig, batch: dict[str, torch.Tensor], steps: int, device: torch.device,
              compile_: bool = False) -> float:
    """Images/s of forward + backward + step on fixed tensors (no data, no engine)."""
    model, opt = model_and_optimizer(cfg, device)
    opt_model = torch.compile(model) if compile_ else model

    def step() -> None:
        with autocast(device, cfg.amp):
            loss = opt_model(batch, momentum=0.99)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up steps (three: compilation may recompile once)
        step()
    return rate(next(iter(batch.values())).shape[0], step, steps, device, ndigits=None)


def train_views(cfg: PretrainConfig, data_dir: Path) -> ViewDataset:
    """The loader's half of the method's views over the prepared train split."""
    return ViewDataset(read_table(data_dir, ["train"]), data_dir, build_views(cfg), cfg.seed,
                       encoded=cfg.decode_on == "device")


def view_rate(cfg: PretrainConfig, data_dir: Path, n: int = 200) -> float:
    """Samples/s of the method's view recipe (decode from cache + all views) on one core."""
    ds = train_views(cfg, data_dir)
    n = min(n, len(ds))
    with torch_threads(1):
        return rate(n, lambda: [ds[i] for i in range(n)], ndigits=None)


def cpu_bench(methods: list[str], epochs: int, overrides: list[str] | None = None) -> dict:
    results: dict = {"device": "cpu", "threads": torch.get_num_threads(), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(REPO / "params.yaml", [*(overrides or []), f"data.raw_dir={tmp}/raw",
                                                    f"data.out_dir={tmp}/prepared"])
        data_dir = prepare(data_config(params), seed=0)
        for method in methods:
            cfg = pretrain_config(params, method)
            cfg = from_dict(PretrainConfig, {**to_dict(cfg), "epochs": epochs, "checkpoint_every": 10**6})
            epochs_metrics: list[dict] = []
            run(cfg, data_dir, f"{tmp}/{method}", progress=False,
                on_epoch=lambda e, m, acc=epochs_metrics: acc.append(m))
            engine = sum(m["images_per_s"] for m in epochs_metrics[1:]) / max(len(epochs_metrics) - 1, 1)
            batch = finished_batch(cfg, data_dir)
            bare = bare_loop(cfg, batch, steps=8, device=torch.device("cpu"))
            views = view_rate(cfg, data_dir)
            results["methods"][method] = {
                "backbone": cfg.backbone, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                "engine_images_per_s": round(engine, 1), "bare_images_per_s": round(bare, 1),
                "engine_overhead": round(1 - engine / bare, 3),
                "views_per_s_per_core": round(views, 1), "views_margin": round(views / engine, 2),
            }
    return results


def finished_batch(cfg: PretrainConfig, data_dir: Path) -> dict[str, torch.Tensor]:
    """One batch of the method's finished views (the device half applied where the config has
    one), as the bare loop's fixed input."""
    ds = train_views(cfg, data_dir)
    items = [ds[i] for i in range(cfg.batch_size)]
    batch = collate_encoded(items) if cfg.decode_on == "device" else default_collate(items)
    augment = build_device_views(cfg, torch.device("cpu"))
    if augment is not None:
        batch = augment(batch, torch.Generator().manual_seed(0))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 4}


def engine_rate(cfg: PretrainConfig, batch: dict[str, torch.Tensor], steps: int, device: torch.device,
                sync_every: int) -> float:
    """Images/s of :func:`train_one_epoch` on a device-resident batch: the engine's own cost
    (schedules, loss read-back, metric averaging) against :func:`bare_loop`."""
    model, opt = model_and_optimizer(cfg, device)

    def epoch(n: int) -> None:
        train_one_epoch(model, [batch] * n, opt, 0, n, 0, lambda t: cfg.lr(), lambda t: 0.99, device,
                        amp=cfg.amp, sync_every=sync_every, progress=False)

    epoch(2)  # warm-up
    return rate(steps * next(iter(batch.values())).shape[0], lambda: epoch(steps), device=device)


def gpu_bench(batch_size: int, steps: int, compile_: bool) -> dict:
    """The papers' scale on one GPU: bare loop, the engine reading losses every step (the old
    behaviour) and every 20 steps (the default), and optionally ``torch.compile``."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    out: dict = {"device": torch.cuda.get_device_name(), "amp": "bf16", "runs": {}}
    setups = {
        "clic_resnet50": {"method": "clic", "backbone": "resnet50", "image_size": 224, "channels_last": "on",
                          "moco": {"queue_size": 65536}},
        "clicv2_vit_base": {"method": "clicv2", "backbone": "vit_base", "image_size": 224, "patch_size": 16,
                            "optim": {"name": "adamw", "base_lr": 1.5e-4}},
    }
    for name, raw in setups.items():
        cfg = from_dict(PretrainConfig, {**raw, "batch_size": batch_size, "amp": "bf16"})
        x = torch.randn(batch_size, 3, 224, 224, device=device)
        keys = ("view1", "view2") if cfg.method == "clicv2" else ("query", "key")
        batch = {k: x.clone() for k in keys}
        if cfg.method != "clicv2":  # the queue's same-image exclusion reads the ids
            batch["image_id"] = torch.arange(batch_size, device=device)
        if cfg.channels_last == "on":
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                     for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats()
        run_ = {"batch_size": batch_size, "images_per_s": round(bare_loop(cfg, batch, steps, device), 1),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        for n in (1, 20):
            run_[f"engine_sync_every_{n}"] = engine_rate(cfg, batch, steps, device, n)
        if compile_:
            compiled, seconds = timed(bare_loop, cfg, batch, steps, device, compile_=True)
            run_.update(compiled_images_per_s=round(compiled, 1), compile_s=round(seconds, 1))
        out["runs"][name] = run_
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--methods", nargs="+", default=["moco", "clic", "clicv2"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="--gpu: also time torch.compile")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override params.yaml (CPU runs), e.g. pretrain.augment_on=device")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.gpu:
        emit(gpu_bench(args.batch_size, args.steps, args.compile), indent=2)
    else:
        emit(cpu_bench(args.methods, args.epochs, args.overrides), indent=2)


if __name__ == "__main__":
    main()
