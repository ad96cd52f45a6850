"""Data-path benchmark: decode + both views per image, per method, on ONE core; prints JSON.

For each method's view recipe at ``--size`` px (224 by default, the papers' size), images/s from:
- ``full_jpeg``: camera JPEGs (``--source`` px long side) decoded by Pillow in full (``pillow``),
  at the smallest DCT scale keeping the short side >= 2x size (``pillow_draft``, what
  :func:`clic.data.imageio.load_rgb` does), or so by ``simplejpeg`` / ``turbojpeg`` where installed;
- ``cache_png`` / ``cache_jpeg``: the prepared cache (short side ``2 x size``) as PNG, or as
  quality-95 JPEG (a candidate format);
- ``dali_cpu`` (where ``nvidia-dali`` is installed; not a dependency): DALI's one-thread CPU
  pipeline, decoding alone and decoding + MoCo's two crops/flips (no jitter);
- ``augment_on_device``: the loader's half only (decode + crops/flips, uint8 out) when the
  photometric ops run batched on the device (``pretrain.augment_on: device``);
- ``decode_on_device`` (MoCo v2, CLICv2): the loader's half when the device also decodes (read
  the file, its header, draw the boxes); ``decode_on_device_cpu_step``: the device half (decode +
  cut, batches of 32) on this CPU with torchvision's decoder (on CUDA nvJPEG does this part);
- ``photometric_cpu``: jitter, grayscale, blur, key noise and normalising of both views, PIL per
  image (the loader) against the batched ops of ``clic/transforms/batch.py`` (batches of 64).

Per core (``torch.set_num_threads(1)``), so also the rate one loader worker sustains. The images
are synthetic and photo-like (smooth fields, edges, sensor noise); nothing is downloaded.

    python bench/bench_decode.py [--images 48] [--size 224] [--source 3000] [--methods moco clic clicv2]
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from common import REPO, emit, parser, rate  # this folder's shared helpers (the script's folder is on sys.path)
from PIL import Image
from torchvision.transforms import functional as F

from clic.config import PretrainConfig
from clic.data.imageio import load_rgb, read_encoded, resize_short
from clic.params import load_params, pretrain_config
from clic.pretrain import build_boxes, build_device_views, build_views
from clic.transforms.decode import DeviceDecode, PlanBoxes, collate_encoded, decode_batch


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
    def simple(p: Path) -> Image.Image:
        data = p.read_bytes()
        w, h, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = min(w, h) / short_min
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=int(h / scale),
                                                      min_width=int(w / scale)))

    out: dict[str, Callable[[Path], Image.Image]] = {
        "pillow": load_rgb, "pillow_draft": lambda p: load_rgb(p, min_size=short_min), "simplejpeg": simple}
    with contextlib.suppress(ImportError, RuntimeError, OSError):  # PyTurboJPEG needs the system libturbojpeg
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()

        def turbo(p: Path) -> Image.Image:
            data = p.read_bytes()
            w, h, _, _ = tj.decode_header(data)
            factors = sorted(tj.scaling_factors, key=lambda f: f[0] / f[1])
            f = next((f for f in factors if min(w, h) * f[0] / f[1] >= short_min), (1, 1))
            return Image.fromarray(tj.decode(data, scaling_factor=f)[..., ::-1])  # BGR -> RGB
        out["turbojpeg"] = turbo
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
        out[mode] = rate(batch, p.run, max(1, repeat * len(files) // batch))
    return out


def path_rate(files: list[Path], decode: Callable[[Path], Image.Image], views: Callable | None, repeat: int) -> float:
    """Images/s of decode (+ views) on one core, after a warm-up on two images."""
    def each(paths: list[Path]) -> None:
        for p in paths:
            img = decode(p)
            if views is not None:
                views(img)

    each(files[:2])
    return rate(len(files), lambda: each(files), repeat)


def device_decode_rates(boxes: PlanBoxes, files: list[Path], device: torch.device, batch: int, repeat: int = 1,
                        decode_only: bool = False) -> dict[str, float]:
    """``decode_on: device`` in images/s: ``loader``, the loader's half on one core (read the file,
    its header, draw the boxes); ``cut``, the device decoding batches and cutting the views from
    them (after one warm-up batch); ``decode`` (with ``decode_only``), the device decoding alone."""
    def encode() -> list[dict]:
        return [boxes(read_encoded(p.read_bytes(), p.name)) for p in files]

    out = {"loader": rate(len(files), encode, repeat)}
    items = encode()
    batches = [collate_encoded([dict(it) for it in items[k:k + batch]]) for k in range(0, len(items), batch)]
    decode = DeviceDecode.of(boxes)
    decode(batches[0], device)  # warm-up
    out["cut"] = rate(len(files), lambda: [decode(b, device) for b in batches], repeat, device)
    if decode_only:
        out["decode"] = rate(len(files), lambda: [decode_batch(b["encoded"], list(b["plan"]["name"]), device)
                                                  for b in batches], repeat, device)
    return out


def main() -> None:
    ap = parser(__doc__)
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
        found = decoders(short)
        paths = {f"full_jpeg/{name}": (sets["full_jpeg"], fn) for name, fn in found.items()}
        paths["cache_png/pillow"] = (sets["cache_png"], load_rgb)
        paths["cache_jpeg/pillow"] = (sets["cache_jpeg"], load_rgb)
        paths["cache_jpeg/simplejpeg"] = (sets["cache_jpeg"], found["simplejpeg"])
        for name, (files, fn) in paths.items():
            if name != "full_jpeg/pillow" or args.images <= 64:
                result["decode_only"][name] = path_rate(files, fn, None, args.repeat)
        for name in ("full_jpeg", "cache_jpeg"):
            dali = dali_rates(sets[name], args.size, args.repeat)
            if dali is not None:
                result["decode_only"].setdefault("dali_cpu", {})[name] = dali
        for method in args.methods:
            cfg = changed(pretrain_config(params, method), image_size=args.size)
            views = build_views(cfg)
            geometry = build_views(changed(cfg, augment_on="device"))
            row: dict = {name: path_rate(files, fn, views, args.repeat) for name, (files, fn) in paths.items()
                   if name != "full_jpeg/pillow"}
            row["augment_on_device"] = {  # the loader's half: decode + geometry
                name: path_rate(*paths[name], geometry, args.repeat)
                for name in ("full_jpeg/pillow_draft", "cache_png/pillow", "cache_jpeg/pillow")}
            row["photometric_cpu"] = photometric_cpu(cfg, args.repeat)
            if method != "clic":  # CLIC's mosaics are built in the loader (decode_on: loader only)
                boxes = build_boxes(changed(cfg, augment_on="device", decode_on="device"))
                rates = {name: device_decode_rates(boxes, sets[name], torch.device("cpu"), 32, args.repeat)
                         for name in ("full_jpeg", "cache_jpeg")}
                row["decode_on_device"] = {name: r["loader"] for name, r in rates.items()}
                row["decode_on_device_cpu_step"] = {name: r["cut"] for name, r in rates.items()}
            result["methods"][method] = row
    emit(result)


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
    return {"pil": rate(n, lambda: [(to_tensor(c), to_tensor(c)) for c in crops], repeat),
            "batched": rate(n, lambda: device(batch, g), repeat)}


if __name__ == "__main__":
    main()
