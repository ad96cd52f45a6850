"""The ``clic`` command line: ``clic --help``, and every command with examples in docs/usage.md.

Overrides use the dotted paths of ``params.yaml`` (``--set pretrain.clicv2.epochs=3``); for
``pretrain`` a key may also be given relative to the method's section (``--set epochs=3``). An
override beats every value of the files, ``--set pretrain.common.K`` also the method sections' K
(docs/usage.md, "Command line").
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from clic import methods
from clic.params import (
    TOP_LEVEL,
    Params,
    data_config,
    default_params,
    load_params,
    method_settings,
    pretrain_config,
    to_dict,
    validate_config,
)

log = logging.getLogger("clic")


def _sub(sub: Any, name: str, text: str, params: bool = True, device: bool = False) -> argparse.ArgumentParser:
    """A subcommand; ``params``: it reads a params file (``--params``, ``--set``); ``device``: it runs a model."""
    p = sub.add_parser(name, help=text)
    if params:
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter (repeatable)")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return p


def _batch_inputs(p: argparse.ArgumentParser) -> None:
    """Options of the commands that run a model over many image files."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of a CPU forward (default: all cores; cores minus --workers pays when "
                   "decoding large photos is the slow half)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clic", description="Unsupervised image-complexity representation "
                                 "(CLIC / CLICv2): prepare data, pretrain, embed.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    data_sub = sub.add_parser("data", help="dataset preparation").add_subparsers(dest="data_command", required=True)
    prep = _sub(data_sub, "prepare", "turn the source named in params into the prepared format")
    prep.add_argument("--transfer", default="", metavar="DIR",
                      help="also write the synthetic labelled classification set to DIR")
    prep.add_argument("--force", action="store_true",
                      help="rebuild even when the folder was prepared from the same inputs")
    corp = _sub(data_sub, "corpus", "list and hash the pretraining corpus (pretrain.data) and report evaluation "
                "images found in it (exit 1 when there are any)")
    corp.add_argument("--data", default="", help="prepared dataset whose evaluation images are looked for "
                      "(default: data.out_dir; skipped when it is not prepared)")
    corp.add_argument("--workers", type=int, default=0, help="hashing processes (default: CPUs, at most 8)")
    corp.add_argument("--work-dir", default="", help="extracted archives and the hash index (default: data/corpus)")
    shd = _sub(data_sub, "shard", "write a pretraining corpus as MosaicML streaming (MDS) shards (resumable: a "
               "re-run completes a killed one)")
    shd.add_argument("--out", required=True, help="corpus folder (index.json, part-NNNNNN/)")
    shd.add_argument("--per-shard", type=int, default=1000, help="images per part, the unit a re-run resumes "
                     "at (default: 1000)")
    shd.add_argument("--side", type=int, default=0, help="downsize images to this short side (default: keep)")
    shd.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default: 90)")
    shd.add_argument("--workers", type=int, default=0, help="encoding processes (default: all CPUs)")
    shd.add_argument("--work-dir", default="", help="extracted archives (default: data/corpus)")
    shd.add_argument("--force", action="store_true", help="delete shards of a different listing in --out")
    shd.add_argument("--no-progress", action="store_true")
    shd.add_argument("entries", nargs="*", metavar="ENTRY",
                     help="image folders, archives or prepared datasets (default: pretrain.data)")

    pre = _sub(sub, "pretrain", "self-supervised pretraining (resumes from DIR/checkpoint.pt)", device=True)
    pre.add_argument("--method", required=True, choices=methods.names())
    pre.add_argument("--out", required=True, help="output folder (checkpoint.pt, encoder.pt, metrics.jsonl)")
    pre.add_argument("--data", default="", help="prepared dataset folder (default: data.out_dir)")
    pre.add_argument("--no-progress", action="store_true")

    emb = _sub(sub, "embed", "frozen-encoder features for images or folders", params=False, device=True)
    emb.add_argument("--model", required=True, help="encoder.pt or checkpoint.pt")
    emb.add_argument("--out", required=True, help="output .npz with arrays paths and features")
    _batch_inputs(emb)

    prb = _sub(sub, "probe", "fit a linear probe on frozen features; report PCC/SRCC; save a scorer", device=True)
    prb.add_argument("--model", default="", help="encoder.pt or checkpoint.pt (or use --baseline)")
    prb.add_argument("--scorer", default="", help="cross-dataset: evaluate a fitted scorer.pt (or models:/ URI) "
                     "on every labelled image of --data, without refitting")
    prb.add_argument("--baseline", choices=("random", "handcrafted"), default=None)
    prb.add_argument("--method", choices=methods.names(), default="clicv2",
                     help="with --baseline random: whose architecture to copy")
    prb.add_argument("--data", default="", help="prepared dataset folder (default: data.out_dir)")
    prb.add_argument("--out", required=True, help="report folder (metrics.json, predictions.csv, plots, scorer.pt)")
    prb.add_argument("--cache", default="", help="feature cache folder")

    trf = _sub(sub, "transfer", "linear classification probe on an ImageFolder (train/, val/)", device=True)
    trf.add_argument("--model", required=True)
    trf.add_argument("--data", default="", help="ImageFolder root (default: transfer.path)")
    trf.add_argument("--name", default="", help="dataset name for the metric keys (default: transfer.name)")
    trf.add_argument("--out", required=True, help="JSON file for <name>_top1 / <name>_top5")

    sco = _sub(sub, "score", "complexity scores for images or folders", params=False, device=True)
    sco.add_argument("--model", required=True, help="scorer.pt (from clic probe) or an MLflow models:/ URI")
    sco.add_argument("--out", default="", help="write the path,score rows to this CSV (default: print them)")
    _batch_inputs(sco)

    mp = _sub(sub, "map", "per-patch complexity heat map blended over an image", params=False, device=True)
    mp.add_argument("--model", required=True)
    mp.add_argument("--out", required=True, help="PNG file")
    mp.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity")
    mp.add_argument("image")

    par = _sub(sub, "params", "print a params file with its 'extends' chain and overrides merged, or with "
               "--method one method's resolved pretraining settings", params=False)
    par.add_argument("params", metavar="profile", help="e.g. params/gpu.yaml")
    par.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    par.add_argument("--method", choices=methods.names(), default=None,
                     help="print pretrain.common merged into pretrain.<method> with every default filled in "
                          "(the names of params.yaml, under pretrain.<method>)")
    study_sub = sub.add_parser("study", help="studies run by the study flow (flows/study.py)") \
        .add_subparsers(dest="study_command", required=True)
    tab = _sub(study_sub, "table", "a study's seed table, read from MLflow alone: SRCC per category (mean, sd over "
               "seeds) and paired differences with 95%% intervals over seeds and images")
    tab.add_argument("name", help="the study's name (prefect deployment run study/<name>)")
    tab.add_argument("--json", default="", metavar="FILE", help="also write the table as JSON")
    tab.add_argument("--markdown", default="", metavar="FILE", help="also write the markdown")
    tab.add_argument("--bootstrap", type=int, default=2000, help="resamples for the intervals (default 2000)")
    return ap


def _yaml(tree: dict) -> str:
    """Block-style YAML with lists on one line (``crop_scale: [0.2, 1.0]``), as params.yaml."""
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(tree, Dumper=Dumper, sort_keys=False)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` values; for ``pretrain``, ``epochs=3`` -> ``pretrain.<method>.epochs=3`` (fully
    dotted keys pass through; which of them wins: :func:`clic.params.apply_overrides`)."""
    if args.command != "pretrain":
        return args.overrides
    return [o if o.split("=", 1)[0].split(".", 1)[0].strip() in TOP_LEVEL else f"pretrain.{args.method}.{o}"
            for o in args.overrides]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = COMMANDS[{"data": getattr(args, "data_command", ""),
                        "study": f"study {getattr(args, 'study_command', '')}"}.get(args.command, args.command)]
    try:
        params = load_params(args.params, _overrides(args)) if "params" in args else default_params()
        return command(args, params) or 0
    except ValueError as exc:
        print(f"clic: error: {exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace, params: Params) -> None:
    from clic.atomic import check_output
    from clic.data.prepare import prepare, prepare_transfer

    dcfg = data_config(params)
    seed = dcfg.seed_for(params.seed)
    if args.transfer:  # refused before any work, as the prepared folder is
        check_output(args.transfer, (dcfg.out_dir, dcfg.raw_dir))
    print(f"prepared dataset: {prepare(dcfg, seed=seed, force=args.force)}")
    if args.transfer:
        print(f"transfer dataset: {prepare_transfer(dcfg, args.transfer, seed)}")


def _pretrain(args: argparse.Namespace, params: Params) -> None:
    from clic.pretrain import run

    cfg = pretrain_config(params, args.method)
    log.debug("resolved config:\n%s", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    data_dir = args.data or data_config(params).out_dir
    print(f"encoder: {run(cfg, data_dir, args.out, args.device, progress=not args.no_progress)}")


def _embed(args: argparse.Namespace, params: Params) -> None:
    from clic.atomic import check_output
    from clic.embed import embed_to_npz

    check_output(args.out, [*args.inputs, args.model], folder=False)

    n, errors = embed_to_npz(args.model, args.inputs, args.out, args.batch_size, args.workers, args.device,
                             args.threads)
    print(f"wrote {n} feature rows to {args.out}" + (f" ({len(errors)} unreadable images skipped)" if errors else ""))


def _params(args: argparse.Namespace, params: Params) -> None:
    data_config(params)  # validate what can be validated without a method
    configs = {m: pretrain_config(params, m) for m in ([args.method] if args.method else methods.names())}
    if not args.method:
        print(yaml.safe_dump(params.tree, sort_keys=False), end="")
        return
    own = method_settings(configs[args.method])  # a params file itself: seed, pretrain.data and the section
    seed, data = own.pop("seed"), own.pop("data")
    own.pop("method")
    print(f"# {args.params}: pretrain.{args.method} resolved (docs/recipes.md gives each value's source)")
    print(_yaml({"seed": seed, "pretrain": {"data": data, args.method: own}}), end="")


def _corpus(args: argparse.Namespace, params: Params) -> int:
    import time
    from collections import Counter

    from clic.data import corpus
    from clic.data.table import read_table
    from clic.params import probe_config

    pcfg, dcfg, mode = pretrain_config(params, methods.names()[0]), data_config(params), probe_config(params).mode
    if not pcfg.data:
        raise ValueError("pretrain.data is empty: pretraining uses the prepared dataset's "
                         f"{'/'.join(pcfg.splits)} split(s); set pretrain.data to a list of image folders or archives")
    work = Path(args.work_dir or corpus.CORPUS_DIR)
    index, workers = work / corpus.INDEX_NAME, args.workers or None
    start = time.perf_counter()
    records = corpus.corpus_records(pcfg.data, work, dcfg.max_archive_bytes, dcfg.max_member_bytes,
                                    dcfg.max_archive_ratio)
    listed = time.perf_counter() - start
    by_source = Counter((r.name.split("/", 1)[0], r.category) for r in records)
    print(f"corpus: {len(records)} images in {len(pcfg.data)} entr{'y' if len(pcfg.data) == 1 else 'ies'} "
          f"(listed in {listed:.1f} s)")
    for (entry, category), n in sorted(by_source.items()):
        print(f"  {entry}/{category + '/' if category else ''}: {n}")
    start = time.perf_counter()
    hashes = corpus.corpus_hashes(records, index, workers, dcfg.max_pixels)
    print(f"hashed {hashes.hashed} images in {time.perf_counter() - start:.1f} s "
          f"({len(records) - hashes.hashed} known); {len(hashes.errors)} unreadable (skipped when pretraining)")
    for name, err in sorted(hashes.errors.items())[:10]:
        print(f"  unreadable: {name}: {err}")
    data_dir = Path(args.data or dcfg.out_dir)
    if not (data_dir / "table.csv").is_file():
        print(f"{data_dir} is not prepared: evaluation images not checked")
        return 0
    evaluation = corpus.evaluation_records(read_table(data_dir), mode)
    bits = validate_config(params).near_duplicate_bits
    found = corpus.leaks(hashes, corpus.evaluation_hashes(evaluation, data_dir, index, workers), bits)
    print(f"evaluation images ({data_dir}, probe.mode={mode}): {len(evaluation)}; in the corpus (identical or "
          f"within {bits} perceptual-hash bits): {len({x.evaluation for x in found})}")
    for leak in found[:20]:
        print(f"  {leak}")
    if len(found) > 20:
        print(f"  ... and {len(found) - 20} more")
    return 1 if found else 0


def _shard(args: argparse.Namespace, params: Params) -> None:
    from clic.data.corpus import CORPUS_DIR, corpus_records
    from clic.data.shards import is_shard_index, write_shards

    entries = args.entries or list(pretrain_config(params, methods.names()[0]).data)
    if not entries:
        raise ValueError("nothing to shard: name image folders, archives or prepared datasets, or set pretrain.data")
    if sharded := [e for e in entries if is_shard_index(e)]:
        raise ValueError(f"{sharded[0]}: already a sharded corpus (name it in pretrain.data as it is); clic data "
                         "shard reads image folders, archives and prepared datasets")
    dcfg = data_config(params)
    records = corpus_records(entries, Path(args.work_dir or CORPUS_DIR), dcfg.max_archive_bytes,
                             dcfg.max_member_bytes, dcfg.max_archive_ratio)
    summary = write_shards(records, args.out, args.per_shard, args.side, args.quality, params.seed,
                           args.workers or None, dcfg.max_pixels, args.force, not args.no_progress,
                           inputs=entries, min_side=dcfg.min_size)
    print(f"{summary.images} images in {summary.parts} parts ({summary.written} written now, "
          f"{summary.unreadable} unreadable skipped) -> {summary.index}")


def _probe(args: argparse.Namespace, params: Params) -> None:
    from clic.atomic import check_output
    from clic.evaluation.evaluate import (
        REPORT_NAMES,
        evaluate_encoder,
        evaluate_handcrafted,
        evaluate_random,
        evaluate_scorer,
    )
    from clic.params import probe_config

    cfg, seed = probe_config(params), params.seed
    data_dir = args.data or data_config(params).out_dir
    check_output(args.out, [data_dir, args.model, args.scorer, args.cache], REPORT_NAMES,
                 proof=("metrics.json", "srcc"))
    if args.baseline == "handcrafted":
        report = evaluate_handcrafted(data_dir, cfg, args.out, seed)
    elif args.baseline == "random":
        report = evaluate_random(pretrain_config(params, args.method), data_dir, cfg, args.out, seed, args.device)
    elif args.scorer:
        report = evaluate_scorer(args.scorer, data_dir, cfg, args.out, seed, args.device)
    elif args.model:
        report = evaluate_encoder(args.model, data_dir, cfg, args.out, seed, args.device, args.cache or None)
    else:
        raise ValueError("probe needs --model ENCODER, --scorer SCORER or --baseline random|handcrafted")
    print(f"{report['name']}: PCC {report['pcc']:.4f}  SRCC {report['srcc']:.4f}  KRCC {report['krcc']:.4f}  "
          f"RMSE {report['rmse']:.4f}  (n={int(report['n'])}) -> {args.out}")


def _transfer(args: argparse.Namespace, params: Params) -> None:
    import json
    import tempfile

    from clic.atomic import check_output, write_text
    from clic.embed import load_encoder
    from clic.evaluation.transfer import transfer_probe
    from clic.params import transfer_config

    cfg = transfer_config(params)
    out, root = Path(args.out), args.data or cfg.path
    check_output(out, [root, args.model], folder=False)
    backbone, pcfg = load_encoder(args.model, args.device or "cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=out.parent)  # new, ours, deleted after
    metrics = transfer_probe(backbone, pcfg.image_size, root, args.name or cfg.name, work, cfg.epochs, cfg.lr,
                             cfg.batch_size, cfg.workers, args.device or "cpu", params.seed)
    write_text(out, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _score(args: argparse.Namespace, params: Params) -> None:
    import csv

    from clic.atomic import check_output, write_csv
    from clic.embed import expand_inputs, skip_unreadable
    from clic.scorer import load_scorer

    if args.out:
        check_output(args.out, [*args.inputs, args.model], folder=False)
    scorer = load_scorer(args.model, args.device)
    paths = expand_inputs(args.inputs)
    scores, kept, errors = scorer.score_files(paths, args.batch_size, args.workers, threads=args.threads)
    skip_unreadable(len(paths), kept, errors)
    rows = [("path", "score"), *((str(paths[i]), f"{s:.6f}") for i, s in zip(kept, scores, strict=True))]
    skipped = f" ({len(errors)} unreadable, skipped)" if errors else ""
    if not args.out:  # path,score rows on stdout, like every scoring tool; the summary on stderr
        csv.writer(sys.stdout, lineterminator="\n").writerows(rows)  # not CRLF: cut/awk read it as it is
        sys.stdout.flush()
        print(f"scored {len(kept)} images{skipped}", file=sys.stderr)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    print(f"scored {len(kept)} images -> {out}{skipped}")


def _map(args: argparse.Namespace, params: Params) -> None:
    from clic.atomic import check_output
    from clic.data.imageio import load_rgb
    from clic.scorer import blend_heatmap, load_scorer

    check_output(args.out, [args.image, args.model], folder=False)
    scorer = load_scorer(args.model, args.device)
    img = load_rgb(args.image)
    values = scorer.map(img)
    size = max(256, scorer.cfg.image_size)
    view = scorer.view(img)  # the centre square, or the whole image for scorers fitted on whole images
    view = view.resize((round(view.size[0] * size / min(view.size)), round(view.size[1] * size / min(view.size))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blend_heatmap(view, values, args.alpha).save(out)
    print(f"map {values.shape[0]}x{values.shape[1]}, mean {values.mean():.4f} "
          f"(image score {float(scorer(img)[0]):.4f}) -> {out}")


def _study_table(args: argparse.Namespace, params: Params) -> None:
    """MLflow is read by the pipeline's tracking side (stages/), not by the core: the one command
    that imports stages/, here and only here (tests/test_layers.py)."""
    import json

    from clic.atomic import check_output, write_text
    from stages.study_table import read_study_table

    for out in (args.json, args.markdown):
        if out:
            check_output(out, folder=False)
    result = read_study_table(params, args.name, args.bootstrap)
    if args.json:
        write_text(Path(args.json), json.dumps(result["json"], indent=2) + "\n")
    if args.markdown:
        write_text(Path(args.markdown), result["markdown"] + "\n")
    print(result["markdown"])


COMMANDS: dict[str, Callable[[argparse.Namespace, Params], int | None]] = {
    "prepare": _prepare, "corpus": _corpus, "shard": _shard, "pretrain": _pretrain, "embed": _embed, "probe": _probe,
    "transfer": _transfer, "score": _score, "map": _map, "params": _params,
    "study table": _study_table}


if __name__ == "__main__":
    sys.exit(main())
