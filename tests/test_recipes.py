"""The recipe card (docs/recipes.md) against the profiles: every setting a method reads is on the
card, and each profile's resolved value is the card's (the recipe, or the listed deviation)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clic.methods import names as method_names
from clic.params import OUTSIDE_LEARNING, SPEED_ONLY, flatten, load_params, method_settings, pretrain_config

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "docs" / "recipes.md"
PROFILES = {"params.yaml": "params.yaml", "real-photos": "params/real-photos.yaml",
            "small-budget": "params/small-budget.yaml", "gpu": "params/gpu.yaml",
            "gpu-corpus": "params/gpu-corpus.yaml", "gpu-shards": "params/gpu-shards.yaml"}
# the budget search's choice per method (docs/results.md: the written rule on Scenes at seed 0); None: the recipe
CHOSEN = {"moco": "moco-noblur", "clic": "clic-mcos", "clicv2": "clicv2-lr2x"}
NOT_ON_CARD = {*SPEED_ONLY, *OUTSIDE_LEARNING, "method", "seed", "data", "splits", "max_images"}


def card() -> dict[str, dict[str, dict[str, Any]]]:
    """method -> setting -> {"recipe": value, <profile>: value}, read from the card's tables."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    method = None
    for line in CARD.read_text().splitlines():
        heading = re.match(r"## .*\(`pretrain\.(\w+)`[,)]", line)
        if heading:
            method = "outside" if heading.group(1) == "common" else heading.group(1)
            out[method] = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if method is None or len(cells) != 3 + len(PROFILES) or not cells[0].startswith("`"):
            continue
        key, recipe = cells[0].strip("`"), _value(cells[1])
        row = {"recipe": recipe}
        for name, cell in zip(PROFILES, cells[3:], strict=True):
            row[name] = recipe if cell == "=" else _value(cell)
        out[method][key] = row
    return out


def _value(cell: str) -> Any:
    m = re.match(r"`([^`]*)`", cell)
    assert m, f"docs/recipes.md: expected a `value` or =, got {cell!r}"
    return yaml.safe_load(m.group(1))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9) or (math.isinf(a) and a == b)


def test_the_card_covers_all_three_methods() -> None:
    assert set(card()) == set(method_names()) | {"outside"}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_settings_outside_the_method_sections_match_the_card(profile: str) -> None:
    """data.cache_size, nprocs, augment_on, decode_on: what each profile resolves to is the card's,
    the same for every method."""
    from clic.params import data_config

    params = load_params(ROOT / PROFILES[profile])
    rows = card()["outside"]
    assert set(rows) == {"data.cache_size"} | {f"pretrain.common.{k}" for k in OUTSIDE_LEARNING}
    for key, row in rows.items():
        if key.startswith("data."):
            got = {getattr(data_config(params), key.removeprefix("data."))}
        else:
            name = key.removeprefix("pretrain.common.")
            got = {getattr(pretrain_config(params, m), name) for m in method_names()
                   if not (m == "clic" and name == "decode_on")}  # CLIC's mosaics are cut in the loader
        assert got == {row[profile]}, f"{PROFILES[profile]} {key}: resolved {got}, card {row[profile]}"


def test_the_card_names_every_setting_it_leaves_out_as_speed_only() -> None:
    """The settings left off the card because they change only speed are the ones the code calls so."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    intro = text[text.index("Settings that change how fast"):text.index("Sources:")]
    assert set(re.findall(r"`(\w+)`", intro.split(";")[0])) == set(SPEED_ONLY)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_matches_the_card(method: str, profile: str) -> None:
    rows = card()[method]
    settings = flatten(method_settings(pretrain_config(load_params(ROOT / PROFILES[profile]), method)))
    listed = {k for k in settings if k not in NOT_ON_CARD}
    assert listed - set(rows) == set(), f"{method}: settings missing from docs/recipes.md"
    assert set(rows) - listed == set(), f"{method}: docs/recipes.md lists settings {method} does not read"
    wrong = {k: (settings[k], rows[k][profile]) for k in rows if not _same(settings[k], rows[k][profile])}
    assert wrong == {}, f"{PROFILES[profile]} pretrain.{method}: (resolved, card) differ"


@pytest.mark.parametrize("method", method_names())
def test_small_budget_is_real_photos_with_the_chosen_variant(method: str) -> None:
    """params/small-budget.yaml is exactly the real-photos profile plus the variant the budget search
    chose for each method, as the study ran it (params/budget-search.variants.json): nothing else moves."""
    variants = json.loads((ROOT / "params" / "budget-search.variants.json").read_text())
    chosen = variants[CHOSEN[method]] if CHOSEN[method] else {}
    assert all(k.startswith(f"pretrain.{method}.") for k in chosen)
    sets = [f"{k}={json.dumps(v)}" for k, v in chosen.items()]
    small = load_params(ROOT / "params" / "small-budget.yaml")
    want = load_params(ROOT / "params" / "real-photos.yaml", sets)
    assert method_settings(pretrain_config(small, method)) == method_settings(pretrain_config(want, method))
    assert all(getattr(small, k) == getattr(want, k) for k in ("seed", "data", "validate", "probe", "transfer"))
    recipe = flatten(method_settings(pretrain_config(load_params(ROOT / "params" / "real-photos.yaml"), method)))
    moved = {k for k, v in flatten(method_settings(pretrain_config(small, method))).items() if v != recipe[k]}
    assert moved == {k.removeprefix(f"pretrain.{method}.") for k in chosen}


def test_the_card_fails_a_profile_that_drifts(tmp_path: Path) -> None:
    """The check above can fail: a profile that changes a recipe value silently is caught."""
    drifted = tmp_path / "drifted.yaml"
    drifted.write_text(f"extends: {ROOT / 'params.yaml'}\npretrain:\n  moco:\n    moco:\n      temperature: 0.07\n")
    settings = flatten(method_settings(pretrain_config(load_params(drifted), "moco")))
    assert settings["moco.temperature"] == 0.07 != card()["moco"]["moco.temperature"]["params.yaml"]


def test_papers_recipes_where_the_card_says_so() -> None:
    """The values the issue named, read through the real profiles: MoCo v2 and CLIC's recipes."""
    gpu = load_params(ROOT / "params" / "gpu.yaml")
    moco, clic = pretrain_config(gpu, "moco"), pretrain_config(gpu, "clic")
    assert (moco.moco.temperature, moco.moco.momentum, moco.moco.momentum_schedule) == (0.2, 0.999, "constant")
    assert moco.lr(moco.nprocs) == pytest.approx(0.03) and moco.optim.warmup_epochs == 0
    assert moco.views.blur_p == 0.5 and moco.optim.decay_all
    assert (clic.moco.temperature, clic.moco.head, clic.rcm.mode, clic.rcm.pairing) == (0.07, "linear", "authors",
                                                                                        "extra")
    assert clic.rcm.extra_per_image == 3 and math.isinf(clic.rcm.max_upscale)


def test_clic_params_method_prints_the_resolved_settings_as_a_params_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "clic.cli", "params", "params/real-photos.yaml", "--method", "clic",
                          "--set", "pretrain.clic.moco.temperature=0.1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tree = yaml.safe_load(out)
    section = tree["pretrain"]["clic"]
    assert tree["pretrain"]["data"] == ["../shared/data/unlabeled"] and tree["seed"] == 0
    assert section["moco"]["temperature"] == 0.1 and section["image_size"] == 96  # override; the profile
    assert section["views"]["key_noise_std"] == 0.098 and section["rcm"]["pairing"] == "extra"  # params.yaml
    assert section["optim"]["min_lr_ratio"] == 0.0  # a default params.yaml does not write
    assert "clicv2" not in section and "shift" not in section and "betas" not in section["optim"]
    again = tmp_path / "resolved.yaml"  # what it prints is itself a valid params file, resolving the same
    again.write_text(out)
    assert method_settings(pretrain_config(load_params(again), "clic")) == method_settings(
        pretrain_config(load_params(ROOT / "params" / "real-photos.yaml", ["pretrain.clic.moco.temperature=0.1"]),
                        "clic"))
