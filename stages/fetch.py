"""Stage ``fetch``: the dataset named in params -> ``data/prepared``; the transfer set -> ``data/transfer``."""

from __future__ import annotations

from clic.data.prepare import prepare, prepare_transfer
from clic.params import Params, data_config, to_dict
from stages import tracking
from stages.common import ROOT, main, read_json


def fetch(p: Params) -> None:
    cfg = data_config(p)
    seed = cfg.seed_for(p.seed)
    with tracking.stage_run(p, "fetch", config={"data": to_dict(cfg)}):
        (ROOT / cfg.raw_dir).mkdir(parents=True, exist_ok=True)  # a DVC output even when unused
        out = prepare(cfg, seed)
        meta = read_json(out / "meta.json")
        tracking.mlflow.set_tag("clic.dataset_fingerprint", meta["fingerprint"])
        tracking.mlflow.log_metrics({f"images_{k}": float(v) for k, v in meta["counts"].items()})
        # the synthetic labelled set is tiny and always written; transfer.path may point elsewhere
        prepare_transfer(cfg, ROOT / "data" / "transfer", seed)
        print(f"prepared {sum(meta['counts'].values())} images ({meta['counts']}) into {out}; "
              f"fingerprint {meta['fingerprint']}")


if __name__ == "__main__":
    main("fetch", fetch)
