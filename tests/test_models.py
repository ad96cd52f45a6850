from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clic.config import CLICv2Config, MocoConfig, PretrainConfig, from_dict
from clic.models.backbones import build_backbone
from clic.models.clicv2 import CLICv2
from clic.models.moco import MoCo
from clic.pretrain import build_model


def _moco(**kw) -> MoCo:
    cfg = MocoConfig(queue_size=12, dim=8, **kw)
    return MoCo(build_backbone("resnet18"), cfg)


def _clicv2(**kw) -> CLICv2:
    return CLICv2(build_backbone("vit_tiny", 32, 8, depth=1), CLICv2Config(dim=8, max_tokens=32, **kw))


def _grads(model: torch.nn.Module, batch: dict) -> tuple[list[str], list[str]]:
    out = model(batch, momentum=0.9)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return missing, frozen_with_grad


@pytest.mark.parametrize("kw", [{"head": "mlp"}, {"head": "linear", "complexity_weight": 0.25}])
def test_moco_online_params_get_gradients_key_encoder_none(kw: dict) -> None:
    torch.manual_seed(0)
    model = _moco(**kw)
    batch = {"query": torch.randn(4, 3, 32, 32), "key": torch.randn(4, 3, 32, 32)}
    missing, frozen = _grads(model, batch)
    assert missing == [] and frozen == []
    assert all(n.startswith("encoder_k") for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw", [{}, {"loss": "image"}, {"mem": False}])
def test_clicv2_online_params_get_gradients_key_encoder_none(kw: dict) -> None:
    torch.manual_seed(0)
    model = _clicv2(**kw)
    batch = {"view1": torch.randn(3, 3, 32, 32), "view2": torch.randn(3, 3, 32, 32)}
    missing, frozen = _grads(model, batch)
    assert missing == [] and frozen == []
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen_names and all(n.startswith(("key_backbone", "key_head")) for n in frozen_names)
    assert hasattr(model, "decoder") == kw.get("mem", True)


def test_momentum_update_moves_key_towards_online() -> None:
    torch.manual_seed(0)
    model = _moco()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    pq = next(model.encoder_q.parameters()).detach().clone()
    pk = next(model.encoder_k.parameters()).detach().clone()
    model({"query": torch.randn(2, 3, 32, 32), "key": torch.randn(2, 3, 32, 32)}, momentum=0.75)
    assert torch.allclose(next(model.encoder_k.parameters()), 0.75 * pk + 0.25 * pq, atol=1e-6)


def test_queue_is_a_ring_buffer_of_keys() -> None:
    model = _moco()
    keys = F.normalize(torch.randn(5, 8), dim=1)
    for _ in range(3):  # 15 keys into a queue of 12: wraps around
        model._enqueue(keys)
    assert int(model.queue_ptr) == 15 % 12
    assert int(model.queue_filled) == 15
    assert torch.allclose(model.queue[:3], keys[2:5])  # third write wrapped: rows 10, 11, 0, 1, 2
    assert torch.allclose(model.queue[10:12], keys[0:2])


def test_vit_mask_tokens_replace_hidden_patches() -> None:
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny", 32, 8, depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    token = torch.zeros(bb.feature_dim)
    a = bb.forward_tokens(x, mask, token)
    x2 = x.clone()
    x2[..., 8:16, 8:16] = torch.randn(3, 8, 8)  # patch 5 (row 1, col 1): hidden, so no effect
    assert torch.allclose(a, bb.forward_tokens(x2, mask, token), atol=1e-5)
    assert not torch.allclose(bb.forward_tokens(x), bb.forward_tokens(x2), atol=1e-5)
    assert a.shape == (1, 16, bb.feature_dim) and bb.forward_spatial(x).shape == (1, bb.feature_dim, 4, 4)


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("vit_small", 384)])
def test_backbone_feature_dims(name: str, dim: int) -> None:
    bb = build_backbone(name, 32, 16, depth=1).eval()
    with torch.no_grad():
        assert bb(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")


def test_build_model_per_method() -> None:
    for method, cls in (("moco", MoCo), ("clic", MoCo), ("clicv2", CLICv2)):
        raw = {"method": method, "image_size": 32, "patch_size": 8, "depth": 1,
               "backbone": "vit_tiny" if method == "clicv2" else "resnet18"}
        assert isinstance(build_model(from_dict(PretrainConfig, raw)), cls)


def test_at_resolution_resamples_the_vit_position_embedding() -> None:
    from clic.models.backbones import at_resolution

    cfg = from_dict(PretrainConfig, {"backbone": "vit_tiny", "image_size": 32, "patch_size": 8, "depth": 1})
    vit = build_backbone("vit_tiny", 32, 8, depth=1).eval()
    with torch.no_grad():
        vit.vit.pos_embed.fill_(0.25)  # a constant embedding must stay constant under resampling
    big, big_cfg = at_resolution(vit, cfg, 64)
    assert big_cfg.image_size == 64 and cfg.image_size == 32 and big.grid == 8
    assert big.vit.pos_embed.shape == (1, 1 + 64, vit.feature_dim)
    torch.testing.assert_close(big.vit.pos_embed, torch.full_like(big.vit.pos_embed, 0.25))
    torch.testing.assert_close(big.vit.blocks[0].attn.qkv.weight, vit.vit.blocks[0].attn.qkv.weight)
    assert big(torch.randn(2, 3, 64, 64)).shape == (2, vit.feature_dim)
    assert big.forward_spatial(torch.randn(1, 3, 64, 64)).shape == (1, vit.feature_dim, 8, 8)
    assert at_resolution(vit, cfg, 0)[0] is vit and at_resolution(vit, cfg, 32)[0] is vit
    resnet = build_backbone("resnet18")
    same, rcfg = at_resolution(resnet, from_dict(PretrainConfig, {"image_size": 32}), 48)
    assert same is resnet and rcfg.image_size == 48
