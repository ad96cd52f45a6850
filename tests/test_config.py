from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from clic.config import PretrainConfig
from clic.methods import names as method_names
from clic.params import (
    TOP_LEVEL,
    apply_overrides,
    data_config,
    flatten,
    from_dict,
    load_params,
    mlflow_config,
    pretrain_config,
    probe_config,
    to_dict,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_resolve_for_every_method() -> None:
    params = load_params(REPO / "params.yaml")
    cfgs = {m: pretrain_config(params, m) for m in ("moco", "clic", "clicv2")}
    assert cfgs["clicv2"].backbone == "vit_tiny" and cfgs["clicv2"].optim.name == "adamw"
    assert cfgs["moco"].backbone == "resnet18" and cfgs["moco"].optim.name == "sgd"
    # common section reaches every method; method sections override it
    assert cfgs["clic"].moco.queue_size == params.tree["pretrain"]["common"]["moco"]["queue_size"]
    assert cfgs["clic"].rcm.pairing == "extra" and cfgs["clic"].moco.temperature == 0.07  # the authors' (recipes.md)
    assert data_config(params).source == "synthetic"


def test_lr_is_scaled_by_global_batch() -> None:
    cfg = from_dict(PretrainConfig, {"batch_size": 64, "optim": {"base_lr": 0.04}})
    assert cfg.lr(1) == pytest.approx(0.01)
    assert cfg.lr(4) == pytest.approx(0.04)


@pytest.mark.parametrize(("raw", "message"), [
    ({"epochs": -1}, "pretrain.epochs must be > 0, got -1"),
    ({"optim": {"lrr": 1}}, "pretrain.optim.lrr: unknown key"),
    ({"backbone": "vit_tiny", "image_size": 30, "patch_size": 8}, "patch_size=8 must divide image_size=30"),
    ({"method": "simclr"}, "method: expected one of"),
    ({"method": "clicv2", "backbone": "resnet18"}, "clicv2 needs a ViT backbone"),
    ({"batch_size": "64"}, "pretrain.batch_size: expected int, got '64'"),
    ({"shift": {"max_shift": 0.75}}, "max_shift < 0.5"),
    ({"moco": {"bn_splits": 3}}, "bn_splits=3 must divide batch_size=64"),
    ({"moco": {"max_queue_fraction": 0}}, "moco.max_queue_fraction must be in"),
    ({"views": {"crop_scale": [0.2]}}, "pretrain.views.crop_scale: expected a list of 2 values"),
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
    assert params.tree["pretrain"]["clicv2"]["epochs"] == 7
    assert params.tree["pretrain"]["moco"]["moco"]["head"] == "linear"
    assert params.seed == 5
    assert pretrain_config(params, "moco").seed == 5
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["epochs"])


def test_round_trip_and_flatten() -> None:
    cfg = from_dict(PretrainConfig, {"method": "clic", "rcm": {"pairing": "both"}})
    again = from_dict(PretrainConfig, to_dict(cfg))
    assert again == cfg
    flat = flatten(to_dict(cfg))
    assert flat["rcm.pairing"] == "both" and flat["optim.base_lr"] == cfg.optim.base_lr


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
    assert gpu.probe.protocol == "ridge"  # inherited from params.yaml
    assert [pretrain_config(gpu, m).epochs for m in ("moco", "clic", "clicv2")] == [200, 200, 300]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="'extends' forms a cycle"):
        load_params(tmp_path / "a.yaml")


# ------------------------------------------------------------ every key checked, every error located
@pytest.mark.parametrize(("text", "message"), [
    ("pretrian:\n  common: {}\n", "pretrian: unknown key; did you mean 'pretrain'?"),
    ("sede: 1\n", "sede: unknown key; did you mean 'seed'?"),
    ("epochs: 3\n", "epochs: unknown key; did you mean 'pretrain.<method>.epochs'"),
    ("probe:\n  icnet:\n    epoch: 3\n", "probe.icnet.epoch: unknown key; did you mean 'probe.icnet.epochs'?"),
    ("pretrain:\n  clicv2:\n    clicv2:\n      mask_ration: 0.5\n",
     "pretrain.clicv2.clicv2.mask_ration: unknown key; did you mean 'pretrain.clicv2.clicv2.mask_ratio'?"),
    ("pretrain:\n  clicc: {}\n", "pretrain.clicc: unknown key; did you mean 'pretrain.clic'?"),
    ("validate:\n  min_row: 3\n", "validate.min_row: unknown key; did you mean 'validate.min_rows'?"),
    ("mlflow:\n  experiement: x\n", "mlflow.experiement: unknown key; did you mean 'mlflow.experiment'?"),
    ("seed: zero\n", "seed: expected int, got 'zero'"),
    ("data:\n  cache_size: big\n", "data.cache_size: expected int, got 'big'"),
    ("mlflow:\n  register: 3\n", "mlflow.register: expected bool"),
    ("pretrain:\n  data: 3\n", "pretrain.data: expected a list of folder/archive paths (or one path), got 3"),
    ("pretrain:\n  common:\n    optim:\n      base_lr: fast\n",
     "pretrain.common.optim.base_lr: expected float, got 'fast'"),
])
def test_params_files_refuse_unknown_keys_and_wrong_types(tmp_path: Path, text: str, message: str) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"extends: {REPO / 'params.yaml'}\n" + text)
    with pytest.raises(ValueError, match=re.escape(f"{profile}: {message}")):
        load_params(profile)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_params_file_is_an_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ValueError, match="p.yaml: params file is empty"):
        load_params(tmp_path / "p.yaml")


@pytest.mark.parametrize(("overrides", "message"), [
    (["pretrain.clicv2.epochs=0"], "pretrain.clicv2.epochs must be > 0, got 0"),
    (["pretrain.common.batch_size=0"], "pretrain.common.batch_size must be > 0, got 0"),
    (["pretrain.clic.rcm.aug_p=2"], "pretrain.clic.rcm.aug_p must be a probability in [0, 1], got 2"),
    (["pretrain.clicv2.shift.max_shift=0.5"],
     "pretrain.clicv2.shift.max_shift: need 0 <= min_shift <= max_shift < 0.5"),
    (["pretrain.moco.optim.base_lr=-1"], "pretrain.moco.optim.base_lr must be > 0, got -1.0"),
    (["probe.icnet.kernel=2"], "probe.icnet.kernel must be a positive odd number, got 2"),
    (["data.synthetic.n_classes=9"], "data.synthetic.n_classes must be in [2, 6], got 9"),
    (["validate.max_rows=5"], "validate.max_rows must be >= validate.min_rows (10), got 5"),
])
def test_value_errors_name_the_full_dotted_key_and_the_bounds(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--set {overrides[0]!r}: {message}")):
        load_params(REPO / "params.yaml", overrides)  # the whole tree is validated once, when it is read


@pytest.mark.parametrize(("item", "message"), [
    ("pretrain.clicv2.epoch=3", "pretrain.clicv2.epoch: unknown key; did you mean 'pretrain.clicv2.epochs'?"),
    ("sede=1", "sede: unknown key; did you mean 'seed'?"),
    ("seed=zero", "seed: expected int, got 'zero'"),
    ("pretrain.clicv2.optim.base_lr=fast", "pretrain.clicv2.optim.base_lr: expected float, got 'fast'"),
])
def test_overrides_with_unknown_keys_or_wrong_types_are_refused(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--set {item!r}: {message}")):
        load_params(REPO / "params.yaml", [item])


def test_the_cli_reports_a_bad_key_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clic.cli import main

    assert main(["params", str(REPO / "params.yaml"), "--set", "pretrain.clicv2.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clic: error: --set 'pretrain.clicv2.epoch=3'") and "Traceback" not in err
    assert main(["params", str(REPO / "params.yaml"), "--set", "pretrain.clicv2.epochs=0"]) == 2
    assert "pretrain.clicv2.epochs must be > 0, got 0" in capsys.readouterr().err


def test_every_repo_params_file_passes_the_key_check() -> None:
    for name in ("params.yaml", "params/gpu.yaml", "params/real-photos.yaml"):
        params = load_params(REPO / name)
        assert validate_config(params).min_rows == 10 and mlflow_config(params).experiment == "clic"
        assert set(params.tree) <= TOP_LEVEL
    assert pretrain_config(load_params(REPO / "params.yaml", ["pretrain.clicv2.optim.base_lr=1e-3"]),
                           "clicv2").optim.base_lr == 1e-3  # PyYAML reads 1e-3 as a string


def _alias_bomb(levels: int = 9) -> str:
    """YAML whose aliases expand to 9**levels strings (a few hundred bytes)."""
    node = "&a0 [x, x, x, x, x, x, x, x, x]"
    for k in range(1, levels):
        node = f"&a{k} [{node}" + f", *a{k - 1}" * 8 + "]"
    return node


@pytest.mark.parametrize(("key", "measured"), [
    ("seed", "435,848,051 values after expanding YAML aliases (19 as"),
    ("pretrain:\n  data", "435,848,052 values after expanding YAML aliases (20 as"),
])
def test_a_yaml_alias_bomb_under_a_known_key_is_refused_at_once(tmp_path: Path, key: str, measured: str) -> None:
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(f"{key}: {_alias_bomb()}\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"bomb.yaml: {measured} written); aliases may add at most "
                                                   "100,000 (an alias bomb?)")) as err:
        load_params(p)
    assert time.perf_counter() - start < 5 and len(str(err.value)) < 300  # the value is not quoted
    with pytest.raises(ValueError, match="after expanding YAML aliases"):
        apply_overrides({}, [f"seed={_alias_bomb()}"])
    small = tmp_path / "small.yaml"  # aliases themselves are fine
    small.write_text("seed: 1\nprobe:\n  alphas: &al [1.0, 10.0]\ntransfer:\n  epochs: 3\n")
    assert probe_config(load_params(small)).alphas == (1.0, 10.0)


def test_a_nested_override_merges_into_its_section() -> None:
    """``optim={base_lr: 0.001}`` changes the rate and keeps CLICv2's AdamW (it used to replace the
    section and silently train with SGD)."""
    params = load_params(REPO / "params.yaml", ["pretrain.clicv2.optim={base_lr: 0.001}"])
    optim = pretrain_config(params, "clicv2").optim
    assert (optim.name, optim.base_lr, optim.weight_decay) == ("adamw", 0.001, 0.05)


def test_one_key_set_twice_to_different_values_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"epochs is also set to 3 by --set 'pretrain\.clicv2\.epochs=3'"):
        apply_overrides({}, ["pretrain.clicv2.epochs=3", "pretrain.clicv2.epochs=4"])
    with pytest.raises(ValueError, match=r"pretrain\.clicv2\.optim\.base_lr is also set"):
        apply_overrides({}, ["pretrain.clicv2.optim.base_lr=0.1", "pretrain.clicv2.optim={base_lr: 0.2}"])
    assert apply_overrides({}, ["seed=2", "seed=2"]).seed == 2  # the same value twice is no conflict
    from clic.cli import main  # `epochs` relative to the method and its full path, in one run

    assert main(["pretrain", "--method", "clicv2", "--out", str(tmp_path / "m"), "--set", "epochs=3",
                 "--set", "pretrain.clicv2.epochs=4"]) == 2
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text", ["pretrain:\n  clicv2:\n    optim:\n      base_lr: .inf\n",
                                  "pretrain:\n  common:\n    optim:\n      base_lr: .nan\n"])
def test_non_finite_values_are_refused(tmp_path: Path, text: str) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=r"optim\.base_lr must be a finite number"):
        pretrain_config(load_params(p), "clicv2")
    with pytest.raises(ValueError, match=r"pretrain\.moco\.optim\.base_lr must be a finite number, got inf"):
        pretrain_config(load_params(REPO / "params.yaml", ["pretrain.moco.optim.base_lr=.inf"]), "moco")
    clic = pretrain_config(load_params(REPO / "params.yaml"), "clic")
    assert clic.rcm.max_upscale == float("inf")  # where infinity means "no cap", it stays allowed


def test_a_params_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.yaml: not UTF-8 text \(invalid continuation byte at byte 13\)"):
        load_params(bad)
    child = tmp_path / "child.yaml"  # through `extends`, the base is named
    child.write_text("extends: latin1.yaml\nseed: 2\n")
    with pytest.raises(ValueError, match=r"latin1\.yaml: not UTF-8"):
        load_params(child)


# ------------------------------------------------- a key the user sets is the key the run gets
_COMMON = [("epochs", 3, 2, lambda c: c.epochs), ("optim.base_lr", 0.5, 0.25, lambda c: c.optim.base_lr),
           ("moco.temperature", 0.5, 0.25, lambda c: c.moco.temperature),
           ("views.grayscale_p", 0.3, 0.25, lambda c: c.views.grayscale_p)]


@pytest.mark.parametrize(("key", "value", "mine", "get"), _COMMON, ids=[case[0] for case in _COMMON])
def test_a_set_common_key_beats_the_method_sections_of_the_files(key: str, value: float, mine: float,
                                                                 get: Any) -> None:
    """params.yaml sets each of these in some method's section too (clic's base_lr, temperature and
    grayscale_p; every method's epochs): ``--set pretrain.common.K`` used to change only the methods
    whose section is silent. The method's own override still beats it, in either order."""
    nested = yaml.safe_dump(_nest_dict(key, value), default_flow_style=True).strip()
    for item in (f"pretrain.common.{key}={value}", f"pretrain.common={nested}", f"pretrain={{common: {nested}}}"):
        params = load_params(REPO / "params.yaml", [item])
        assert [get(pretrain_config(params, m)) for m in method_names()] == [value] * 3, item
    both = [f"pretrain.common.{key}={value}", f"pretrain.clic.{key}={mine}"]
    for overrides in (both, both[::-1]):
        params = load_params(REPO / "params.yaml", overrides)
        assert [get(pretrain_config(params, m)) for m in method_names()] == [value, mine, value]


def _nest_dict(key: str, value: Any) -> Any:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_the_rule_holds_through_extends_seed_and_a_written_tree(tmp_path: Path) -> None:
    """A profile's method section is a file value as well; the top-level ``seed`` is one level below
    ``pretrain.common``; the overridden tree means the same when written out and read back as a
    file (``clic params ... > params.yaml``, the Prefect workspaces)."""
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"extends: {REPO / 'params' / 'gpu.yaml'}\npretrain:\n  clicv2:\n    seed: 7\n"
                       "    optim:\n      base_lr: 0.1\n")
    params = load_params(profile, ["pretrain.common.optim.base_lr=0.01", "pretrain.common.backbone=resnet50",
                                   "seed=5"])
    for m in ("moco", "clic"):
        assert (pretrain_config(params, m).optim.base_lr, pretrain_config(params, m).backbone) == (0.01, "resnet50")
    with pytest.raises(ValueError, match=r"clicv2 needs a ViT backbone: pretrain\.common\.backbone must be one of"):
        pretrain_config(params, "clicv2")  # refused, with the reason, not silently kept at vit_base
    params = load_params(profile, ["pretrain.common.optim.base_lr=0.01", "seed=5"])
    assert pretrain_config(params, "clicv2").optim.base_lr == 0.01 and pretrain_config(params, "clicv2").seed == 5
    assert pretrain_config(params, "clicv2").optim.name == "adamw"  # the rest of the section is the file's
    written = tmp_path / "written.yaml"
    written.write_text(yaml.safe_dump(params.tree, sort_keys=False))
    assert all(pretrain_config(load_params(written), m) == pretrain_config(params, m) for m in method_names())
    tree = params.tree  # a method's section keeps what differs from pretrain.common: a later edit of common reaches it
    assert "optim" not in tree["pretrain"]["moco"] and tree["pretrain"]["common"]["optim"]["base_lr"] == 0.01
    tree["pretrain"]["common"]["optim"]["base_lr"] = 0.02
    written.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert {pretrain_config(load_params(written), m).optim.base_lr for m in method_names()} == {0.02}
    assert load_params(profile).tree["pretrain"]["clicv2"]["optim"]["base_lr"] == 0.1  # the files' tree is not changed


def test_the_commands_resolve_a_set_common_key_as_the_library_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import clic.pretrain
    from clic.cli import main

    assert main(["params", str(REPO / "params.yaml"), "--method", "clic", "--set", "pretrain.common.epochs=3",
                 "--set", "pretrain.common.moco.temperature=0.3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["pretrain"]["clic"]
    assert (shown["epochs"], shown["moco"]["temperature"]) == (3, 0.3)
    got: list[PretrainConfig] = []
    monkeypatch.setattr(clic.pretrain, "run", lambda cfg, *a, **k: got.append(cfg) or "encoder.pt")
    base = ["pretrain", "--params", str(REPO / "params.yaml"), "--method", "clic", "--out", str(tmp_path / "m")]
    assert main([*base, "--set", "pretrain.common.epochs=3"]) == 0
    assert main([*base, "--set", "pretrain.common.epochs=3", "--set", "epochs=5"]) == 0  # relative: the method's
    assert [c.epochs for c in got] == [3, 5]
    assert main([*base, "--set", "common.epochs=3"]) == 2
    assert "pretrain.clic.common: unknown key; did you mean 'pretrain.common'?" in capsys.readouterr().err


# ------------------------------------------------------------------------ what YAML may not do
@pytest.mark.parametrize(("text", "message"), [
    ("seed: 1\npretrain:\n  data: [a]\n  common:\n    moco:\n      queue_size: 16\npretrain:\n  clicv2:\n"
     "    epochs: 2\n", "p.yaml:7: key 'pretrain' given twice (first at line 2)"),
    ("pretrain:\n  common:\n    optim:\n      base_lr: 0.1\n      momentum: 0.9\n      base_lr: 0.2\n",
     "p.yaml:6: key 'base_lr' given twice (first at line 4)"),
    ("probe:\n  alphas: [1.0]\n  icnet: {epochs: 3, kernel: 3, epochs: 4}\n",
     "p.yaml:3: key 'epochs' given twice (first at line 3)"),
    ("seed: 1\nprobe: {}\nseed: 1\n", "p.yaml:3: key 'seed' given twice (first at line 1)"),  # even the same value
])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_params(tmp_path / "p.yaml")
    child = tmp_path / "child.yaml"  # in an `extends` parent, the parent is named
    child.write_text("extends: p.yaml\nseed: 3\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_params(child)


def test_repeats_that_are_not_duplicates_and_tags_that_stay_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("--set 'probe.icnet={epochs: 3, epochs: 4}': the value:1: key "
                                                   "'epochs' given twice (first at line 1)")):
        apply_overrides({}, ["probe.icnet={epochs: 3, epochs: 4}"])
    merged = tmp_path / "merge.yaml"  # the keys a merge key copies in are overridden, not repeated
    merged.write_text("probe:\n  icnet: {<<: &base {epochs: 3, kernel: 3}, epochs: 4}\n")
    assert load_params(merged).tree["probe"]["icnet"] == {"epochs": 4, "kernel": 3}
    unsafe = tmp_path / "unsafe.yaml"
    for text in ("seed: !!python/object/apply:os.system [echo hi]\n", "? !!python/name:os.system\n: 1\n"):
        unsafe.write_text(text)
        with pytest.raises(ValueError, match="not valid YAML"):
            load_params(unsafe)


def test_a_long_file_without_aliases_is_not_an_alias_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is on what aliases add: a corpus list longer than the limit is as long as it is
    written (tested at a limit of 1,000; the repo's 100,000 costs PyYAML seconds to parse)."""
    import clic.params

    monkeypatch.setattr(clic.params, "MAX_YAML_VALUES", 1_000)
    plain = tmp_path / "plain.yaml"
    plain.write_text("pretrain:\n  data:\n" + "".join(f"    - photos/{i}\n" for i in range(1_100)))
    assert len(load_params(plain).tree["pretrain"]["data"]) == 1_100
    aliased = tmp_path / "aliased.yaml"  # ... and a few aliases in it are fine
    aliased.write_text(plain.read_text().replace("    - photos/0\n", "    - &p photos/0\n") + "    - *p\n" * 5)
    assert len(load_params(aliased).tree["pretrain"]["data"]) == 1_105
    many = tmp_path / "many.yaml"  # aliases that add more than the limit are refused, saying what was measured
    many.write_text(f"probe:\n  alphas: &a [{', '.join(['1.0'] * 100)}]\ntransfer: [{', '.join(['*a'] * 11)}]\n")
    with pytest.raises(ValueError, match=re.escape("many.yaml: 1,215 values after expanding YAML aliases (104 as "
                                                   "written); aliases may add at most 1,000 (an alias bomb?)")):
        load_params(many)


def test_one_validation_of_the_merged_layers_names_the_layer_that_wrote_the_value(tmp_path: Path) -> None:
    """The files and the overrides are merged once and validated once: an error names the file (or
    --set) that wrote the value, at the key it was written under; a later layer may mend an earlier
    one's value; settings that are only valid together pass together."""
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text(f"extends: {REPO / 'params.yaml'}\npretrain:\n  common:\n    batch_size: 0\n")
    child.write_text("extends: base.yaml\nprobe:\n  folds: 3\n")
    with pytest.raises(ValueError, match=re.escape(f"{base}: pretrain.common.batch_size must be > 0, got 0")):
        load_params(child)
    assert pretrain_config(load_params(child, ["pretrain.common.batch_size=16"]), "clic").batch_size == 16
    child.write_text("extends: base.yaml\npretrain:\n  clic:\n    batch_size: 0\n  common:\n    batch_size: 8\n")
    with pytest.raises(ValueError, match=re.escape(f"{child}: pretrain.clic.batch_size must be > 0, got 0")):
        load_params(child)
    shift = ["pretrain.clicv2.shift.min_shift=0.4", "pretrain.clicv2.shift.max_shift=0.45"]
    assert pretrain_config(load_params(REPO / "params.yaml", shift), "clicv2").shift.min_shift == 0.4
    with pytest.raises(ValueError, match=re.escape("--set 'seed=-0.5': seed: expected int, got -0.5")):
        load_params(REPO / "params.yaml", ["seed=-0.5"])


def test_the_defaults_without_a_params_file_build_and_keep_each_methods_rules() -> None:
    """Commands that read no params file (clic score, map, embed) start from the schema's defaults:
    they build; a method whose rules the defaults break is refused when it is taken."""
    from clic.params import default_params

    params = default_params()
    assert params.seed == 0 and pretrain_config(params, "moco").backbone == "resnet18"
    with pytest.raises(ValueError, match="method clicv2 needs a ViT backbone: pretrain.clicv2.backbone"):
        pretrain_config(params, "clicv2")
