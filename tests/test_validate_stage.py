"""The validate stage's failure report states what was expected (bounds and the params that set
them), not only a count (a row-count failure used to read "None unexpected rows, e.g. 480")."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import validate  # noqa: E402
from stages.validate import describe_failure, run_suite  # noqa: E402


def _frame(n: int, short_side: int) -> pd.DataFrame:
    return pd.DataFrame({
        "name": [f"i{i}.png" for i in range(n)], "path": [f"images/i{i}.png" for i in range(n)],
        "score": [0.5] * n, "split": ["train"] * n, "category": [""] * n, "width": [64] * n, "height": [64] * n,
        "sha256": [f"{i:064x}" for i in range(n)], "cache": [""] * n, "image_readable": [True] * n,
        "short_side": [short_side] * (n - 1) + [8], "leaks_across_splits": [False] * n,
        "in_pretraining_corpus": [None] * n})


def test_failed_expectations_state_the_expected_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "ROOT", tmp_path)  # the data docs are reported relative to the project
    summary = run_suite(_frame(6, 64), tmp_path / "gx", min_rows=10, max_rows=2000, min_size=32)
    assert not summary["success"] and summary["failed"] == 2
    lines = sorted(describe_failure(c) for c in summary["checks"] if not c["success"])
    assert lines[0] == ("expect_column_values_to_be_between on short_side: 1 unexpected rows "
                        "(expected >= 32 (data.min_size)), e.g. ['8']")
    assert lines[1] == ("expect_table_row_count_to_be_between: got 6, expected >= 10 (validate.min_rows) and "
                        "<= 2000 (validate.max_rows)")
    assert all("None" not in line for line in lines)


def test_the_final_protocol_counts_evaluation_images_in_the_corpus_instead_of_refusing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate.evaluation_in_corpus``: ``refuse`` (the unseen-kinds protocol) fails on a scored
    image in the pretraining corpus; ``in_sample`` (the final protocol) keeps the column and passes."""
    from clic.params import validate_config

    monkeypatch.setattr(validate, "ROOT", tmp_path)
    df = _frame(12, 64)
    df.loc[df.index[-1], "short_side"] = 64
    df.loc[df.index[:3], "in_pretraining_corpus"] = "i0.png = corpus/a.jpg (identical pixels)"
    refused = run_suite(df, tmp_path / "gx", min_rows=1, max_rows=100, min_size=32)
    assert [describe_failure(c) for c in refused["checks"] if not c["success"]] == [
        "expect_column_values_to_be_null on in_pretraining_corpus: 3 unexpected rows (expected to hold), e.g. "
        "['i0.png = corpus/a.jpg (identical pixels)', 'i0.png = corpus/a.jpg (identical pixels)', "
        "'i0.png = corpus/a.jpg (identical pixels)']"]
    kept = run_suite(df, tmp_path / "gx2", min_rows=1, max_rows=100, min_size=32, corpus_may_hold=True)
    assert kept["success"] and len(kept["checks"]) == len(refused["checks"]) - 1
    assert validate_config({"validate": {"evaluation_in_corpus": "in_sample"}}).evaluation_in_corpus == "in_sample"
    with pytest.raises(ValueError, match="validate.evaluation_in_corpus: expected one of refuse, in_sample"):
        validate_config({"validate": {"evaluation_in_corpus": "yes"}})
