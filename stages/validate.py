"""Stage ``validate``: a great-expectations suite (:func:`build_suite`) over the prepared table, its
images and the pretraining corpus ``pretrain.data`` (no evaluation image in it). Writes ``reports/gx``
(Data Docs) and ``metrics/validation.json``; on failure it prints each failed expectation with its
count and example rows and exits non-zero, so nothing downstream runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from clic import methods
from clic.data.corpus import (
    CORPUS_DIR,
    INDEX_NAME,
    corpus_hashes,
    corpus_records,
    evaluation_hashes,
    evaluation_records,
    leaks,
)
from clic.data.imageio import ImageError, load_rgb
from clic.data.shards import is_url
from clic.data.table import COLUMNS, SPLITS, read_table, resolve
from clic.params import Params, data_config, pretrain_config, probe_config, to_dict, validate_config
from stages import tracking
from stages.common import ROOT, main, write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _short_side(path: Path) -> int:
    """The image's shorter side in pixels; 0 when it cannot be read."""
    try:
        return min(load_rgb(path).size)
    except ImageError:
        return 0


def table_frame(data_dir: Path, mode: str = "split") -> pd.DataFrame:
    """The prepared table with the checked columns. ``leaks_across_splits``: an image whose pixels
    (sha256) are on both sides of the evaluation's split: train and test for ``probe.mode: split``;
    for ``cv`` (k-fold inside each category) twice in one category, where two folds could hold it.
    The same image in two categories (SAVOIAS scores some in both Art and Suprematism) is no leak
    under ``cv``: categories are fitted and scored apart."""
    rows = read_table(data_dir)
    df = pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS))
    short = [_short_side(resolve(data_dir, r.path)) for r in rows]
    df["image_readable"] = [s > 0 for s in short]  # a decoded image is at least 1 px on each side
    df["short_side"] = short
    if mode == "cv":
        df["leaks_across_splits"] = df.duplicated(["category", "sha256"], keep=False)
    else:
        train = set(df.loc[df.split == "train", "sha256"])
        test = set(df.loc[df.split == "test", "sha256"])
        df["leaks_across_splits"] = df.sha256.isin(train & test)
    return df


def mark_corpus_leaks(df: pd.DataFrame, p: Params) -> dict[str, Any]:
    """Column ``in_pretraining_corpus``: for an evaluation image whose pixels, or a resized or
    re-encoded copy of them (perceptual hash within ``validate.near_duplicate_bits``), are in the
    pretraining corpus, ``"<image> = <corpus image> (...)"`` (so a failure names both), else null.
    Returns the corpus summary for ``metrics/validation.json``."""
    df["in_pretraining_corpus"] = None
    entries = pretrain_config(p, methods.names()[0]).data
    if not entries:
        return {"entries": [], "images": 0}
    dcfg, bits = data_config(p), validate_config(p).near_duplicate_bits
    anchored = [e if is_url(e) else str(ROOT / e) for e in entries]  # URLs (shard indexes) stay as they are
    records = corpus_records(anchored, ROOT / CORPUS_DIR, dcfg.max_archive_bytes,
                             dcfg.max_member_bytes, dcfg.max_archive_ratio)
    index = ROOT / CORPUS_DIR / INDEX_NAME
    hashes = corpus_hashes(records, index, max_pixels=dcfg.max_pixels)
    evaluation = evaluation_hashes(evaluation_records(read_table(ROOT / dcfg.out_dir), probe_config(p).mode),
                                   ROOT / dcfg.out_dir, index)
    found: dict[str, list[str]] = {}
    for leak in leaks(hashes, evaluation, bits):
        found.setdefault(leak.evaluation, []).append(str(leak))
    df["in_pretraining_corpus"] = ["; ".join(found[n]) if n in found else None for n in df.name]
    print(f"pretraining corpus: {len(records)} images ({hashes.hashed} hashed now, {len(hashes.errors)} unreadable); "
          f"{len(found)} evaluation images in it (identical or within {bits} perceptual-hash bits)")
    return {"entries": list(entries), "images": len(records), "unreadable": len(hashes.errors),
            "unreadable_examples": sorted(hashes.errors)[:5], "evaluation_images_in_corpus": len(found),
            "near_duplicate_bits": bits}


def build_suite(gx: Any, gxe: Any, min_rows: int, max_rows: int, min_size: int, corpus_may_hold: bool = False) -> Any:
    corpus = [] if corpus_may_hold else [gxe.ExpectColumnValuesToBeNull(column="in_pretraining_corpus")]
    return gx.ExpectationSuite(name="prepared_dataset", expectations=[
        *(gxe.ExpectColumnToExist(column=col) for col in COLUMNS),
        *(gxe.ExpectColumnValuesToNotBeNull(column=col) for col in ("name", "path", "split", "sha256")),
        gxe.ExpectColumnValuesToBeUnique(column="name"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, max_value=max_rows),
        gxe.ExpectColumnValuesToBeInSet(column="image_readable", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="short_side", min_value=min_size),
        gxe.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False]), *corpus])


def run_suite(df: pd.DataFrame, site_root: Path, min_rows: int, max_rows: int, min_size: int,
              corpus_may_hold: bool = False) -> dict[str, Any]:
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction

    shutil.rmtree(site_root, ignore_errors=True)
    site_root.mkdir(parents=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(site_root))
    batch_def = ctx.data_sources.add_pandas("prepared").add_dataframe_asset("table") \
        .add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(build_suite(gx, gxe, min_rows, max_rows, min_size, corpus_may_hold))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch_def, suite=suite, name="prepared"))
    cp = ctx.checkpoints.add(gx.Checkpoint(name="prepared", validation_definitions=[vd],
                                           actions=[UpdateDataDocsAction(name="docs")],
                                           result_format={"result_format": "SUMMARY"}))
    result = cp.run(batch_parameters={"dataframe": df})
    checks = []
    for vr in result.run_results.values():
        for r in vr.results:
            cfg = r.expectation_config
            res = r.result or {}
            checks.append({"expectation": cfg.type, "column": cfg.kwargs.get("column"), "success": bool(r.success),
                           "expected": {k: cfg.kwargs[k] for k in ("min_value", "max_value", "value_set")
                                        if cfg.kwargs.get(k) is not None},
                           "unexpected_count": res.get("unexpected_count"),
                           "examples": [str(x) for x in (res.get("partial_unexpected_list") or [])[:5]],
                           "observed_value": res.get("observed_value")})
    docs = next(iter(site_root.rglob("local_site/index.html")), None)
    return {"success": bool(result.success), "rows": len(df), "checks": checks,
            "failed": sum(not c["success"] for c in checks), "data_docs": str(docs.relative_to(ROOT)) if docs else ""}


BOUND_KEYS = {"expect_table_row_count_to_be_between": ("validate.min_rows", "validate.max_rows"),
              "short_side": ("data.min_size", "")}


def _plain(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def describe_failure(check: dict[str, Any]) -> str:
    """One line for a failed expectation: what was expected (the bounds, and the params that set
    them), what was found, and example rows."""
    expected = check.get("expected") or {}
    lo, hi = (_plain(expected.get(k)) for k in ("min_value", "max_value"))
    lo_key, hi_key = BOUND_KEYS.get(check["expectation"], BOUND_KEYS.get(check["column"] or "", ("", "")))
    parts = []
    if lo is not None:
        parts.append(f">= {lo}" + (f" ({lo_key})" if lo_key else ""))
    if hi is not None:
        parts.append(f"<= {hi}" + (f" ({hi_key})" if hi_key else ""))
    if "value_set" in expected:
        parts.append(f"in {expected['value_set']}")
    want = f"expected {' and '.join(parts)}" if parts else "expected to hold"
    where = f" on {check['column']}" if check["column"] else ""
    if check["unexpected_count"] is None:  # a table-level expectation: no rows to count
        return f"{check['expectation']}{where}: got {check['observed_value']}, {want}"
    return (f"{check['expectation']}{where}: {check['unexpected_count']} unexpected rows ({want}), "
            f"e.g. {check['examples'] or check['observed_value']}")


def validate(p: Params) -> None:
    dcfg, vcfg = data_config(p), validate_config(p)
    with tracking.stage_run(p, "validate", config={"validate": to_dict(vcfg)}):
        df = table_frame(ROOT / dcfg.out_dir, probe_config(p).mode)
        corpus = mark_corpus_leaks(df, p)
        in_sample = vcfg.evaluation_in_corpus == "in_sample"
        summary = run_suite(df, ROOT / "reports" / "gx", vcfg.min_rows, vcfg.max_rows, dcfg.min_size, in_sample)
        corpus["evaluation_images_in_corpus"] = int(df.in_pretraining_corpus.notna().sum())
        summary["corpus"] = corpus
        if in_sample:
            print(f"validate.evaluation_in_corpus=in_sample: {corpus['evaluation_images_in_corpus']} of "
                  f"{len(df)} evaluation images are in the pretraining corpus; the probe's numbers are in-sample "
                  "for pretraining (the final protocol)")
        out = write_json("metrics/validation.json", summary, default=str)
        tracking.mlflow.log_metrics({"validation_failed": float(summary["failed"]), "rows": float(summary["rows"]),
                                     "corpus_images": float(corpus["images"])})
        tracking.mlflow.log_artifact(str(out))
        # run_suite made reports/gx afresh
        tracking.mlflow.log_artifacts(str(ROOT / "reports" / "gx" / "gx" / "uncommitted" / "data_docs"), "gx_docs")
        print(f"data docs: {summary['data_docs']}")
        if not summary["success"]:
            head = f"validation failed: {summary['failed']} of {len(summary['checks'])} expectations"
            failed = [f"  - {describe_failure(c)}" for c in summary["checks"] if not c["success"]]
            print("\n".join([head, *failed]), file=sys.stderr)
            raise ValueError(head)
        print(f"validation passed: {len(summary['checks'])} expectations on {summary['rows']} rows")


if __name__ == "__main__":
    main("validate", validate)
