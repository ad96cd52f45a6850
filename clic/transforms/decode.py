"""Decoding on the training device (``pretrain.decode_on: device``): the loader reads the file's
bytes and draws the method's plan (:mod:`clic.transforms.plan`) from the header; the device decodes
the batch (nvJPEG through ``torchvision.io.decode_jpeg`` on CUDA, libjpeg-turbo on CPU) and cuts
the views, so a loader worker does no pixel work (for nodes with few cores per GPU).

Views are resized with antialiased bilinear interpolation as Pillow does. Differences from the
loader's path: boxes are drawn on the full-size image (not a reduced-scale DCT decode), torch's
resampling is within a few grey levels of Pillow's, nvJPEG's pixels differ a little from libjpeg's.
EXIF orientation is applied after decoding (the CUDA decoder ignores it). A file that is not an RGB
or grey JPEG (PNG, CMYK) is decoded in the loader and shipped as pixels; a JPEG that fails to
decode is logged and replaced by another image of the batch. Only crops and flips are cut here
(MoCo v2, CLICv2): CLIC's mosaics and rotated keys stay in the loader.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as nnf
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from clic.data.imageio import Encoded, ImageError, orient
from clic.transforms.batch import DeviceViews
from clic.transforms.plan import MocoPlan, ShiftPlan, shifted_windows

log = logging.getLogger(__name__)

PLAN = "plan"  # the batch key of what the device half needs on the host (boxes, flips, shifts, names)


class PlanBoxes:
    """The loader's half: the method's plan (:mod:`clic.transforms.plan`) drawn on the image's
    displayed size from its header, shipped with the file's bytes for :class:`DeviceDecode`."""

    def __init__(self, plan: MocoPlan | ShiftPlan) -> None:
        self.plan = plan  # a MoCo plan without key rotation (the moco method's config rule)

    def __call__(self, enc: Encoded) -> dict[str, Any]:
        if isinstance(self.plan, ShiftPlan):  # CLICv2: one canvas per image and the shift the model reads
            cut, shift = self.plan.draw(enc.width, enc.height)
            cuts, extra = [cut], {"shift": torch.tensor(shift, dtype=torch.long)}
        else:
            cuts, shift, extra = list(self.plan.draw(enc.width, enc.height).values()), (0, 0), {}
        return {"encoded": enc.data, **extra,
                PLAN: {"boxes": torch.tensor([c.box for c in cuts], dtype=torch.long),
                       "flips": torch.tensor([(c.hflip, c.vflip) for c in cuts], dtype=torch.bool),
                       "shift": torch.tensor(shift, dtype=torch.long),
                       "orientation": torch.tensor(enc.orientation, dtype=torch.long),
                       "name": enc.name}}


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` except the encoded images, which differ in length: kept as a list."""
    encoded = [item.pop("encoded") for item in items]
    batch = default_collate(items)
    batch["encoded"] = encoded
    return batch


def crop_resize(img: torch.Tensor, box: Sequence[int], size: int, hflip: bool = False,
                vflip: bool = False) -> torch.Tensor:
    """(3, size, size) uint8 of ``img`` (3, H, W) uint8 cropped to ``box`` (top, left, h, w),
    antialiased bilinear as Pillow's resize, then flipped."""
    top, left, h, w = box
    x = img[:, top:top + h, left:left + w].float()[None]
    if (h, w) != (size, size):
        x = nnf.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x[0].round_().clamp_(0, 255).to(torch.uint8)
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    return x


def _decode_jpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decoding (nvJPEG on CUDA), RGB, as stored: the CUDA decoder
    ignores ``apply_exif_orientation``, so orientation is applied by the caller on every device.
    torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they work and are
    what this torch build ships, so the notice is silenced here, where the call is made."""
    if device.type == "cuda" and device.index is None:  # the batched decoder wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision are deprecated")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_batch(encoded: list[torch.Tensor], names: list[str], device: torch.device,
                 orientations: list[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """(3, H, W) uint8 images on ``device`` as displayed (JPEG bytes decoded there in one call and
    turned by their EXIF ``orientations``; pixels moved), and for each slot the index of the image
    it holds. A JPEG that fails to decode is logged by name and its slot takes the nearest image of
    the batch that decoded (an error when none did)."""
    jpegs = [i for i, e in enumerate(encoded) if e.dim() == 1]
    out: list[torch.Tensor | None] = [e.to(device, non_blocking=True) if e.dim() == 3 else None for e in encoded]
    if jpegs:
        try:
            decoded = _decode_jpeg([encoded[i] for i in jpegs], device)
            for i, img in zip(jpegs, decoded, strict=True):
                out[i] = img
        except RuntimeError:  # one bad file fails the batched call: find it
            for i in jpegs:
                try:
                    out[i] = _decode_jpeg([encoded[i]], device)[0]
                except RuntimeError as exc:
                    log.warning("skipping unreadable image %s: %s", names[i], exc)
        for i in jpegs:
            if out[i] is not None and orientations is not None and orientations[i] != 1:
                out[i] = orient(out[i], orientations[i])  # type: ignore[arg-type]
    good = [i for i, img in enumerate(out) if img is not None]
    if not good:
        raise ImageError(f"no image of the batch could be decoded ({', '.join(names[:3])}, ...)")
    source = [i if img is not None else min(good, key=lambda g: abs(g - i)) for i, img in enumerate(out)]
    return [out[j] for j in source], source  # type: ignore[misc]


class DecodeThenViews:
    """``augment(batch, generator)`` of the engine for ``decode_on: device``: :class:`DeviceDecode`
    on ``device``, then the photometric half (:class:`clic.transforms.batch.DeviceViews`)."""

    def __init__(self, decode: DeviceDecode, views: DeviceViews, device: torch.device) -> None:
        self.decode, self.views, self.device = decode, views, device

    def __call__(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, Any]:
        return self.views(self.decode(batch, self.device), g)


class DeviceDecode:
    """The device half: decode the batch, cut each view (uint8, (B, 3, size, size)) from its box.
    ``patch``: CLICv2, one canvas of side ``size + patch`` per image, the two views its windows
    at the origin and at the drawn shift."""

    def __init__(self, views: tuple[str, ...], size: int, patch: int | None = None) -> None:
        self.views, self.size, self.patch = views, size, patch

    @classmethod
    def of(cls, boxes: PlanBoxes) -> DeviceDecode:
        """The device half matching a loader half."""
        return cls(boxes.plan.views, boxes.plan.size, boxes.plan.patch)

    def __call__(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        plan = batch[PLAN]
        images, source = decode_batch(batch["encoded"], list(plan["name"]), device, plan["orientation"].tolist())
        # a slot that took another image's pixels takes its boxes, shift and ids too
        boxes, flips, shifts = (plan[k][source].tolist() for k in ("boxes", "flips", "shift"))
        out = {k: v for k, v in batch.items() if k not in ("encoded", PLAN)}
        if source != list(range(len(source))):
            out = {k: v[torch.tensor(source, device=v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1
                   and v.shape[0] == len(source) else v for k, v in out.items()}
        cut: list[Sequence[torch.Tensor]]  # per image, its views
        if self.patch is None:
            cut = [[crop_resize(img, boxes[i][v], self.size, *flips[i][v]) for v in range(len(self.views))]
                   for i, img in enumerate(images)]
        else:  # one canvas per image, its two windows
            cut = [shifted_windows(crop_resize(img, boxes[i][0], self.size + self.patch, flips[i][0][0]), self.size,
                                   *shifts[i]) for i, img in enumerate(images)]
        for v, key in enumerate(self.views):
            out[key] = torch.stack([views[v] for views in cut])  # (B, 3, size, size) uint8
        return out
