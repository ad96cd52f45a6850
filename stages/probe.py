"""Stage ``probe@<method>``: linear probe of the frozen encoder against human scores, into
``reports/<method>/`` and ``metrics/probe/<method>.json``, logged to MLflow; the scorer is registered
as ``clic-<method>`` with alias ``current`` on every version and ``champion`` moved only by
:func:`champion_decision` (docs/usage.md, "Choosing the champion").
"""

from __future__ import annotations

import base64
import csv
import io
import logging
from importlib import metadata
from pathlib import Path

import pandas as pd

from clic.data.synthetic import render
from clic.evaluation.evaluate import evaluate_encoder
from clic.evaluation.metrics import paired_srcc_difference
from clic.params import Params, data_config, mlflow_config, probe_config, to_dict
from clic.scorer import load_scorer
from stages import tracking
from stages.common import ROOT, main, read_json, write_json

METRICS = ("pcc", "srcc", "krcc", "rmse", "rmae", "mae")  # logged to MLflow
KEYS = (*METRICS, "pcc_ci95", "srcc_ci95", "n")  # written to the metrics files
# what the logged scorer imports (clic's core at load time), all from PyPI, pinned as installed (the
# pins of requirements/lock.txt in a `make`-built environment); clic itself travels in the model as code
SCORER_PACKAGES = ("torch", "torchvision", "timm", "numpy", "scipy", "pillow", "pandas", "pyyaml", "tqdm",
                   "huggingface-hub", "safetensors")
log = logging.getLogger("stages.probe")


def key_metrics(report: dict) -> dict:
    return {k: report[k] for k in KEYS if k in report}


def log_report(report: dict, folder: str, prefix: str = "", artifact_path: str = "report") -> None:
    """The report's metrics (``<prefix>srcc``, ``<prefix>srcc_<category>``, ...) and files (under
    ``artifact_path``) into the active MLflow run."""
    tracking.mlflow.log_metrics({f"{prefix}{k}": float(report[k]) for k in METRICS})
    for c, m in (report.get("per_category") or {}).items():
        tracking.mlflow.log_metrics({f"{prefix}srcc_{c}": float(m["srcc"]), f"{prefix}rmse_{c}": float(m["rmse"])})
    for f in ("metrics.json", "predictions.csv", "validation.csv", "scatter.png", "categories.png"):
        if (ROOT / folder / f).exists():
            tracking.mlflow.log_artifact(str(ROOT / folder / f), artifact_path)


def input_example() -> pd.DataFrame:
    img, _ = render(0, 0, 64, "mixed")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def register(method: str, scorer_path: str, report: dict, fingerprint: str, validation: str) -> str:
    """Log the scorer as a pyfunc (with its code and pinned requirements), register it, move the
    aliases; returns the version. ``validation``: this probe's ``validation.csv``."""
    from mlflow.models import infer_signature

    from stages.scorer_model import ScorerModel

    example = input_example()
    preds = ScorerModel.score_rows(load_scorer(scorer_path, "cpu"), example["image"])
    name = f"clic-{method}"
    info = tracking.mlflow.pyfunc.log_model(
        name="scorer", python_model=str(ROOT / "stages" / "scorer_model.py"), artifacts={"scorer": scorer_path},
        code_paths=[str(ROOT / "clic")], signature=infer_signature(example, preds), input_example=example,
        registered_model_name=name, pip_requirements=[f"{p}=={metadata.version(p)}" for p in SCORER_PACKAGES])
    client = tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "dataset_fingerprint", fingerprint)
    client.set_model_version_tag(name, version, "srcc", f"{report['srcc']:.6f}")
    # MLflow 3 reserves the alias name "latest" (models:/clic-<method>/latest already resolves to the
    # newest version), so the moving "newest version" alias is called "current"
    client.set_registered_model_alias(name, "current", version)
    promote, why = champion_decision(client, name, fingerprint, validation)
    client.set_model_version_tag(name, version, "champion_decision", why)
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    log.info("registered %s version %s: %s", name, version, why)
    return version


def read_validation(path: str | Path) -> dict[str, tuple[float, float]]:
    """``validation.csv`` as name -> (human, predicted)."""
    with open(path, newline="") as fh:
        return {r["name"]: (float(r["human"]), float(r["predicted"])) for r in csv.DictReader(fh)}


def champion_decision(client: tracking.MlflowClient, name: str, fingerprint: str, validation: str,
                      n_boot: int = 2000) -> tuple[bool, str]:
    """Whether the new version (validation predictions in ``validation``) takes the ``champion``
    alias of model ``name``, and why. It does when there is no champion, or when, on the same
    validation images of the same dataset, a paired bootstrap of the SRCC difference puts its
    one-sided 95% lower bound above zero: better by more than the noise of those images. Test
    images never enter the decision."""
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no champion yet
        return True, "first version of this model: champion"
    if champ.tags.get("dataset_fingerprint") != fingerprint:
        return False, (f"champion version {champ.version} kept: it was validated on another dataset "
                       f"({champ.tags.get('dataset_fingerprint')}), so the two cannot be compared")
    try:
        local = client.download_artifacts(champ.run_id, "report/validation.csv")
        old = read_validation(local)
    except Exception as exc:  # noqa: BLE001 - an older version without validation predictions
        return False, f"champion version {champ.version} kept: it has no validation predictions to compare ({exc})"
    new = read_validation(validation)
    if set(new) != set(old):
        return False, (f"champion version {champ.version} kept: its validation images differ from this version's "
                       "(another seed or probe.validation_fraction)")
    names = sorted(new)
    human = [new[n][0] for n in names]
    d = paired_srcc_difference([new[n][1] for n in names], [old[n][1] for n in names], human, n_boot)
    verdict = "> 0: promoted" if d["lower"] > 0 else f"<= 0: champion version {champ.version} kept"
    return d["lower"] > 0, (f"validation SRCC difference against version {champ.version} on {len(names)} images: "
                            f"{d['diff']:+.4f}, one-sided 95% lower bound {d['lower']:+.4f} {verdict}")


def probe(p: Params, method: str) -> None:
    cfg = probe_config(p)
    data_dir = ROOT / data_config(p).out_dir
    folder = f"reports/{method}"
    fingerprint = read_json(data_dir / "meta.json")["fingerprint"]
    with tracking.stage_run(p, "probe", method, {"probe": to_dict(cfg)},
                            {"clic.dataset_fingerprint": fingerprint}) as active:
        report = evaluate_encoder(ROOT / "models" / method / "encoder.pt", data_dir, cfg, ROOT / folder,
                                  p.seed, cache_dir=ROOT / "data" / "features", name=method)
        write_json(f"metrics/probe/{method}.json", key_metrics(report))
        log_report(report, folder)
        version = ""
        if mlflow_config(p).register:
            version = register(method, str(ROOT / folder / "scorer.pt"), report, fingerprint,
                               str(ROOT / folder / "validation.csv"))
        print(f"{method}: PCC {report['pcc']:.4f} SRCC {report['srcc']:.4f} KRCC {report['krcc']:.4f} "
              f"RMSE {report['rmse']:.4f} (run {active.info.run_id}{', model version ' + version if version else ''})")
        if version:
            print(f"model: {tracking.ui_link(f'models/clic-{method}/versions/{version}')}")


if __name__ == "__main__":
    main("probe", probe, per_method=True)
