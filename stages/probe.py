"""Stage ``probe@<method>``: linear probe of the frozen encoder against human scores.

Writes ``reports/<method>/`` (metrics.json, predictions.csv, scatter.png, categories.png,
scorer.pt) and ``metrics/probe/<method>.json``; logs metrics and plots to MLflow; registers the
scorer as ``clic-<method>`` (alias ``current`` on every version: MLflow reserves ``latest``, which
``models:/clic-<method>/latest`` resolves anyway; ``champion`` moved only when the new SRCC beats
the champion's on the same dataset fingerprint).
"""

from __future__ import annotations

import base64
import io
import json
import logging

import pandas as pd

from clic.config import data_config, mlflow_config, probe_config, to_dict
from clic.data.synthetic import render
from clic.evaluation.evaluate import evaluate_encoder
from clic.scorer import load_scorer
from stages import tracking
from stages.common import ROOT, main, method_arg, params

KEYS = ("pcc", "srcc", "krcc", "rmse", "rmae", "mae", "pcc_ci95", "srcc_ci95", "n")
log = logging.getLogger("stages.probe")


def save_metrics(name: str, report: dict, folder: str = "probe") -> None:
    out = ROOT / "metrics" / folder / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: report[k] for k in KEYS if k in report}, indent=2) + "\n")


def log_report(report: dict, folder: str, prefix: str = "") -> None:
    keys = ("pcc", "srcc", "krcc", "rmse", "rmae", "mae")
    tracking.mlflow.log_metrics({f"{prefix}{k}": float(report[k]) for k in keys})
    for c, m in (report.get("per_category") or {}).items():
        tracking.mlflow.log_metrics({f"{prefix}srcc_{c}": float(m["srcc"]), f"{prefix}rmse_{c}": float(m["rmse"])})
    for f in ("metrics.json", "predictions.csv", "scatter.png", "categories.png"):
        if (ROOT / folder / f).exists():
            tracking.mlflow.log_artifact(str(ROOT / folder / f), "report")


def input_example() -> pd.DataFrame:
    img, _ = render(0, 0, 64, "mixed")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def register(method: str, scorer_path: str, report: dict, fingerprint: str) -> str:
    """Log the scorer as a pyfunc, register it, and move the aliases; returns the version."""
    from mlflow.models import infer_signature

    example = input_example()
    scorer = load_scorer(scorer_path, "cpu")
    from stages.scorer_model import ScorerModel

    preds = pd.DataFrame({"score": scorer([ScorerModel._image(example["image"][0])])})
    name = f"clic-{method}"
    info = tracking.mlflow.pyfunc.log_model(
        name="scorer", python_model=str(ROOT / "stages" / "scorer_model.py"), artifacts={"scorer": scorer_path},
        signature=infer_signature(example, preds), input_example=example, registered_model_name=name,
        pip_requirements=["clic", "torch", "torchvision", "timm", "pillow", "pandas"])
    client = tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "dataset_fingerprint", fingerprint)
    client.set_model_version_tag(name, version, "srcc", f"{report['srcc']:.6f}")
    # MLflow 3 reserves the alias name "latest" (models:/clic-<method>/latest already resolves to the
    # newest version), so the moving "newest version" alias is called "current"
    client.set_registered_model_alias(name, "current", version)
    promote, champion = beats_champion(client, name, float(report["srcc"]), fingerprint)
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    log.info("registered %s version %s (champion: %s)", name, version, version if promote else champion)
    return version


def beats_champion(client: tracking.MlflowClient, name: str, srcc: float, fingerprint: str) -> tuple[bool, str]:
    """Whether a new version with this SRCC takes the ``champion`` alias of model ``name``, and
    the champion's version. Compares like with like: the champion's SRCC as its probe run logged it
    (full precision; the model-version tag is rounded for display), on the same dataset fingerprint;
    a tie keeps the champion."""
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no champion yet
        return True, ""
    if champ.tags.get("dataset_fingerprint") != fingerprint:
        return False, str(champ.version)
    best = client.get_run(champ.run_id).data.metrics.get("srcc") if champ.run_id else None
    if best is None:  # a version registered without its probe run: the tag is all there is
        best = float(champ.tags.get("srcc", "-inf"))
    return srcc > best, str(champ.version)


def probe() -> None:
    method = method_arg()
    p = params()
    cfg, seed = probe_config(p), int(p.get("seed", 0))
    data_dir = ROOT / data_config(p).out_dir
    folder = f"reports/{method}"
    fingerprint = json.loads((data_dir / "meta.json").read_text())["fingerprint"]
    with tracking.stage_run(p, "probe", method, {"probe": to_dict(cfg)},
                            {"clic.dataset_fingerprint": fingerprint}) as active:
        report = evaluate_encoder(ROOT / "models" / method / "encoder.pt", data_dir, cfg, ROOT / folder, seed,
                                  cache_dir=ROOT / "data" / "features", name=method)
        save_metrics(method, report)
        log_report(report, folder)
        version = ""
        if mlflow_config(p).register:
            version = register(method, str(ROOT / folder / "scorer.pt"), report, fingerprint)
        print(f"{method}: PCC {report['pcc']:.4f} SRCC {report['srcc']:.4f} KRCC {report['krcc']:.4f} "
              f"RMSE {report['rmse']:.4f} (run {active.info.run_id}{', model version ' + version if version else ''})")


if __name__ == "__main__":
    main("probe", probe)
