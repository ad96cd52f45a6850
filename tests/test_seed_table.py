"""bench/seed_table.py, the table docs/results.md reports: means over seeds, and paired differences
with intervals over seeds and images, on prediction files laid out as bench/real_data.py writes them."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from seed_table import Study, default_pairs, read_rows  # noqa: E402

CATS = ("Art", "Scenes")


def write_run(folder: Path, rows: dict[str, dict[int, np.ndarray]], human: np.ndarray) -> None:
    for row, seeds in rows.items():
        for seed, pred in seeds.items():
            out = folder / f"seed-{seed}" / "reports" / row
            out.mkdir(parents=True, exist_ok=True)
            with (out / "predictions.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["name", "category", "human", "predicted"])
                for i, (h, p) in enumerate(zip(human, pred, strict=True)):
                    w.writerow([f"{CATS[i % 2]}_{i}.jpg", CATS[i % 2], h, p])


@pytest.fixture()
def study_dirs(tmp_path: Path) -> tuple[Path, Path, np.ndarray, dict]:
    rng = np.random.default_rng(0)
    human = rng.normal(size=120)
    good = {s: human + rng.normal(scale=0.3, size=120) for s in (0, 1, 2)}
    poor = {s: human + rng.normal(scale=3.0, size=120) for s in (0, 1, 2)}
    write_run(tmp_path / "main", {"clic": good, "moco": poor}, human)
    write_run(tmp_path / "clic-variant", {"clic": {0: good[0], 1: good[1]}}, human)
    return tmp_path / "main", tmp_path / "clic-variant", human, {"good": good, "poor": poor}


def test_means_and_spreads_are_the_per_seed_spearman(study_dirs):
    main, _, human, preds = study_dirs
    study = Study(read_rows([main]))
    per_seed = [spearmanr(preds["good"][s], human)[0] for s in (0, 1, 2)]
    s = study.summary("clic")["all"]
    assert s["mean"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert s["sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-4)
    art = np.arange(120) % 2 == 0
    assert study.summary("moco")["Art"]["seeds"][1] == pytest.approx(
        spearmanr(preds["poor"][1][art], human[art])[0], abs=1e-4)


def test_differences_are_paired_and_their_intervals_decide(study_dirs):
    main, variant, _, _ = study_dirs
    study = Study(read_rows([main, variant]))
    assert set(study.pred) == {"clic", "moco", "clic-variant/clic"}
    better = study.difference("clic", "moco", n_boot=300)["by_category"]["all"]
    assert better["diff"] > 0.3 and better["ci95"][0] > 0 and better["excludes_zero"]
    same = study.difference("clic", "clic", n_boot=100)["by_category"]["all"]
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and not same["excludes_zero"]
    # the variant ran seeds 0 and 1 of the three: not paired on seeds, still a difference near zero
    d = study.difference("clic-variant/clic", "clic", n_boot=300)
    assert d["seeds_a"] == [0, 1] and not d["paired_seeds"]
    assert d["by_category"]["all"]["ci95"][0] < 0.05 and not d["by_category"]["all"]["excludes_zero"]
    assert ("clic", "moco") in default_pairs(list(study.pred))
    assert ("clic-variant/clic", "clic") in default_pairs(list(study.pred))
    # restricted to the variant's seeds, every row has them: paired
    only = Study(read_rows([main, variant], {0, 1}))
    assert only.seeds == {"clic": [0, 1], "moco": [0, 1], "clic-variant/clic": [0, 1]}
    assert only.difference("clic-variant/clic", "clic", n_boot=50)["paired_seeds"]


def test_command_prints_extra_pairs_and_names_an_unknown_row(study_dirs):
    main, variant, _, _ = study_dirs
    script = Path(__file__).resolve().parents[1] / "bench" / "seed_table.py"
    ok = subprocess.run([sys.executable, str(script), str(main), str(variant), "--boot", "50",
                         "--pair", "moco", "clic-variant/clic", "--pair", "clic", "moco"],
                        capture_output=True, text=True, check=True)
    assert "| moco - clic-variant/clic |" in ok.stdout
    assert ok.stdout.count("| clic - moco |") == 1  # a default pair asked for again is printed once
    bad = subprocess.run([sys.executable, str(script), str(main), "--pair", "moco", "clicv2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no row 'clicv2'" in bad.stderr
