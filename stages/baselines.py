"""Stage ``baselines``: random-initialised encoders (one per architecture the methods use) and the
hand-crafted measures, probed on the same split/folds as the methods."""

from __future__ import annotations

from clic import methods
from clic.evaluation.evaluate import evaluate_handcrafted, evaluate_random
from clic.params import Params, data_config, pretrain_config, probe_config, to_dict
from stages import tracking
from stages.common import ROOT, main, write_json
from stages.probe import key_metrics, log_report


def baselines(p: Params) -> None:
    cfg, seed = probe_config(p), p.seed
    data_dir = ROOT / data_config(p).out_dir
    results: dict[str, dict] = {}
    with tracking.stage_run(p, "baselines", config={"probe": to_dict(cfg)}):
        archs = {}
        for m in methods.names():
            a = pretrain_config(p, m)
            archs.setdefault(f"random_{a.backbone}", a)
        if "random" in cfg.baselines:
            for name, arch in archs.items():
                report = evaluate_random(arch, data_dir, cfg, ROOT / "reports" / "baselines" / name, seed)
                results[name] = key_metrics(report)
                log_report(report, f"reports/baselines/{name}", prefix=f"{name}_", artifact_path=f"report/{name}")
                print(f"{name}: PCC {report['pcc']:.4f} SRCC {report['srcc']:.4f}")
        if "handcrafted" in cfg.baselines:
            report = evaluate_handcrafted(data_dir, cfg, ROOT / "reports" / "baselines" / "handcrafted", seed)
            zero_shot = {m: v["srcc"] for m, v in report["zero_shot"].items()}
            results["handcrafted"] = {**key_metrics(report), "zero_shot_srcc": zero_shot}
            log_report(report, "reports/baselines/handcrafted", prefix="handcrafted_",
                       artifact_path="report/handcrafted")
            tracking.mlflow.log_metrics({f"zero_shot_{m}_srcc": v for m, v in zero_shot.items()})
            print(f"handcrafted probe: SRCC {report['srcc']:.4f}; best zero-shot {report['best_zero_shot']} "
                  f"SRCC {report['best_zero_shot_srcc']:.4f}")
        write_json("metrics/baselines.json", results, sort_keys=True)


if __name__ == "__main__":
    main("baselines", baselines)
