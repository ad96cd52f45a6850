"""Data-path benchmark: decode + both views per image, per method, on ONE core; prints JSON.

For each method's view recipe at ``--size`` px (224 by default, the papers' size):
- ``full_jpeg``: full-size camera JPEGs (``--source`` px long side), decoded
  - ``pillow``: in full by Pillow (the pre-issue path),
  - ``pillow_draft``: by Pillow at the smallest DCT scale that keeps the short side >= 2x size
    (what :func:`clic.data.imageio.load_rgb` does),
  - ``simplejpeg`` / ``turbojpeg``: the same reduced-scale decode by libjpeg-turbo bindings, where
    those packages are installed;
- ``cache_png``: the prepared cache (PNG, short side ``2 x size``, Pillow),
- ``cache_jpeg``: the same cache written as quality-95 JPEG (a candidate cache format);
- ``dali_cpu`` (where ``nvidia-dali`` is installed; not a project dependency): DALI's CPU
  pipeline on one thread, decoding alone, and decoding + MoCo's two crops/flips (no jitter);
- ``augment_on_device``: the loader's half only (decode + crops/flips, uint8 out) when the
  photometric ops run batched on the training device (``pretrain.augment_on: device``);
- ``decode_on_device`` (MoCo v2, CLICv2): the loader's half when the device also decodes
  (``pretrain.decode_on: device``): read the file, its header, draw the boxes;
  ``decode_on_device_cpu_step``: the device half (decode + cut the views, batches of 32) run on
  this CPU with torchvision's decoder, images/s on one core (on CUDA nvJPEG does this part);
- ``photometric_cpu``: the photometric half alone (jitter, grayscale, blur, key noise, normalising
  both views), images/s on one core: PIL ops per image (the loader) against the batched ops
  (``clic/transforms/batch.py``, batches of 64) run on the CPU: what dropping the PIL ops for the
  batched ones would cost a loader core.

Images/s is decode + views for one image on one core (``torch.set_num_threads(1)``), so it is
also the rate one loader worker sustains. Synthetic photo-like images (smooth fields, edges and
sensor noise) are generated; nothing is downloaded.

    python bench/bench_decode.py [--images 48] [--size 224] [--source 3000] [--methods moco clic clicv2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as F

from clic.config import PretrainConfig
from clic.data.imageio import load_rgb, read_encoded, resize_short
from clic.params import load_params, pretrain_config
from clic.pretrain import build_boxes, build_device_views, build_views
from clic.transforms.decode import DeviceDecode, collate_encoded

REPO = Path(__file__).resolve().parents[1]


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields, hard-edged shapes and sensor noise: compresses like a photo."""
    small = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16).copy()
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 20, w // 4), y0 + rng.integers(h // 20, h // 4)
        arr[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    arr += rng.normal(0, 6, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def decoders(short_min: int) -> dict[str, Callable[[Path], Image.Image]]:
    """Every available way to go from a JPEG file to an RGB image with short side >= short_min."""
    out: dict[str, Callable[[Path], Image.Image]] = {
        "pillow": lambda p: load_rgb(p),
        "pillow_draft": lambda p: load_rgb(p, min_size=short_min),
    }
    try:
        import simplejpeg

        def simple(p: Path) -> Image.Image:
            data = p.read_bytes()
            w, h, _, _ = simplejpeg.decode_jpeg_header(data)
            scale = min(w, h) / short_min
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=int(h / scale),
                                                          min_width=int(w / scale)))
        out["simplejpeg"] = simple
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()

        def turbo(p: Path) -> Image.Image:
            data = p.read_bytes()
            w, h, _, _ = tj.decode_header(data)
            factors = sorted(tj.scaling_factors, key=lambda f: f[0] / f[1])
            f = next((f for f in factors if min(w, h) * f[0] / f[1] >= short_min), (1, 1))
            return Image.fromarray(tj.decode(data, scaling_factor=f)[..., ::-1])  # BGR -> RGB
        out["turbojpeg"] = turbo
    except (ImportError, RuntimeError, OSError):  # the package needs the system libturbojpeg
        pass
    return out


def dali_rates(files: list[Path], size: int, repeat: int, batch: int = 16) -> dict[str, float] | None:
    """DALI's CPU pipeline on one thread, where ``nvidia-dali`` is installed (it is not a project
    dependency): images/s of decoding alone; of decoding once and cutting MoCo's two random
    resized crops with flips (the loader's geometry half); of ``image_random_crop`` decoding only
    each crop's region, twice. ``None`` without DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    names = [str(p) for p in files]
    scale = [0.2, 1.0]

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)  # CPU only
    def pipe(mode: str):  # type: ignore[no-untyped-def]
        jpegs, _ = fn.readers.file(files=names, random_shuffle=False)
        if mode == "roi_crops":
            views = [fn.resize(fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                             random_area=scale), size=[size, size])
                     for _ in range(2)]
        else:
            img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            if mode == "decode":
                return img
            views = [fn.random_resized_crop(img, size=[size, size], random_area=scale) for _ in range(2)]
        return tuple(fn.flip(v, horizontal=fn.random.coin_flip()) for v in views)

    out = {}
    for mode in ("decode", "two_crops", "roi_crops"):
        p = pipe(mode)
        p.build()
        p.run()  # warm-up
        steps = max(1, repeat * len(files) // batch)
        start = time.perf_counter()
        for _ in range(steps):
            p.run()
        out[mode] = round(steps * batch / (time.perf_counter() - start), 1)
    return out


def rate(files: list[Path], decode: Callable[[Path], Image.Image], views: Callable | None, repeat: int) -> float:
    """Images/s of decode (+ views) on one core, after one warm-up pass."""
    for p in files[:2]:
        img = decode(p)
        if views is not None:
            views(img)
    start = time.perf_counter()
    for _ in range(repeat):
        for p in files:
            img = decode(p)
            if views is not None:
                views(img)
    return repeat * len(files) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--source", type=int, default=3000, help="long side of the synthetic camera JPEGs")
    ap.add_argument("--methods", nargs="+", default=["moco", "clic", "clicv2"])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    params = load_params(REPO / "params.yaml")
    short = 2 * args.size  # the cache side the loader decodes to (ViewDataset.decode_side)
    result: dict = {"size": args.size, "source": f"{args.source}x{args.source * 3 // 4}", "images": args.images,
                    "cache_short_side": short, "per_core": True, "decode_only": {}, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        full, png, jpg = Path(tmp, "full"), Path(tmp, "png"), Path(tmp, "jpg")
        for d in (full, png, jpg):
            d.mkdir()
        for i in range(args.images):
            img = photo_like(rng, args.source, args.source * 3 // 4)
            img.save(full / f"{i}.jpg", quality=90)
            small = resize_short(img, short)
            small.save(png / f"{i}.png", compress_level=1)
            small.save(jpg / f"{i}.jpg", quality=95)
        sets = {"full_jpeg": sorted(full.iterdir()), "cache_png": sorted(png.iterdir()),
                "cache_jpeg": sorted(jpg.iterdir())}
        result["bytes_per_image"] = {k: int(np.mean([p.stat().st_size for p in v])) for k, v in sets.items()}
        paths = {f"full_jpeg/{name}": (sets["full_jpeg"], fn) for name, fn in decoders(short).items()}
        paths["cache_png/pillow"] = (sets["cache_png"], lambda p: load_rgb(p))
        paths["cache_jpeg/pillow"] = (sets["cache_jpeg"], lambda p: load_rgb(p))
        if "simplejpeg" in decoders(short):
            paths["cache_jpeg/simplejpeg"] = (sets["cache_jpeg"], decoders(short)["simplejpeg"])
        for name, (files, fn) in paths.items():
            if name != "full_jpeg/pillow" or args.images <= 64:
                result["decode_only"][name] = round(rate(files, fn, None, args.repeat), 1)
        for method in args.methods:
            cfg = pretrain_config(params, method)
            cfg = changed(cfg, image_size=args.size)
            views = build_views(cfg)
            geometry = build_views(changed(cfg, augment_on="device"))
            result["methods"][method] = {name: round(rate(files, fn, views, args.repeat), 1)
                                         for name, (files, fn) in paths.items() if name != "full_jpeg/pillow"}
            result["methods"][method]["augment_on_device"] = {  # the loader's half: decode + geometry
                name: round(rate(paths[name][0], paths[name][1], geometry, args.repeat), 1)
                for name in ("full_jpeg/pillow_draft", "cache_png/pillow", "cache_jpeg/pillow")}
            if method == args.methods[0]:
                for name in ("full_jpeg", "cache_jpeg"):
                    dali = dali_rates(sets[name], args.size, args.repeat)
                    if dali is not None:
                        result["decode_only"].setdefault("dali_cpu", {})[name] = dali
            result["methods"][method]["photometric_cpu"] = photometric_cpu(cfg, args.repeat)
            if method != "clic":  # CLIC's mosaics are built in the loader (decode_on: loader only)
                result["methods"][method].update(decode_on_device(cfg, sets, args.repeat))
    print(json.dumps(result, indent=1))


def changed(cfg: PretrainConfig, **update: object) -> PretrainConfig:
    """``cfg`` with ``update`` applied, validated again (the cross-field rules included)."""
    return PretrainConfig.model_validate({**cfg.model_dump(), **update})


def photometric_cpu(cfg: PretrainConfig, repeat: int, n: int = 64) -> dict[str, float]:
    """Images/s on one core of the photometric half of both views: PIL per image vs batched."""
    rng = np.random.default_rng(1)
    crops = [photo_like(rng, cfg.image_size, cfg.image_size) for _ in range(n)]
    views = build_views(cfg)
    if cfg.method == "clicv2":  # jitter on the tensor windows, then normalise
        keys, to_tensor = ("view1", "view2"), lambda x: views.norm(views.photo(F.to_tensor(x)))
    else:  # PIL ops, then the key's finish (tensor, noise, normalise)
        keys, to_tensor = ("query", "key"), lambda x: views.finish["key"](views.photo(x))
    device = build_device_views(changed(cfg, augment_on="device"))
    batch = {k: torch.stack([F.pil_to_tensor(c) for c in crops]) for k in keys}
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(repeat):
        for c in crops:
            to_tensor(c), to_tensor(c)
    pil = repeat * n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeat):
        device(batch, g)
    return {"pil": round(pil, 1), "batched": round(repeat * n / (time.perf_counter() - start), 1)}


def decode_on_device(cfg: PretrainConfig, sets: dict[str, list[Path]], repeat: int) -> dict:
    """Loader half and (CPU-run) device half of ``decode_on: device``, images/s on one core."""
    cfg = changed(cfg, augment_on="device", decode_on="device")
    boxes = build_boxes(cfg)
    decode = DeviceDecode.of(boxes)
    loader: dict[str, float] = {}
    step: dict[str, float] = {}
    for name in ("full_jpeg", "cache_jpeg"):
        files = sets[name]
        start = time.perf_counter()
        for _ in range(repeat):
            items = [boxes(read_encoded(p.read_bytes(), p.name)) for p in files]
        loader[name] = round(repeat * len(files) / (time.perf_counter() - start), 1)
        start = time.perf_counter()
        for _ in range(repeat):
            for k in range(0, len(items), 32):
                decode(collate_encoded([dict(it) for it in items[k:k + 32]]), torch.device("cpu"))
        step[name] = round(repeat * len(files) / (time.perf_counter() - start), 1)
    return {"decode_on_device": loader, "decode_on_device_cpu_step": step}


if __name__ == "__main__":
    main()
