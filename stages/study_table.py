"""A study's seed table from MLflow alone: the study's cell runs (tag ``clic.study``), each cell's
finished probe or baselines run, and their ``predictions.csv`` artifacts, into
:mod:`clic.evaluation.seed_table` (means and spreads over seeds, paired differences with intervals
over seeds and images). ``clic study table <name>`` prints it; the study flow logs it on the study's
run (``study.md``, ``study.json``) and as a Prefect artifact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clic import methods
from clic.evaluation.seed_table import Rows, Study, default_pairs, markdown, read_predictions
from clic.params import Params
from stages import tracking
from stages.tracking import ui_link

RESULT_STAGES = ("probe", "baselines")


def cell_runs(client: Any, study: str, cell: str = "") -> list[Any]:
    """The study's cell runs (newest first), or those of one cell."""
    query = f"tags.`clic.study` = '{study}' and tags.`clic.kind` = 'pipeline'"
    if cell:
        query += f" and tags.`clic.cell` = '{cell}'"
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps, query, max_results=5000, order_by=["attributes.start_time DESC"]))


def result_run(client: Any, cell_run: str) -> Any | None:
    """The newest finished probe or baselines run under the cell's run, or None."""
    parent = client.get_run(cell_run)
    found = client.search_runs([parent.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{cell_run}' and attributes.status = 'FINISHED'",
                               max_results=100, order_by=["attributes.start_time DESC"])
    return next((r for r in found if r.data.tags.get("clic.stage") in RESULT_STAGES), None)


def _predictions(client: Any, run_id: str, path: str, scratch: Path) -> dict:
    local = client.download_artifacts(run_id, path, str(scratch))
    with open(local, newline="") as fh:
        return read_predictions(fh)


def study_rows(client: Any, study: str) -> tuple[Rows, dict[str, Any]]:
    """row -> seed -> predictions for every finished cell of the study, and per row the MLflow runs
    they came from. Rows: ``<method>``, ``<variant>/<method>`` for a variant other than the
    profile's own, and the baselines (``random_<backbone>``, ``handcrafted``). ``ValueError`` when
    the study has no finished cell."""
    rows: Rows = {}
    sources: dict[str, dict[int, str]] = {}
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for run in cell_runs(client, study):
            tags = run.data.tags
            if tags.get("clic.cell") in seen:  # newest first: an older run of the same cell is ignored
                continue
            seen.add(tags.get("clic.cell", ""))
            result = result_run(client, run.info.run_id)
            if result is None:
                continue
            seed, method, variant = int(tags["clic.seed"]), tags["clic.method"], tags.get("clic.variant", "recipe")
            scratch = Path(tmp) / run.info.run_id
            if method == "baselines":
                for entry in client.list_artifacts(result.info.run_id, "report"):
                    if entry.is_dir:
                        row = Path(entry.path).name
                        rows.setdefault(row, {})[seed] = _predictions(
                            client, result.info.run_id, f"{entry.path}/predictions.csv", scratch)
                        sources.setdefault(row, {})[seed] = run.info.run_id
            else:
                row = method if variant == "recipe" else f"{variant}/{method}"
                rows.setdefault(row, {})[seed] = _predictions(client, result.info.run_id, "report/predictions.csv",
                                                              scratch)
                sources.setdefault(row, {})[seed] = run.info.run_id
    if not rows:
        store = os.environ.get("MLFLOW_TRACKING_URI", "")
        raise ValueError(f"study {study!r}: no finished cell in the MLflow store {store}"
                         " (run it: prefect deployment run study/<name>)")
    order = [m for m in methods.names() if m in rows] + sorted(r for r in rows if "/" in r) + \
        sorted(r for r in rows if r not in methods.names() and "/" not in r)
    return {r: rows[r] for r in order}, {r: sources[r] for r in order}


def random_rows(profile: str) -> dict[str, str]:
    """method -> the baselines row of its architecture at random init (``random_<backbone>``)."""
    from clic.params import default_params, load_params, pretrain_config
    from flows.workspace import ROOT

    path = Path(profile) if Path(profile).is_absolute() else ROOT / profile
    params = load_params(path) if path.is_file() else default_params()
    return {m: f"random_{pretrain_config(params, m).backbone}" for m in methods.names()}


def study_table(client: Any, study: str, n_boot: int = 2000) -> dict[str, Any]:
    """The table as JSON (rows: per category mean, sd and per-seed SRCC; differences with 95%
    intervals; the MLflow runs of each row) and as markdown."""
    rows, sources = study_rows(client, study)
    profile = ""
    studies = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 f"tags.`clic.kind` = 'study' and tags.`clic.study` = '{study}'", max_results=1)
    if studies:
        profile = studies[0].data.tags.get("clic.profile", "")
    table = Study(rows)
    pairs = default_pairs(list(rows), list(methods.names()), random_rows(profile) if profile else {})
    diffs = [table.difference(a, b, n_boot) for a, b in dict.fromkeys(pairs)]
    md = (f"Study `{study}`: {len(table.names)} images; SRCC mean ± sd over seeds; differences with 95% intervals "
          "over seeds and images (bold: the interval excludes zero)\n\n" + markdown(table, diffs))
    return {"json": {"study": study, "profile": profile, "images": len(table.names),
                     "rows": {r: {**table.summary(r), "runs": sources[r]} for r in rows}, "differences": diffs},
            "markdown": md}


def read_study_table(params: Params, study: str, n_boot: int = 2000) -> dict[str, Any]:
    """:func:`study_table` from the MLflow store that ``params`` name (``clic study table``)."""
    tracking.mlflow.set_tracking_uri(tracking.tracking_uri(params))  # as the stages set it
    return study_table(tracking.MlflowClient(), study, n_boot)


def publish_table(client: Any, study: str, parent: str, failed: dict[str, str]) -> dict[str, Any]:
    """The table logged on the study's run (``study.md``, ``study.json``), its key numbers as the
    run's metrics; returns the markdown (with links to the cells' runs and any failures) and the
    table."""
    try:
        result = study_table(client, study)
    except ValueError as exc:
        return {"markdown": f"# study {study}\n\n{exc}\n", "table": {}}
    table = result["json"]
    client.log_text(parent, result["markdown"], "study.md")
    client.log_text(parent, json.dumps(table, indent=2) + "\n", "study.json")
    for row, summary in table["rows"].items():
        for cat, v in summary.items():
            if isinstance(v, dict) and "mean" in v:
                client.log_metric(parent, f"{row.replace('/', '.')}_srcc_{cat}", v["mean"])
    exp = client.get_run(parent).info.experiment_id
    links = [f"- {row} seed {seed}: [{rid}]({ui_link(f'experiments/{exp}/runs/{rid}')})"
             for row, seeds in table["rows"].items() for seed, rid in sorted(seeds["runs"].items())]
    study_link = ui_link(f"experiments/{exp}/runs/{parent}")
    md = [f"# study {study}", "", result["markdown"], "", f"Study run: [{parent}]({study_link})", "", "Cells:", *links]
    if failed:
        md += ["", "Failed cells:", *(f"- {k}: {v}" for k, v in failed.items())]
    return {"markdown": "\n".join(md) + "\n", "table": table}
