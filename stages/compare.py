"""Stage ``compare``: one metrics file per method (probe + transfer), the comparison table of all
methods and baselines (``metrics/comparison.md``, also ``metrics/summary.json``), logged to MLflow;
closes the pipeline's parent run and says where everything is."""

from __future__ import annotations

import math

from clic import methods
from clic.params import Params, data_config
from stages import tracking
from stages.common import ROOT, main, read_json, write_json

COLS = ("pcc", "srcc", "krcc", "rmse")
SMOKE = ("Smoke run on synthetic shapes (tiny budget): it checks the pipeline, not the methods; learned encoders "
         "below random init here mean nothing. The real study: docs/results.md (`prefect deployment run "
         "study/real-photos`).")


def _load(path: str) -> dict:
    f = ROOT / path
    return read_json(f) if f.exists() else {}


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else ("—" if v is None else str(v))


def compare(p: Params) -> None:
    rows: dict[str, dict] = {}
    for m in methods.names():
        rows[m] = {**_load(f"metrics/probe/{m}.json"), **_load(f"metrics/transfer/{m}.json")}
        write_json(f"metrics/{m}.json", rows[m], sort_keys=True)
    rows.update(_load("metrics/baselines.json"))
    top = sorted({k for r in rows.values() for k in r if k.endswith("_top1")})
    header = ["model", *COLS, "srcc 95% CI", *top]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        ci = r.get("srcc_ci95")
        cells = [name, *(_fmt(r.get(c)) for c in COLS), f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—",
                 *(_fmt(r.get(t)) for t in top)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if data_config(p).source == "synthetic":
        table = SMOKE + "\n\n" + table
    (ROOT / "metrics" / "comparison.md").write_text(table)
    summary = {name: {k: r[k] for k in (*COLS, *top) if k in r} for name, r in rows.items()}
    write_json("metrics/summary.json", summary, sort_keys=True)
    with tracking.stage_run(p, "compare"):
        tracking.mlflow.log_artifact(str(ROOT / "metrics" / "comparison.md"))
        tracking.mlflow.log_artifact(str(ROOT / "metrics" / "summary.json"))
        for name, r in summary.items():
            tracking.mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in r.items()
                                         if isinstance(v, float) and not math.isnan(v)})
    parent = tracking.finish_parent(p)
    print(table)
    print("results: metrics/comparison.md, metrics/<method>.json, reports/<method>/ (plots), reports/gx (data docs)")
    exp = tracking.setup(p)
    print(f"MLflow: parent run {parent} in {tracking.tracking_uri(p)}; browse with `make mlflow-ui`: "
          f"{tracking.ui_link(f'experiments/{exp}')}")


if __name__ == "__main__":
    main("compare", compare)
