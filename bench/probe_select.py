"""Where the gap to the hand-crafted measures may be, measured on the probe side without retraining:
pooled features of several depths (``probe.features: stages``, texture density lives in early
layers) and the probe's input size, on the encoders of a ``bench/real_data.py --seeds`` run.

    python bench/probe_select.py runs/seeds/main --out runs/probe-select --select Scenes

Every (features, size) setting probes every seed's encoders on the same folds as the run did, and
writes ``OUT/<setting>/seed-<s>/reports/<method>/predictions.csv`` (so ``bench/seed_table.py``
compares settings with intervals over seeds and images). The setting of each method is chosen
on the ``--select`` category alone (mean SRCC over seeds); ``OUT/selection.json`` holds every
setting's per-category means and which was chosen on what. Only the other categories report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import parser  # this folder's shared helpers (on sys.path)
from seed_table import Study, read_rows

from clic.data.prepare import prepare
from clic.evaluation.evaluate import evaluate_encoder
from clic.params import data_config, load_params, probe_config


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("run", type=Path, help="a real_data.py --seeds output folder (seed-<s>/models/<method>/)")
    ap.add_argument("--params", default="params/real-photos.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/probe-select"))
    ap.add_argument("--select", default="Scenes")
    ap.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 160])
    ap.add_argument("--features", nargs="+", default=["last", "stages"])
    args = ap.parse_args()
    params = load_params(args.params)
    data_dir = prepare(data_config(params), int(params.get("seed", 0)))
    summary: dict[str, Any] = {"selected_on": args.select, "settings": {}, "chosen": {}}
    for features, size in [(f, s) for f in args.features for s in args.sizes]:
        name = f"{features}-{size}"
        cfg = probe_config({"probe": {**params["probe"], "features": features, "image_size": size,
                                      "validation_fraction": 0.0}})
        for seed_dir in sorted(args.run.glob("seed-*")):
            seed = int(seed_dir.name.split("-", 1)[1])
            for encoder in sorted(seed_dir.glob("models/*/encoder.pt")):
                method = encoder.parent.name
                out = args.out / name / seed_dir.name / "reports" / method
                if (out / "predictions.csv").is_file():
                    continue  # resumable: a setting probed before is kept
                evaluate_encoder(encoder, data_dir, cfg, out, seed)
                print(f"{name} {seed_dir.name} {method}: done", flush=True)
        study = Study(read_rows([args.out / name]))
        summary["settings"][name] = {row: study.summary(row) for row in study.pred}
    for method in sorted({m for s in summary["settings"].values() for m in s}):
        scored = {n: s[method][args.select]["mean"] for n, s in summary["settings"].items() if method in s}
        best = max(scored, key=lambda n: scored[n])
        summary["chosen"][method] = {"setting": best, f"{args.select}_srcc": scored[best],
                                     "others": {c: v["mean"] for c, v in summary["settings"][best][method].items()
                                                if c != args.select}}
    (args.out / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")
    cats = [c for c in next(iter(next(iter(summary["settings"].values())).values())) if c != "all"]
    print(f"| setting | method | {' | '.join(cats)} | all |\n|---|---|" + "---|" * (len(cats) + 1))
    for name, rows in summary["settings"].items():
        for method, s in rows.items():
            mark = " (chosen)" if summary["chosen"][method]["setting"] == name else ""
            cells = [f"{s[c]['mean']:.3f}" + ("*" if c == args.select else "") for c in [*cats, "all"]]
            print(f"| {name}{mark} | {method} | {' | '.join(cells)} |")
    print(f"\n* the selection category ({args.select}): settings were chosen on it; the others report.")


if __name__ == "__main__":
    main()
