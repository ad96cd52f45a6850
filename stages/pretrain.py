"""Stage ``pretrain@<method>``: self-supervised pretraining into ``models/<method>/``.

``checkpoint.pt`` is a DVC ``persist`` output: a re-run after a kill resumes; a changed config or
changed package code starts over. Per-epoch metrics go to MLflow (step = epoch) and to
``plots/train/<method>.csv`` for ``dvc plots``. With ``nprocs > 1`` the stage launches torchrun.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from typing import Any

from clic.params import Params, data_config, pretrain_config, to_dict
from clic.pretrain import run
from stages import tracking
from stages.common import ROOT, main, read_json


def epoch_metrics(method: str) -> list[dict[str, Any]]:
    """The rows of ``models/<method>/metrics.jsonl``, one per epoch."""
    lines = (ROOT / "models" / method / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def write_curve(method: str, rows: list[dict[str, Any]]) -> None:
    out = ROOT / "plots" / "train" / f"{method}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)


def pretrain(p: Params, method: str) -> None:
    cfg = pretrain_config(p, method)
    data_dir = ROOT / data_config(p).out_dir
    out = ROOT / "models" / method
    fingerprint = read_json(data_dir / "meta.json")["fingerprint"]
    with tracking.stage_run(p, "pretrain", method, to_dict(cfg), {"clic.dataset_fingerprint": fingerprint}) as active:
        tracking.mlflow.log_param("lr_absolute", cfg.lr(cfg.nprocs))
        if cfg.nprocs > 1 and "LOCAL_RANK" not in os.environ:
            # multi-process: torchrun runs the core CLI; metrics are read back from metrics.jsonl
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nprocs}", "-m", "clic.cli",
                   "pretrain", "--method", method, "--out", str(out), "--data", str(data_dir), "--no-progress"]
            subprocess.run(cmd, check=True, cwd=ROOT)
            for m in epoch_metrics(method):
                tracking.mlflow.log_metrics({k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
        else:
            run(cfg, data_dir, out, progress=sys.stderr.isatty(), code_version=tracking.code_version(),
                on_epoch=lambda e, m: tracking.mlflow.log_metrics(m, step=e))
        write_curve(method, epoch_metrics(method))
        tracking.mlflow.log_artifact(str(ROOT / "plots" / "train" / f"{method}.csv"))
        print(f"pretrained {method}: {out / 'encoder.pt'} (MLflow run {active.info.run_id})")


if __name__ == "__main__":
    main("pretrain", pretrain, per_method=True)
