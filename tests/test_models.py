from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clic.config import CLICv2Config, MocoConfig, PretrainConfig
from clic.models.backbones import build_backbone
from clic.models.clicv2 import CLICv2
from clic.models.moco import MoCo
from clic.params import from_dict
from clic.pretrain import build_model


def _moco(**kw) -> MoCo:
    cfg = MocoConfig(**{"queue_size": 12, "dim": 8, **kw})
    return MoCo(build_backbone("resnet18"), cfg)


def _clicv2(**kw) -> CLICv2:
    return CLICv2(build_backbone("vit_tiny", 32, 8, depth=1), CLICv2Config(dim=8, max_tokens=32, **kw))


def _grads(model: torch.nn.Module, batch: dict) -> tuple[list[str], list[str]]:
    out = model(batch, momentum=0.9)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return missing, frozen_with_grad


def test_moco_adds_the_complexity_aware_loss_of_the_query_encoders_stages() -> None:
    """The wiring their train.py has: the loss of the query encoder's four stage outputs against the
    query images' entropy, times the weight, added to a contrast that the extra path leaves unchanged."""
    from clic.losses import complexity_aware_loss, global_entropy

    torch.manual_seed(0)
    with_cal = _moco(head="linear", complexity_weight=0.25, bn_splits=1)
    plain = _moco(head="linear", complexity_weight=0.0, bn_splits=1)
    plain.load_state_dict(with_cal.state_dict())
    batch = {"query": torch.randn(4, 3, 32, 32), "key": torch.randn(4, 3, 32, 32)}
    torch.manual_seed(1)
    out = with_cal(batch, momentum=0.9)
    torch.manual_seed(1)
    ref = plain(batch, momentum=0.9)
    with torch.no_grad():
        plain.encoder_q.train()
        want = complexity_aware_loss(plain.encoder_q.backbone.forward_stages(batch["query"]),
                                     global_entropy(batch["query"]))
    assert out["complexity"].item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0
    assert out["contrast"].item() == pytest.approx(ref["contrast"].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["contrast"].item() + 0.25 * want.item(), rel=1e-5)


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
    model({"query": torch.randn(4, 3, 32, 32), "key": torch.randn(4, 3, 32, 32)}, momentum=0.75)
    assert torch.allclose(next(model.encoder_k.parameters()), 0.75 * pk + 0.25 * pq, atol=1e-6)


def test_queue_is_a_ring_buffer_of_keys() -> None:
    model = _moco()
    keys = F.normalize(torch.randn(5, 8), dim=1)
    for step in range(3):  # 15 keys into a queue of 12: wraps around
        model._enqueue(keys, torch.arange(5) + 10 * step)
    assert int(model.queue_ptr) == 15 % 12
    assert int(model.queue_filled) == 15
    assert torch.allclose(model.queue[:3], keys[2:5])  # third write wrapped: rows 10, 11, 0, 1, 2
    assert torch.allclose(model.queue[10:12], keys[0:2])
    assert model.queue_ids.tolist() == [22, 23, 24, 3, 4, 10, 11, 12, 13, 14, 20, 21]


def test_queue_never_offers_a_query_its_own_images_stale_key() -> None:
    """Same model state, same draws: queued keys of the batch's own images are dropped from the
    negatives (a smaller denominator), keys of other images are not."""
    import copy

    torch.manual_seed(0)
    model = _moco()
    batch = {"query": torch.randn(4, 3, 32, 32), "key": torch.randn(4, 3, 32, 32), "image_id": torch.arange(4)}
    model(batch, momentum=0.9)  # the queue now holds keys of images 0..3
    assert model.queue_ids[:4].tolist() == [0, 1, 2, 3] and (model.queue_ids[4:] == -1).all()
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    own = model(batch, momentum=0.9)["contrast"]
    torch.manual_seed(1)
    strangers = other({**batch, "image_id": torch.arange(4) + 100}, momentum=0.9)["contrast"]
    assert own.item() < strangers.item() - 1e-4


@pytest.mark.skipif(shutil.which("cc") is None or not Path(sysconfig.get_paths()["include"], "Python.h").is_file(),
                    reason="torch.compile on CPU needs a C compiler and the Python headers")
def test_compiled_moco_computes_the_eager_gradients() -> None:
    """Three steps of a queue that fills: compiled and eager MoCo give the same loss and the same
    gradients. (torch 2.14 elided the queue's copy inside the graph, so backward read the queue
    after this step's keys had overwritten it: equal losses, gradients off by their own size.)"""
    import copy

    torch.manual_seed(0)
    eager = _moco(bn_splits=1, queue_size=4)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    for step in range(3):
        batch = {"query": torch.randn(8, 3, 32, 32), "key": torch.randn(8, 3, 32, 32), "image_id": torch.arange(8)}
        for p in (*eager.parameters(), *compiled_module.parameters()):
            p.grad = None
        a, b = eager(batch, momentum=0.9), compiled(batch, momentum=0.9)
        a["loss"].backward()
        b["loss"].backward()
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4), step
        for (name, pa), pb in zip(eager.named_parameters(), compiled_module.parameters(), strict=True):
            if pa.grad is not None and name.startswith("encoder_q.head"):
                err = float((pa.grad - pb.grad).norm() / pa.grad.norm().clamp_min(1e-12))
                assert err < 1e-3, (step, name, err)
        torch.testing.assert_close(compiled_module.queue, eager.queue, rtol=1e-4, atol=1e-5)


def test_split_bn_keeps_a_query_out_of_other_sub_batches_statistics() -> None:
    """Shuffling BN in one process: sample 0's query is normalised with its own sub-batch only, so
    changing the images of the other sub-batch leaves it unchanged (full-batch BN would not)."""
    torch.manual_seed(0)
    model = _moco(bn_splits=2)
    xq = torch.randn(4, 3, 32, 32)
    xq2 = xq.clone()
    xq2[2:] = torch.randn(2, 3, 32, 32) * 3
    q = [torch.cat([model.encoder_q(c) for c in x.chunk(model._splits(4))]) for x in (xq, xq2)]
    torch.testing.assert_close(q[0][:2], q[1][:2])
    assert not torch.allclose(q[0][2:], q[1][2:])
    assert _moco(shuffle_bn=False)._splits(4) == 1
    # keys: computed on a shuffled batch, returned in the batch's order
    torch.manual_seed(3)
    perm = torch.randperm(4)
    torch.manual_seed(3)
    with torch.no_grad():
        k = model._keys(xq)
        ref = torch.cat([model.encoder_k(c) for c in xq[perm].chunk(2)])[torch.argsort(perm)]
    torch.testing.assert_close(k, ref)
    assert not torch.equal(perm, torch.arange(4))


def test_clicv2_contrasts_visible_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import clic.models.clicv2 as m

    seen: dict = {}
    real = m.patch_info_nce

    def spy(q, k, t, max_anchors=None, generator=None, anchors=None, key_offset=0):  # type: ignore[no-untyped-def]
        seen["anchors"] = anchors
        return real(q, k, t, max_anchors, generator, anchors, key_offset)

    monkeypatch.setattr(m, "patch_info_nce", spy)
    captured: dict = {}
    real_mask = m.random_mask
    monkeypatch.setattr(m, "random_mask", lambda *a, **kw: captured.setdefault("mask", real_mask(*a, **kw)))
    torch.manual_seed(0)
    model = _clicv2(mask_ratio=0.5)
    model({"view1": torch.randn(2, 3, 32, 32), "view2": torch.randn(2, 3, 32, 32)}, momentum=0.9)
    assert torch.equal(seen["anchors"], ~captured["mask"]) and int(captured["mask"].sum()) == 16
    seen.clear()
    _clicv2(mem=False)({"view1": torch.randn(2, 3, 32, 32), "view2": torch.randn(2, 3, 32, 32)}, momentum=0.9)
    assert seen["anchors"] is None


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


@pytest.mark.parametrize(("name", "kw", "dims"), [
    ("resnet18", {}, [64, 128, 256, 512]),
    ("vit_tiny", {"image_size": 32, "patch_size": 8, "depth": 6}, [192] * 4),
])
def test_pooled_stages_end_with_the_last_stage_pool(name: str, kw: dict, dims: list[int]) -> None:
    """``probe.features: stages``: one pool per depth, the last of them the usual pooled feature."""
    torch.manual_seed(0)
    backbone = build_backbone(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stages, last = backbone.forward_pooled_stages(x), backbone(x)
    assert stages.shape == (2, sum(dims)) and backbone.stages_dim == sum(dims)
    torch.testing.assert_close(stages[:, -dims[-1]:], last, rtol=1e-5, atol=1e-5)
    if name.startswith("vit"):
        assert backbone.stage_taps == [1, 2, 3, 5]  # the last block of each quarter of 6
    else:  # the first stage's pool is layer1's mean activation
        with torch.no_grad():
            torch.testing.assert_close(stages[:, :64], backbone.forward_stages(x)[0].mean(dim=(2, 3)))


def _clicv2_loss(batch: dict[str, torch.Tensor], loss: str) -> tuple[float, torch.Tensor]:
    """CLICv2's contrastive loss on ``batch`` and the gradient of its query head, from one seeded
    init (masking off: the masks are drawn per process)."""
    from clic.config import CLICv2Config
    from clic.models.backbones import build_backbone
    from clic.models.clicv2 import CLICv2

    torch.manual_seed(0)
    model = CLICv2(build_backbone("vit_tiny", 32, 8, 1), CLICv2Config(dim=16, max_tokens=100_000, mem=False,
                                                                       loss=loss))
    out = model(batch, momentum=0.99)
    out["loss"].backward()
    return out["loss"].item(), model.head.proj[0].weight.grad.clone()


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"view1": torch.randn(8, 3, 32, 32, generator=g), "view2": torch.randn(8, 3, 32, 32, generator=g)}


def _clicv2_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    full, share = _global_batch(), 8 // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in full.items()}
    result = {loss: _clicv2_loss(mine, loss) for loss in ("patch", "image")}
    torch.save(result, f"{out}/{rank}.pt")
    tdist.destroy_process_group()


def test_clicv2_contrasts_every_ranks_keys_as_one_process_at_the_global_batch(tmp_path: Path) -> None:
    """2 processes x 4 images give the loss (mean over ranks, as DDP averages) and the query
    head's gradient of 1 process x 8: each rank's tokens see all 8 images' key tokens as negatives."""
    torch.multiprocessing.spawn(_clicv2_worker, args=(2, 29541, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for loss in ("patch", "image"):
        one_loss, one_grad = _clicv2_loss(_global_batch(), loss)
        assert sum(r[loss][0] for r in ranks) / 2 == pytest.approx(one_loss, rel=1e-5), loss
        torch.testing.assert_close(sum(r[loss][1] for r in ranks) / 2, one_grad, rtol=1e-4, atol=1e-6)
