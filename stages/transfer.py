"""Stage ``transfer@<method>``: linear classification probe on ``transfer.path`` (an ImageFolder);
``<name>_top1``/``<name>_top5`` into ``metrics/transfer/<method>.json`` and MLflow."""

from __future__ import annotations

from clic.embed import load_encoder
from clic.evaluation.transfer import transfer_probe
from clic.params import Params, to_dict, transfer_config
from stages import tracking
from stages.common import ROOT, main, write_json


def transfer(p: Params, method: str) -> None:
    cfg = transfer_config(p)
    with tracking.stage_run(p, "transfer", method, {"transfer": to_dict(cfg)}):
        backbone, pcfg = load_encoder(ROOT / "models" / method / "encoder.pt")
        metrics = transfer_probe(backbone, pcfg.image_size, ROOT / cfg.path, cfg.name,
                                 ROOT / "data" / f".transfer-{method}", cfg.epochs, cfg.lr, cfg.batch_size,
                                 cfg.workers, seed=p.seed)
        write_json(f"metrics/transfer/{method}.json", metrics, sort_keys=True)
        tracking.mlflow.log_metrics(metrics)
        print(f"{method}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main("transfer", transfer, per_method=True)
