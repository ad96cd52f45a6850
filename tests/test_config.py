from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clic.config import (
    PretrainConfig,
    apply_overrides,
    data_config,
    deep_merge,
    flatten,
    from_dict,
    load_params,
    pretrain_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_resolve_for_every_method() -> None:
    params = load_params(REPO / "params.yaml")
    cfgs = {m: pretrain_config(params, m) for m in ("moco", "clic", "clicv2")}
    assert cfgs["clicv2"].backbone == "vit_tiny" and cfgs["clicv2"].optim.name == "adamw"
    assert cfgs["moco"].backbone == "resnet18" and cfgs["moco"].optim.name == "sgd"
    # common section reaches every method; method sections override it
    assert cfgs["clic"].moco.queue_size == params["pretrain"]["common"]["moco"]["queue_size"]
    assert cfgs["clic"].rcm.pairing == "key"
    assert data_config(params).source == "synthetic"


def test_lr_is_scaled_by_global_batch() -> None:
    cfg = from_dict(PretrainConfig, {"batch_size": 64, "optim": {"base_lr": 0.04}})
    assert cfg.lr(1) == pytest.approx(0.01)
    assert cfg.lr(4) == pytest.approx(0.04)


@pytest.mark.parametrize(("raw", "message"), [
    ({"epochs": -1}, "epochs must be > 0"),
    ({"optim": {"lrr": 1}}, "pretrain.optim.lrr: unknown key"),
    ({"backbone": "vit_tiny", "image_size": 30, "patch_size": 8}, "patch_size=8 must divide image_size=30"),
    ({"method": "simclr"}, "method: expected one of"),
    ({"method": "clicv2", "backbone": "resnet18"}, "clicv2 needs a ViT backbone"),
    ({"batch_size": "64"}, "pretrain.batch_size: expected an integer"),
    ({"shift": {"max_shift": 0.75}}, "max_shift < 0.5"),
    ({"moco": {"bn_splits": 3}}, "bn_splits=3 must divide batch_size=64"),
    ({"moco": {"max_queue_fraction": 0}}, "moco.max_queue_fraction must be in"),
    ({"views": {"crop_scale": [0.2]}}, "expected 2 values"),
])
def test_bad_params_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(PretrainConfig, raw, "pretrain")


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        pretrain_config({}, "byol")


def test_overrides_parse_yaml_values_and_create_sections(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"pretrain": {"clicv2": {"epochs": 3}}}))
    params = load_params(p, ["pretrain.clicv2.epochs=7", "pretrain.moco.moco.head=linear", "seed=5"])
    assert params["pretrain"]["clicv2"]["epochs"] == 7
    assert params["pretrain"]["moco"]["moco"]["head"] == "linear"
    assert params["seed"] == 5
    assert pretrain_config(params, "moco").seed == 5
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["epochs"])


def test_round_trip_and_flatten() -> None:
    cfg = from_dict(PretrainConfig, {"method": "clic", "rcm": {"pairing": "both"}})
    again = from_dict(PretrainConfig, to_dict(cfg))
    assert again == cfg
    flat = flatten(to_dict(cfg))
    assert flat["rcm.pairing"] == "both" and flat["optim.base_lr"] == cfg.optim.base_lr
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_missing_or_broken_params_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(bad)


def test_profiles_extend_the_base_params(tmp_path: Path) -> None:
    for profile in ("real-photos", "gpu"):
        params = load_params(REPO / "params" / f"{profile}.yaml")
        for m in ("moco", "clic", "clicv2"):
            pretrain_config(params, m)  # every profile resolves for every method
    gpu = load_params(REPO / "params" / "gpu.yaml")
    assert pretrain_config(gpu, "clicv2").backbone == "vit_base" and pretrain_config(gpu, "clic").image_size == 224
    assert gpu["probe"]["protocol"] == "ridge"  # inherited from params.yaml
    assert [pretrain_config(gpu, m).epochs for m in ("moco", "clic", "clicv2")] == [200, 200, 300]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="'extends' forms a cycle"):
        load_params(tmp_path / "a.yaml")
