"""clic.evaluation.seed_table, the table a study reports (``clic study table``): means over
seeds, and paired differences with intervals over seeds and images, on ``predictions.csv`` files
as the probe writes them. tests/test_study.py reads the same files back through MLflow."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from clic.evaluation.seed_table import Study, default_pairs, markdown, read_folder

CATS = ("Art", "Scenes")


def write_run(folder: Path, rows: dict[str, dict[int, np.ndarray]], human: np.ndarray,
              prefix: str = "") -> dict[tuple[str, int], Path]:
    files = {}
    for row, seeds in rows.items():
        for seed, pred in seeds.items():
            out = folder / f"seed-{seed}" / "reports" / row
            out.mkdir(parents=True, exist_ok=True)
            with (out / "predictions.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["name", "category", "human", "predicted"])
                for i, (h, p) in enumerate(zip(human, pred, strict=True)):
                    w.writerow([f"{CATS[i % 2]}_{i}.jpg", CATS[i % 2], h, p])
            files[(prefix + row, seed)] = out / "predictions.csv"
    return files


@pytest.fixture()
def study_dirs(tmp_path: Path) -> tuple[dict, dict, np.ndarray, dict]:
    rng = np.random.default_rng(0)
    human = rng.normal(size=120)
    good = {s: human + rng.normal(scale=0.3, size=120) for s in (0, 1, 2)}
    poor = {s: human + rng.normal(scale=3.0, size=120) for s in (0, 1, 2)}
    main = write_run(tmp_path / "main", {"clic": good, "moco": poor}, human)
    variant = write_run(tmp_path / "variant", {"clic": {0: good[0], 1: good[1]}}, human, "clic-variant/")
    return main, variant, human, {"good": good, "poor": poor}


def test_means_and_spreads_are_the_per_seed_spearman(study_dirs):
    main, _, human, preds = study_dirs
    study = Study(read_folder(main))
    per_seed = [spearmanr(preds["good"][s], human)[0] for s in (0, 1, 2)]
    s = study.summary("clic")["all"]
    assert s["mean"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert s["sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-4)
    art = np.arange(120) % 2 == 0
    assert study.summary("moco")["Art"]["seeds"][1] == pytest.approx(
        spearmanr(preds["poor"][1][art], human[art])[0], abs=1e-4)


def test_differences_are_paired_and_their_intervals_decide(study_dirs):
    main, variant, _, _ = study_dirs
    study = Study(read_folder({**main, **variant}))
    assert set(study.pred) == {"clic", "moco", "clic-variant/clic"}
    better = study.difference("clic", "moco", n_boot=300)["by_category"]["all"]
    assert better["diff"] > 0.3 and better["ci95"][0] > 0 and better["excludes_zero"]
    same = study.difference("clic", "clic", n_boot=100)["by_category"]["all"]
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and not same["excludes_zero"]
    # the variant ran seeds 0 and 1 of the three: not paired on seeds, still a difference near zero
    d = study.difference("clic-variant/clic", "clic", n_boot=300)
    assert d["seeds_a"] == [0, 1] and not d["paired_seeds"]
    assert d["by_category"]["all"]["ci95"][0] < 0.05 and not d["by_category"]["all"]["excludes_zero"]
    pairs = default_pairs(list(study.pred), ["moco", "clic", "clicv2"], {"clic": "random_resnet18"})
    assert pairs == [("clic", "moco"), ("clic-variant/clic", "clic")]  # no random row here: not paired
    # restricted to the variant's seeds, every row has them: paired
    only = Study(read_folder({k: v for k, v in {**main, **variant}.items() if k[1] in (0, 1)}))
    assert only.seeds == {"clic": [0, 1], "moco": [0, 1], "clic-variant/clic": [0, 1]}
    assert only.difference("clic-variant/clic", "clic", n_boot=50)["paired_seeds"]


def test_default_pairs_and_markdown_bold_only_intervals_that_exclude_zero(study_dirs):
    main, _, human, preds = study_dirs
    rows = read_folder(main)
    rows["random_resnet18"] = {s: {n: (float(-v[1]), v[1], v[2]) for n, v in rows["moco"][s].items()}
                               for s in (0, 1, 2)}
    rows["handcrafted"] = rows["moco"]
    study = Study(rows)
    random_of = {"moco": "random_resnet18", "clic": "random_resnet18"}
    pairs = default_pairs(list(rows), ["moco", "clic", "clicv2"], random_of)
    assert pairs == [("clic", "moco"), ("moco", "random_resnet18"), ("moco", "handcrafted"),
                     ("clic", "random_resnet18"), ("clic", "handcrafted")]
    diffs = [study.difference(a, b, 200) for a, b in pairs]
    md = markdown(study, diffs)
    assert "| clic | 3 | " in md and md.count("**") == 2 * sum(
        d["by_category"][c]["excludes_zero"] for d in diffs for c in study.groups())
    same = next(line for line in md.splitlines() if line.startswith("| moco - handcrafted |"))
    assert "**" not in same and "+0.000 [+0.000, +0.000]" in same


def test_a_table_refuses_seeds_that_scored_different_data() -> None:
    same = {"a.png": (0.1, 0.5, "x"), "b.png": (0.3, 0.7, "x"), "c.png": (0.2, 0.2, "x")}
    other = {**same, "b.png": (0.3, 0.9, "x")}  # the synthetic set of another seed: same name, other score
    with pytest.raises(ValueError, match=r"b.png: human score or category \(0.9, 'x'\) in m seed 1"):
        Study({"m": {0: same, 1: other}})
    with pytest.raises(ValueError, match="m seed 1 and m seed 0 scored different images .* e.g. d.png"):
        Study({"m": {0: same, 1: {**same, "d.png": (0.0, 0.1, "x")}}})
    assert Study({"m": {0: same, 1: dict(same)}}).summary("m")["all"]["sd"] == 0.0
