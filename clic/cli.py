"""The ``clic`` command line.

    clic data prepare [--params params.yaml] [--set key=value ...]
    clic pretrain --method {moco,clic,clicv2} --out DIR [--data DIR] [--set key=value ...]
    clic embed --model CHECKPOINT --out FEATURES.npz IMAGE_OR_FOLDER...

Overrides use the dotted paths of ``params.yaml`` (``--set pretrain.clicv2.epochs=3``); for
``pretrain`` a key may also be given relative to the method's section (``--set epochs=3``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from clic.config import METHODS, data_config, load_params, pretrain_config, to_dict

log = logging.getLogger("clic")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clic", description="Unsupervised image-complexity representation "
                                 "(CLIC / CLICv2): prepare data, pretrain, embed.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="turn the source named in params into the prepared format")
    _common(prep)
    prep.add_argument("--transfer", default="", metavar="DIR",
                      help="also write the synthetic labelled classification set to DIR")

    pre = sub.add_parser("pretrain", help="self-supervised pretraining (resumes from DIR/checkpoint.pt)")
    _common(pre)
    pre.add_argument("--method", required=True, choices=METHODS)
    pre.add_argument("--out", required=True, help="output folder (checkpoint.pt, encoder.pt, metrics.jsonl)")
    pre.add_argument("--data", default="", help="prepared dataset folder (default: data.out_dir)")
    pre.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    pre.add_argument("--no-progress", action="store_true")

    emb = sub.add_parser("embed", help="frozen-encoder features for images or folders")
    emb.add_argument("--model", required=True, help="encoder.pt or checkpoint.pt")
    emb.add_argument("--out", required=True, help="output .npz with arrays paths and features")
    emb.add_argument("--batch-size", type=int, default=64)
    emb.add_argument("--workers", type=int, default=2)
    emb.add_argument("--device", default=None)
    emb.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    return ap


def _method_overrides(method: str, overrides: list[str]) -> list[str]:
    """``epochs=3`` -> ``pretrain.<method>.epochs=3``; fully dotted keys pass through."""
    tops = ("seed", "data.", "pretrain.", "probe.", "transfer.", "mlflow.", "eval.")
    return [o if o.startswith(tops) else f"pretrain.{method}.{o}" for o in overrides]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "data":
            from clic.data.prepare import prepare, prepare_transfer

            params = load_params(args.params, args.overrides)
            dcfg = data_config(params)
            out = prepare(dcfg, seed=int(params.get("seed", 0)))
            print(f"prepared dataset: {out}")
            if args.transfer:
                print(f"transfer dataset: {prepare_transfer(dcfg, args.transfer, int(params.get('seed', 0)))}")
        elif args.command == "pretrain":
            import yaml

            from clic.pretrain import run

            params = load_params(args.params, _method_overrides(args.method, args.overrides))
            cfg = pretrain_config(params, args.method)
            log.debug("resolved config:\n%s", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            data_dir = args.data or data_config(params).out_dir
            encoder = run(cfg, data_dir, args.out, args.device, progress=not args.no_progress)
            print(f"encoder: {encoder}")
        elif args.command == "embed":
            from clic.embed import embed_to_npz

            n, errors = embed_to_npz(args.model, args.inputs, args.out, args.batch_size, args.workers, args.device)
            print(f"wrote {n} feature rows to {args.out}" + (f" ({len(errors)} unreadable images skipped)"
                                                             if errors else ""))
    except ValueError as exc:
        print(f"clic: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
