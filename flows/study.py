"""The study flow: a grid of cells (method x seed x variant, each variant a set of params
overrides) run as the pipeline's own DVC stages, one workspace per cell, every number in MLflow.

    prefect deployment run study/real-photos                       # params/real-photos.yaml, 3 methods x 3 seeds
    prefect deployment run study/real-photos --param seeds='[0]' \
        --param variants='{"nomem": {"pretrain.clicv2.clicv2.mem": false}}'
    prefect deployment run study/real-photos --param name=small-budget \
        --param variants='{"recipe": {}, "small-budget": "params/small-budget.yaml"}'

A variant is a set of overrides, or a params file that replaces the study's profile for its cells
(run for the methods whose settings it changes).

A cell runs ``fetch, validate, pretrain@<method>, probe@<method>`` (the baselines cell of a seed:
``fetch, validate, baselines``) in ``workspaces/study-<name>/<variant>-<method>-seed<seed>``,
holding one slot of the ``gpu`` concurrency limit, so at most as many cells run at once as the
limit allows. Its stages log MLflow runs under the cell's run (tags ``clic.study``,
``clic.method``, ``clic.seed``, ``clic.variant``; the probe's SRCC per category copied onto it),
and the cells' runs sit under the study's run. A cell whose stages are up to date (same code, same
params: DVC's lock in its workspace) is not redone, so an interrupted study resumes by running the
same command; a failed cell is retried once, then reported, and the others finish. The table
(``clic study table <name>``, stages/study_table.py) is read from MLflow alone and published as the
study's artifacts and as a Prefect artifact. docs/usage.md, "Studies", tells the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from clic.methods import names as method_names
from flows.pipeline import gpu_slot, stream
from flows.workspace import ROOT, stage_env, workspace
from stages.study_table import cell_runs, result_run

BASE = "recipe"  # the variant with no overrides: the profile as it is
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: ``method`` ("" for the seed's baselines) at ``seed`` under ``variant``."""

    method: str
    seed: int
    variant: str = BASE
    overrides: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    profile: str = field(default="", compare=False)  # the variant's params file, if it names one

    @property
    def key(self) -> str:
        return f"{self.variant}-{self.method or 'baselines'}-seed{self.seed}"

    @property
    def title(self) -> str:
        what = self.method or "baselines"
        return f"{what} seed {self.seed}" + (f" ({self.variant})" if self.variant != BASE else "")

    @property
    def stages(self) -> list[str]:
        return ["fetch", "validate", *([f"pretrain@{self.method}", f"probe@{self.method}"] if self.method
                                       else ["baselines"])]

    def tags(self, study: str) -> dict[str, str]:
        return {"clic.study": study, "clic.cell": self.key, "clic.method": self.method or "baselines",
                "clic.seed": str(self.seed), "clic.variant": self.variant,
                **({"clic.profile": self.profile} if self.profile else {})}


def plan(methods: list[str], seeds: list[int], variants: dict[str, dict[str, Any] | str], baselines: bool,
         profile: str = "") -> list[Cell]:
    """The cells, seed by seed (so a study cut short has whole seeds): the seed's baselines, then
    each variant's methods. A variant naming a params file (relative to the project) runs the methods
    whose settings it changes against ``profile``, the study's. ``ValueError`` naming a bad method,
    seed or variant."""
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise ValueError(f"methods: expected some of {', '.join(method_names())}, got {methods!r}")
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct whole numbers >= 0, got {seeds!r}")
    for name, over in variants.items():
        if not NAME.match(name):
            raise ValueError(f"variants: name {name!r}: expected letters, digits, '_', '.', '-' (at most 64)")
        if isinstance(over, str):
            if not profile:
                raise ValueError(f"variants: {name!r}: a params file as a variant needs the study's profile")
            if not (ROOT / over).is_file():
                raise ValueError(f"variants: {name!r}: params file {over!r} not found under {ROOT}")
        elif not isinstance(over, dict):
            raise ValueError(f"variants: {name!r}: expected a mapping of params keys to values or a params "
                             f"file, got {over!r}")
    runs = {v: profile_methods(over, profile, methods) if isinstance(over, str) else variant_methods(over, methods)
            for v, over in variants.items()}
    for v, over in variants.items():
        if isinstance(over, str) and not runs[v]:
            raise ValueError(f"variants: {v!r}: {over} changes none of {', '.join(methods)} against {profile}")
    cells = []
    for seed in seeds:
        if baselines:
            cells.append(Cell("", seed))
        cells += [Cell(m, seed, v, {}, over) if isinstance(over, str) else Cell(m, seed, v, over)
                  for v, over in variants.items() for m in runs[v]]
    return cells


def variant_methods(overrides: dict[str, Any], methods: list[str]) -> list[str]:
    """The methods a variant changes: those whose ``pretrain.<method>`` sections its keys name, when
    it names no other key (``{"pretrain.clicv2.clicv2.mem": false}`` runs CLICv2 only); else all."""
    named = [k.split(".")[1] if k.startswith("pretrain.") and k.count(".") >= 2 else "" for k in overrides]
    if named and all(n in method_names() for n in named):
        return [m for m in methods if m in named]
    return methods


def profile_methods(variant: str, profile: str, methods: list[str]) -> list[str]:
    """The methods a params-file variant changes against the study's profile: those whose resolved
    pretraining settings differ, or all of them when what a cell's other stages read differs (data,
    validate, probe). The seed and ``mlflow`` are the cell's own, so they do not count."""
    from clic.params import load_params, pretrain_config

    mine, base = load_params(ROOT / variant), load_params(ROOT / profile)
    if any(getattr(mine, k) != getattr(base, k) for k in ("data", "validate", "probe")):
        return methods
    return [m for m in methods if pretrain_config(mine, m).model_dump(exclude={"seed"})
            != pretrain_config(base, m).model_dump(exclude={"seed"})]


def cell_env(study: str, cell: Cell, parent_run: str, threads: int) -> dict[str, str]:
    """The stages' environment: the cell's own invocation (stable across resumes, so a resumed cell
    logs into the same MLflow run), under the study's run, with the cell's tags."""
    env = stage_env(ROOT, str(flow_run.id or "local"), f"{study}: {cell.title}")
    env["CLIC_PIPELINE_ID"] = f"study-{study}-{cell.key}"
    env["CLIC_PARENT_RUN_ID"] = parent_run
    env["CLIC_RUN_TAGS"] = json.dumps(cell.tags(study))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _client(uri: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def study_run(name: str, profile: str, uri: str) -> str:
    """The study's MLflow run (one per study name, reused when the study is run again)."""
    from stages.tracking import EXPERIMENT_KIND, TRAINING

    client = _client(uri)
    exp = client.get_experiment_by_name("clic")
    if exp is None:
        artifacts = Path(os.environ.get("CLIC_ARTIFACT_ROOT") or ROOT / "mlartifacts")
        exp_id = client.create_experiment("clic", artifact_location=artifacts.as_uri() if uri.startswith("sqlite:")
                                          else None, tags={EXPERIMENT_KIND: TRAINING})
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], f"tags.`clic.kind` = 'study' and tags.`clic.study` = '{name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    tags = {"clic.kind": "study", "clic.study": name, "clic.profile": profile,
            "prefect.flow_run_id": str(flow_run.id or "local")}
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        return run_id
    return client.create_run(exp_id, run_name=f"study {name}", tags=tags).info.run_id


def close_cell(uri: str, study: str, cell: Cell) -> str:
    """Mark the cell's run FINISHED and copy its probe's metrics onto it (``srcc``,
    ``srcc_<category>``, ...: the study's columns in the MLflow UI); returns the run id."""
    client = _client(uri)
    run = cell_runs(client, study, cell.key)[0]
    result = result_run(client, run.info.run_id)
    if result is None:
        raise RuntimeError(f"cell {cell.key}: no finished probe/baselines run under MLflow run {run.info.run_id}")
    metrics = {k: v for k, v in result.data.metrics.items() if not k.startswith("system/")}
    if metrics:
        import mlflow

        mlflow.log_metrics(metrics, run_id=run.info.run_id)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _stage(cell: Cell, ws: Path, env: dict[str, str], name: str, force: bool = False) -> None:
    rc, tail = stream(["dvc", "repro", *(["--force"] if force else []), "--single-item", name], ws, env)
    if rc != 0:
        errors = [x for x in tail if "error" in x.lower() or "failed" in x.lower()]
        raise RuntimeError(f"cell {cell.key}: stage {name} failed: "
                           f"{' | '.join(errors[-4:]) or chr(10).join(tail[-20:])}")


class Turns:
    """Cells take their ``gpu`` slots in plan order (so a study cut short has whole seeds): cell
    ``i`` waits until cells ``0..i-1`` have taken theirs (or failed before). The limit's own
    hand-out follows whoever polls first."""

    def __init__(self) -> None:
        self.next, self.cond = 0, threading.Condition()

    @contextlib.contextmanager
    def turn(self, index: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.next >= index)
        try:
            yield
        finally:
            with self.cond:
                self.next = max(self.next, index + 1)
                self.cond.notify_all()


_TURNS: dict[str, Turns] = {}


@task(task_run_name="{cell.title}", retries=1, retry_delay_seconds=5)
def run_cell(study: str, profile: str, cell: Cell, parent_run: str, register: bool, threads: int,
             index: int = 0) -> str:
    """The cell's stages in its workspace (up-to-date ones skipped by DVC); returns its MLflow run id."""
    logger = get_run_logger()
    overrides = {**cell.overrides, "seed": cell.seed, "mlflow.register": register}
    path = ROOT / "workspaces" / f"study-{study}" / cell.key
    with workspace("study", cell.method, "", overrides, profile=cell.profile or profile, path=path) as ws:
        env = cell_env(study, cell, parent_run, threads)
        with contextlib.ExitStack() as slot:
            with _TURNS.setdefault(str(flow_run.id or "local"), Turns()).turn(index):
                slot.enter_context(gpu_slot())
            for name in cell.stages:
                _stage(cell, ws, env, name)
            client = _client(env["MLFLOW_TRACKING_URI"])
            runs = cell_runs(client, study, cell.key)
            if not runs or result_run(client, runs[0].info.run_id) is None:
                # its outputs came from DVC (this workspace's lock, or the run cache of another
                # study's identical cell) but its numbers are not in this MLflow store: evaluate again
                logger.info("%s: %s up to date but not in MLflow; running it again", cell.key, cell.stages[-1])
                _stage(cell, ws, env, cell.stages[-1], force=True)
        run_id = close_cell(env["MLFLOW_TRACKING_URI"], study, cell)
    logger.info("cell %s done (MLflow run %s)", cell.key, run_id)
    return run_id


@flow(name="study", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def study(name: str = "real-photos", profile: str = "params/real-photos.yaml", methods: list[str] | None = None,
          seeds: list[int] | None = None, variants: dict[str, dict[str, Any] | str] | None = None,
          baselines: bool = True, register_scorers: bool = False, threads: int = 0) -> dict[str, Any]:
    """Run the grid and publish its table. ``variants``: name -> params overrides (full keys, or
    relative to the method: ``{"nomem": {"clicv2.mem": false}}``) or a params file run in place of
    ``profile`` (``{"small-budget": "params/small-budget.yaml"}``); default one variant, ``recipe``,
    the profile as it is. ``register_scorers``: register each cell's scorer (default off: a study's
    encoders are evidence, not releases). ``threads``: the stages' ``OMP_NUM_THREADS`` (0: as the
    worker has it); a seed is bit-identical only at the same thread count."""
    from stages.study_table import publish_table

    if not NAME.match(name):
        raise ValueError(f"name {name!r}: expected letters, digits, '_', '.', '-' (at most 64)")
    if not (ROOT / profile).is_file():
        raise ValueError(f"profile {profile!r}: no such params file under {ROOT}")
    cells = plan(list(methods or method_names()), list(seeds if seeds is not None else [0, 1, 2]),
                 dict(variants if variants is not None else {BASE: {}}), baselines, profile)
    logger = get_run_logger()
    uri = stage_env(ROOT, "")["MLFLOW_TRACKING_URI"]
    parent = study_run(name, profile, uri)
    logger.info("study %s: %d cells (%s), MLflow run %s", name, len(cells), ", ".join(c.key for c in cells), parent)
    futures = [run_cell.submit(name, profile, c, parent, register_scorers, threads, i) for i, c in enumerate(cells)]
    wait(futures)
    failed = {}
    for c, f in zip(cells, futures, strict=True):
        try:
            f.result()
        except Exception as exc:  # noqa: BLE001 - reported below, the others' results still published
            failed[c.key] = f"{type(exc).__name__}: {exc}"
    client = _client(uri)
    result = publish_table(client, name, parent, failed)
    create_markdown_artifact(markdown=result["markdown"], key=f"study-{name.lower().replace('_', '-')}"[:60],
                             description=f"study {name}")
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    if failed:
        raise RuntimeError(f"study {name}: {len(failed)} of {len(cells)} cells failed: "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return result["table"]
