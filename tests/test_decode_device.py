"""``decode_on: device``: the loader hands on file bytes and crop boxes, the training device
decodes and cuts the views (here torchvision's CPU decoder, through the same code as nvJPEG)."""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic.config import MocoViewConfig, ParamError, PretrainConfig, ShiftConfig
from clic.data.dataset import ViewDataset
from clic.data.imageio import ImageError, load_rgb, read_encoded
from clic.data.table import Record
from clic.params import from_dict
from clic.pretrain import run
from clic.transforms.decode import DeviceDecode, PlanBoxes, collate_encoded, decode_batch
from clic.transforms.moco import MocoViews
from clic.transforms.plan import MocoPlan, ShiftPlan
from clic.transforms.shifted import ShiftedPatchViews

from .conftest import tiny_overrides

CPU = torch.device("cpu")


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8, smooth enough that resampling differences stay small, varied enough that
    a misplaced crop does not."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    f = rng.uniform(2, 6, size=(3, 2))
    ch = [127 + 120 * np.sin(f[c, 0] * 3.1 * x + f[c, 1] * 2.3 * y + c) for c in range(3)]
    return np.clip(np.stack(ch, -1), 0, 255).astype(np.uint8)


def _files(folder: Path) -> list[Record]:
    folder.mkdir(exist_ok=True)
    records = []
    for i, (w, h, fmt) in enumerate([(96, 72, "JPEG"), (80, 112, "JPEG"), (90, 70, "PNG"), (100, 60, "EXIF")]):
        name = f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        img = Image.fromarray(_photo(w, h, i))
        if fmt == "EXIF":  # stored sideways, displayed turned a quarter (orientation 6)
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(folder / name, quality=95, exif=exif)
        else:
            img.save(folder / name, **({"quality": 95} if fmt == "JPEG" else {}))
        records.append(Record(name=name, path=name, score=None, split="train"))
    return records


def _device_views(records: list[Record], root: Path, boxes: PlanBoxes) -> dict[str, torch.Tensor]:
    ds = ViewDataset(records, root, boxes, seed=5, encoded=True)
    batch = collate_encoded([ds[(2, i)] for i in range(len(records))])
    assert [e.dim() for e in batch["encoded"]] == [1, 1, 3, 1]  # JPEG bytes; the PNG decoded in the loader
    return DeviceDecode.of(boxes)(batch, CPU)


def _loader_views(records: list[Record], root: Path, views: object) -> list[dict[str, torch.Tensor]]:
    ds = ViewDataset(records, root, views, seed=5)  # type: ignore[arg-type]
    return [ds[(2, i)] for i in range(len(records))]


def _close(device: torch.Tensor, loader: torch.Tensor) -> float:
    assert device.dtype == loader.dtype == torch.uint8 and device.shape == loader.shape
    return float((device.float() - loader.float()).abs().mean())


def test_moco_views_cut_on_the_device_match_the_loader_geometry(tmp_path: Path) -> None:
    """One plan cut by both halves (boxes, horizontal flips, the key's vertical flip): the same
    pixels up to resampling (Pillow vs torch, < 2 grey levels on average), while views of
    different images or draws are tens of levels apart."""
    records = _files(tmp_path / "img")
    cfg = MocoViewConfig(key_vflip_p=0.5)
    got = _device_views(records, tmp_path / "img", PlanBoxes(MocoPlan(32, cfg)))
    want = _loader_views(records, tmp_path / "img", MocoViews(32, cfg, photometric_ops=False))
    for key in ("query", "key"):
        assert got[key].shape == (4, 3, 32, 32)
        for i in range(4):
            assert _close(got[key][i], want[i][key]) < 2.0, (key, i)
    assert _close(got["query"][0], got["key"][0]) > 10  # two draws of one image differ
    assert _close(got["query"][0], want[1]["query"]) > 10


def test_clicv2_shifted_views_cut_on_the_device_match_the_loader(tmp_path: Path) -> None:
    records = _files(tmp_path / "img")
    cfg = ShiftConfig()
    got = _device_views(records, tmp_path / "img", PlanBoxes(ShiftPlan(32, 8, cfg)))
    want = _loader_views(records, tmp_path / "img", ShiftedPatchViews(32, 8, cfg, photometric_ops=False))
    assert torch.equal(got["shift"], torch.stack([w["shift"] for w in want]))
    assert bool((got["shift"] != 0).any())
    for key in ("view1", "view2"):
        for i in range(4):
            assert _close(got[key][i], want[i][key]) < 2.0, (key, i)


def test_exif_orientation_and_sizes_come_from_the_header(tmp_path: Path) -> None:
    records = _files(tmp_path / "img")
    enc = read_encoded((tmp_path / "img" / records[3].path).read_bytes(), "sideways.jpg")
    assert (enc.width, enc.height, enc.data.dim()) == (60, 100, 1)  # saved 100x60, displayed turned
    png = read_encoded((tmp_path / "img" / records[2].path).read_bytes(), "flat.png")
    assert (png.width, png.height, tuple(png.data.shape)) == (90, 70, (3, 70, 90))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_after_decoding(orientation: int, tmp_path: Path) -> None:
    """The batched decoder returns stored pixels (nvJPEG ignores EXIF): each of the 8 orientations
    is applied afterwards, giving what Pillow shows, and the header's size is the displayed one."""
    path = tmp_path / "o.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_photo(40, 24, 1)).save(path, quality=95, exif=exif)
    enc = read_encoded(path.read_bytes(), path.name)
    images, source = decode_batch([enc.data], [enc.name], CPU, [enc.orientation])
    want = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
    assert (enc.orientation, source, (enc.width, enc.height)) == (orientation, [0], (want.shape[2], want.shape[1]))
    assert images[0].shape == want.shape and _close(images[0], want) < 0.5


def test_camera_mpo_files_are_decoded_on_the_device_and_bombs_refused(tmp_path: Path) -> None:
    mpo = tmp_path / "camera.mpo"
    Image.fromarray(_photo(64, 48, 2)).save(mpo, "MPO", save_all=True,
                                             append_images=[Image.fromarray(_photo(64, 48, 3))])
    enc = read_encoded(mpo.read_bytes(), mpo.name)
    assert enc.data.dim() == 1 and (enc.width, enc.height) == (64, 48)  # bytes, not pixels
    images, _ = decode_batch([enc.data], [enc.name], CPU)
    assert _close(images[0], torch.from_numpy(np.array(load_rgb(mpo))).permute(2, 0, 1)) < 0.5
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    data = bytearray(png.getvalue())  # IHDR: width and height at bytes 16-24, its CRC at 29-33
    data[16:24] = (200_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    with pytest.raises(ImageError, match="bomb.png"):
        read_encoded(bytes(data), "bomb.png")


def test_a_slot_refilled_after_a_failed_decode_takes_that_image_s_boxes(tmp_path: Path) -> None:
    """A big broken JPEG beside a small good one: its slot takes the good image with the good
    image's boxes and ids (the broken image's boxes would fall outside it)."""
    Image.fromarray(_photo(100, 80, 4)).save(tmp_path / "small.jpg", quality=95)
    big = io.BytesIO()
    Image.fromarray(_photo(2000, 1500, 5)).save(big, "JPEG", quality=80)
    (tmp_path / "big.jpg").write_bytes(big.getvalue()[:big.getvalue().find(b"\xff\xda")])
    records = [Record(name=n, path=n, score=None, split="train") for n in ("small.jpg", "big.jpg")]
    ds = ViewDataset(records, tmp_path, PlanBoxes(MocoPlan(32, MocoViewConfig())), seed=0, encoded=True)
    batch = collate_encoded([ds[i] for i in range(2)])
    out = DeviceDecode(MocoPlan.views, 32)(batch, CPU)
    assert out["index"].tolist() == [0, 0] and out["image_id"].tolist() == [0, 0]
    assert torch.equal(out["query"][0], out["query"][1]) and torch.equal(out["key"][0], out["key"][1])


def test_a_jpeg_that_fails_to_decode_is_named_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = _files(tmp_path / "img")[:2]
    bad = tmp_path / "img" / "bad.jpg"
    data = bytearray((tmp_path / "img" / records[0].path).read_bytes())
    bad.write_bytes(bytes(data[:data.find(b"\xff\xda")]))  # cut before the scan: the header still reads
    records.append(Record(name="bad.jpg", path="bad.jpg", score=None, split="train"))
    ds = ViewDataset(records, tmp_path / "img", PlanBoxes(MocoPlan(32, MocoViewConfig())), seed=0, encoded=True)
    batch = collate_encoded([ds[i] for i in range(3)])
    with caplog.at_level("WARNING"):
        out = DeviceDecode(MocoPlan.views, 32)(batch, CPU)
    assert out["query"].shape == (3, 3, 32, 32)
    assert any("bad.jpg" in r.getMessage() for r in caplog.records)


def test_decode_on_device_is_refused_where_the_views_need_the_loader() -> None:
    with pytest.raises(ParamError, match="decode_on=device needs augment_on: device"):
        from_dict(PretrainConfig, {"method": "moco", "decode_on": "device"})
    with pytest.raises(ParamError, match="Random-Crop-and-Mix"):
        from_dict(PretrainConfig, {"method": "clic", "decode_on": "device", "augment_on": "device"})
    with pytest.raises(ParamError, match="key_rotation_deg"):
        from_dict(PretrainConfig, {"method": "moco", "decode_on": "device", "augment_on": "device",
                                   "views": {"key_rotation_deg": 10.0}})


@pytest.mark.parametrize("method", ["moco", "clicv2"])
def test_pretraining_with_device_decoding_trains_and_repeats_exactly(method: str, tmp_path: Path) -> None:
    """A JPEG folder as the corpus, loader workers handing on bytes: two runs, identical weights."""
    _files(tmp_path / "corpus")
    for i in range(12):
        Image.fromarray(_photo(64 + 4 * i, 48 + 2 * i, 10 + i)).save(tmp_path / "corpus" / f"more{i}.jpg")
    raw = {"method": method, **tiny_overrides(method), "epochs": 1, "batch_size": 4, "num_workers": 1,
           "augment_on": "device", "decode_on": "device", "data": [str(tmp_path / "corpus")]}
    cfg = from_dict(PretrainConfig, raw)

    def weights(out: Path) -> dict[str, torch.Tensor]:
        return torch.load(run(cfg, tmp_path / "unused", out, progress=False), weights_only=True)["backbone"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and math.isfinite(lines[0]["loss"]) and lines[0]["loss"] > 0
