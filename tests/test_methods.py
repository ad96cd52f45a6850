"""A method is one module: a small method defined here, registered by name, trains through the
generic loop (pretrain.run), is refused by the config when its own rule fails, and its encoder is
read back through its checkpoint layout; no other file names it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from clic import methods, pretrain
from clic.config import METHOD_RULES, MocoConfig, ParamError, PretrainConfig
from clic.embed import load_encoder
from clic.engine import checkpoint as ckpt
from clic.params import from_dict, load_params, pretrain_config

from .conftest import tiny_overrides


class TwoCrops:
    """Two random crops of an image, as tensors."""

    def __init__(self, size: int) -> None:
        self.crop = T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0)), T.ToTensor()])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"view1": self.crop(img), "view2": self.crop(img)}


class Agreement(nn.Module):
    """A backbone pulled towards agreeing with itself on two crops (no negatives: a toy)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        a, b = self.backbone(batch["view1"]), self.backbone(batch["view2"])
        return {"loss": 1 - F.cosine_similarity(a, b).mean()}


class Toy(methods.Method):
    name = "toy"
    sections = ("optim", "moco")

    def check(self, cfg: PretrainConfig) -> None:
        if cfg.backbone.startswith("vit"):
            raise ParamError("backbone", "method toy needs a ResNet: {key} is " + repr(cfg.backbone))

    def views(self, cfg: PretrainConfig, photometric: bool) -> Any:
        return TwoCrops(cfg.image_size)

    def model(self, cfg: PretrainConfig, backbone: nn.Module) -> nn.Module:
        return Agreement(backbone)

    def momentum(self, cfg: PretrainConfig) -> MocoConfig:
        return cfg.moco


@pytest.fixture
def toy() -> Iterator[methods.Method]:
    methods.register(Toy)
    try:
        yield methods.get("toy")
    finally:
        methods.REGISTRY.pop("toy")
        METHOD_RULES.pop("toy")


def test_the_three_methods_are_registered_in_order() -> None:
    assert methods.names() == ("moco", "clic", "clicv2")
    with pytest.raises(ValueError, match="unknown method 'byol'; expected one of moco, clic, clicv2"):
        methods.get("byol")
    assert methods.get("clic").sections == ("optim", "moco", "views", "rcm")


def test_a_method_defined_in_a_test_trains_one_step_through_the_generic_loop(
        toy: methods.Method, tiny_prepared: Path, tmp_path: Path) -> None:
    section = {**tiny_overrides("moco"), "epochs": 1, "max_images": 8}
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", [f"pretrain.toy={json.dumps(section)}"])
    cfg = pretrain_config(params, "toy")  # the registered method has its params section
    assert cfg.method == "toy" and cfg.batch_size == 8
    with pytest.raises(ValueError, match="method toy needs a ResNet: pretrain.toy.backbone is 'vit_tiny'"):
        from_dict(PretrainConfig, {**section, "method": "toy", "backbone": "vit_tiny"},
                  "pretrain.toy")

    torch.manual_seed(cfg.seed)
    initial = pretrain.build_model(cfg).backbone.state_dict()
    encoder = pretrain.run(cfg, tiny_prepared, tmp_path / "toy", device="cpu", progress=False)
    lines = (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and 0 <= json.loads(lines[0])["loss"] <= 2
    trained = ckpt.load(encoder, "cpu")["backbone"]
    assert any(not torch.equal(trained[k], v) for k, v in initial.items() if v.is_floating_point())
    # the training checkpoint's online backbone, found by the method's weights_prefix
    backbone, saved_cfg = load_encoder(tmp_path / "toy" / "checkpoint.pt")
    assert saved_cfg.method == "toy"
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in trained.items())
