"""Reading params files: one merge, one model, one error formatter.

A params file and the files its ``extends`` chain names are *layers*, lowest first; the
``--set KEY=VALUE`` overrides together are the top one. Each file is read as safe YAML (repeated
keys, alias bombs and non-UTF-8 files refused; nothing read runs); the layers are merged, then the
merged tree is validated once as :class:`Params`, the whole file as one pydantic model. The
one rule for a method's settings: *a later layer wins; within a layer, ``pretrain.<method>`` beats ``pretrain.common``,
which beats the top-level ``seed``*. So ``--set pretrain.common.epochs=3`` reaches every method
over the files' method sections, and ``--set pretrain.clicv2.epochs=4`` beats it for CLICv2.

Every failure is a :class:`ParamError` at a dotted key, made by :func:`_translate` from pydantic's
own error location and prefixed with the layer that wrote the value (``params/gpu.yaml:`` or
``--set '...':``), re-keyed to ``pretrain.common`` or ``seed`` when that is where the user set it.
A method's own rules (CLICv2 needs a ViT) are checked when that method's section is taken
(:func:`pretrain_config`), so a profile usable for one method is not refused for another.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, PrivateAttr, ValidationError, model_validator

from clic import methods
from clic.config import (
    METHOD_RULES,
    DataConfig,
    MlflowConfig,
    ParamError,
    PretrainConfig,
    ProbeConfig,
    Section,
    TransferConfig,
    ValidateConfig,
    _short,
    to_dict,
)

T = TypeVar("T", bound=BaseModel)
MAX_YAML_VALUES = 100_000  # the most values YAML aliases may add to a tree (beyond those written)
_TYPE_NAMES = {"int": "int", "float": "float", "bool": "bool (true/false)", "string": "str", "tuple": "a list",
               "list": "a list", "iterable": "a list", "model": "a mapping", "model_attributes": "a mapping",
               "dict": "a mapping"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
Layer = tuple[str, dict[str, Any]]  # (where it was written, the tree as written)


warnings.filterwarnings("ignore", r'Field name "validate" in "Params" shadows', UserWarning)  # BaseModel.validate


class Params(Section):
    """The whole params file. ``pretrain`` holds each registered method's full section (the corpus
    ``pretrain.data``, ``pretrain.common`` and the top-level seed already merged in)."""

    seed: int = 0
    data: DataConfig = DataConfig()
    pretrain: dict[str, PretrainConfig] = {}
    validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]  # (BaseModel.validate: deprecated)
    probe: ProbeConfig = ProbeConfig()
    transfer: TransferConfig = TransferConfig()
    mlflow: MlflowConfig = MlflowConfig()
    _layers: list[Layer] = PrivateAttr(default_factory=list)
    _tree: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def tree(self) -> dict[str, Any]:
        """The merged tree as plain data, each method's section holding only what differs from
        ``pretrain.common`` (and ``seed``): written out as a file it reads back as these params,
        and a later edit of ``pretrain.common`` reaches the methods that do not set the key."""
        tree = _merge({}, self._tree)
        pre = tree.get("pretrain")
        if isinstance(pre, dict):
            base = _merge({"seed": tree["seed"]} if "seed" in tree else {}, pre.get("common") or {})
            pre.update({m: _diff(pre[m], base) for m in methods.names() if isinstance(pre.get(m), Mapping)})
        return tree

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        pre = raw.get("pretrain") or {}
        if not isinstance(pre, Mapping):
            raise ParamError("pretrain", f"{{key}}: expected a mapping, got {_short(pre)}")
        parts = ("data", "common", *methods.names())
        for part, sub in pre.items():
            if part not in parts:
                raise _unknown(parts, part, "pretrain")
            if part != "data" and not isinstance(sub, Mapping | None):
                raise ParamError(f"pretrain.{part}", f"{{key}}: expected a mapping, got {_short(sub)}")
            for key, why in (("data", "the pretraining corpus is set once, as pretrain.data (it applies to every "
                                      "method)"), ("method", "the method is the section's name")):
                if part != "data" and key in (sub or {}):
                    raise ParamError(f"pretrain.{part}.{key}", "{key}: " + why)
        corpus = _corpus(pre.get("data"))
        return {**raw, "pretrain": {m: {**_merge(pre.get("common") or {}, pre.get(m) or {}), "data": corpus,
                                        "method": m} for m in methods.names()}}


TOP_LEVEL = frozenset(Params.model_fields)


def _corpus(data: Any) -> list[str]:
    data = [data] if isinstance(data, str) else (data or [])
    if not isinstance(data, list | tuple) or not all(isinstance(d, str) for d in data):
        raise ParamError("pretrain.data", f"{{key}}: expected a list of folder/archive paths (or one path), got "
                         f"{_short(data)}")
    for i, entry in enumerate(data):  # existence is checked when the corpus is listed
        if not entry.strip():
            raise ParamError(f"pretrain.data[{i}]", "{key} is empty; name an image folder, archive or prepared dataset")
    return list(data)


# ------------------------------------------------------------------------------ the one merge
def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping | None) \
            else v
    return out


def _diff(full: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """What of ``full`` ``_merge(base, ...)`` needs to give ``full`` back."""
    out = {}
    for k, v in full.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
            if sub := _diff(v, base[k]):
                out[k] = sub
        elif k not in base or base[k] != v or type(base[k]) is not type(v):
            out[k] = v
    return out


def _expand(layer: Mapping[str, Any]) -> dict[str, Any]:
    """The layer with its ``seed`` and ``pretrain.common`` pushed under each method's section
    (which wins over them): the rule's "within a layer"."""
    pre = layer.get("pretrain")
    low = {"seed": layer["seed"]} if "seed" in layer else {}
    common = pre.get("common") if isinstance(pre, Mapping) else None
    if (not low and common is None) or not isinstance(pre, Mapping | None) or not isinstance(common, Mapping | None):
        return dict(layer)
    pre = pre or {}
    base = _merge(low, common or {})
    pushed = {m: _merge(base, pre.get(m) or {}) for m in methods.names() if isinstance(pre.get(m), Mapping | None)}
    return {**layer, "pretrain": {**pre, **pushed}}


def build(layers: list[Layer]) -> Params:
    """Merge ``layers`` (lowest first) and validate the result once; errors name the layer."""
    groups: list[list[Any]] = []  # each file is a layer; the --set overrides together are the top one
    for where, layer in layers:
        if groups and groups[-1][0] and where.startswith("--set "):
            groups[-1][1] = _merge(groups[-1][1], layer)
        else:
            groups.append([where.startswith("--set "), layer])
    tree: dict[str, Any] = {}
    for _, layer in groups:
        tree = _merge(tree, _expand(layer))
    try:
        params = Params.model_validate(tree, context={"method_rules": False})
    except ValidationError as exc:
        raise _translate(exc, Params, "", layers) from None
    params._layers, params._tree = layers, tree
    return params


def default_params() -> Params:
    """The schema's defaults (for commands that read no params file). ``Params()`` itself would
    check every method's own rules against the defaults, which suit no ViT method."""
    return build([])


def _params(params: Params | Mapping[str, Any]) -> Params:
    return params if isinstance(params, Params) else build([("params", dict(params))])


# --------------------------------------------------------------------------- the one formatter
def _join(where: str, name: object) -> str:
    if isinstance(name, int):
        return f"{where}[{name}]"
    return f"{where}.{name}" if where and name != "" else (where or str(name))


def _dotted(where: str, loc: tuple[Any, ...]) -> str:
    return functools.reduce(_join, loc, where)


def _unknown(keys: typing.Collection[str], name: object, where: str) -> ParamError:
    """An unknown key, with the nearest of the valid ``keys`` (``pretrian`` -> ``pretrain``)."""
    valid = sorted(keys)
    near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean {_join(where, near[0])!r}? " if near else ""
    if not near and not where and str(name) in PretrainConfig.model_fields:  # a method's key at the top
        hint = f"did you mean 'pretrain.<method>.{name}' (or 'pretrain.common.{name}')? "
    if not near and name == "common" and where.startswith("pretrain."):
        hint = "did you mean 'pretrain.common'? "  # beside the methods' sections, not in one
    return ParamError(_join(where, name), "{key}: unknown key; " + hint + f"valid keys here: {', '.join(valid)}")


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    parts = list(loc)
    while parts:
        ann = cls.model_fields[str(parts.pop(0))].annotation
        if typing.get_origin(ann) is dict and parts:  # a mapping of sections: the next part is its key
            ann = typing.get_args(ann)[1]
            parts.pop(0)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
    return cls


def _placed(err: ParamError, layers: list[Layer] | None) -> ParamError:
    """``err`` prefixed with the last layer that wrote its key, re-keyed to where it was written
    (``pretrain.common.K`` or ``seed`` for a method's ``K``)."""
    if not layers:
        return err
    parts = err.key.replace("[", ".[").split(".")
    keys = [parts]
    if parts[0] == "pretrain" and len(parts) > 2 and parts[1] in methods.names():
        keys += [["pretrain", "common", *parts[2:]], *([["seed"]] if parts[2:] == ["seed"] else [])]
    for where, tree in reversed(layers):
        for key in keys:
            if _has_path(tree, [p for p in key if not p.startswith("[")]):
                return ParamError(".".join(key).replace(".[", "["), f"{where}: {err.template}")
    return err


def _has_path(tree: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True


def _translate(exc: ValidationError, cls: type[BaseModel], where: str, layers: list[Layer] | None = None
               ) -> ParamError:
    """pydantic's errors as one :class:`ParamError` at the first one's dotted key, in this module's
    words, each placed in the layer that wrote it (the next four on lines of their own)."""
    first, *more = [_error(err, cls, where, layers) for err in exc.errors()]
    if not more:
        return first
    others = [m for m in dict.fromkeys(str(m) for m in more) if m != str(first)]
    text = "".join(f"\n  and {m}" for m in others[:4]) + (f"\n  and {len(others) - 4} more" if len(others) > 4 else "")
    return ParamError(first.key, first.template + text)


def _error(err: Any, cls: type[BaseModel], where: str, layers: list[Layer] | None) -> ParamError:
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err.get("input"), err.get("ctx") or {}
    key = _dotted(where, loc)
    orig = ctx.get("error")
    if kind == "extra_forbidden":
        out = _unknown(_model_at(cls, loc[:-1]).model_fields, loc[-1], _dotted(where, loc[:-1]))
    elif kind == "value_error" and isinstance(orig, ParamError):  # a rule, keyed relative to its section
        out = ParamError(_join(key, orig.key), orig.template)
    elif kind == "value_error":
        out = ParamError(key, "{key}" + (str(orig) if str(orig).startswith(":") else f" {orig}"))
    elif kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        shown = float(value) if isinstance(ctx[name], float) and isinstance(value, int) else value  # as validated
        out = ParamError(key, f"{{key}} must be {sign} {ctx[name]:g}, got {_short(shown)}")
    elif kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        out = ParamError(key, f"{{key}}: expected one of {choices}, got {_short(value)}")
    elif kind == "finite_number":
        out = ParamError(key, f"{{key}} must be a finite number, got {value}")
    elif kind == "too_short":
        out = ParamError(key, "{key} must not be empty")
    else:
        typ = _TYPE_NAMES.get(kind.rsplit("_", 1)[0])
        out = ParamError(key, f"{{key}}: expected {typ}, got {_short(value)}" if typ else
                         f"{{key}}: {err['msg']}, got {_short(value)}")
    return _placed(out, layers)


def from_dict(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """Build section ``cls`` from a mapping; unknown keys, wrongly typed and out-of-range values
    raise :class:`ParamError` naming the dotted key under ``where``."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ParamError(where or cls.__name__, f"{{key}}: expected a mapping, got {_short(raw)}")
    try:
        return cls.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise _translate(exc, cls, where) from None


# ------------------------------------------------------------------------------------- reading
class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's numbers (``1e-3`` is a float, as every user reads it)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))
_MERGE = "tag:yaml.org,2002:merge"


def _written(loader: _Loader, root: yaml.Node, where: str) -> int:
    """The values (scalars and collections; keys not counted) of the composed tree ``root`` as
    written, each node once however many aliases name it; a mapping that repeats a key is refused
    (PyYAML would keep the last silently). Walks nodes, not the constructed data, so that merge
    keys (``<<``) have not yet copied other mappings' keys in."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                todo.append(value_node)
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
                if key in first:
                    raise ValueError(f"{where}:{line}: key {_short(key)} given twice (first at line {first[key]}); "
                                     "give it once")
                first[key] = line
    return len(seen)


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as plain data. Refused: a mapping that gives one key twice (``FILE:LINE``), a tree
    nested deeper than 100 levels, and aliases that add more than :data:`MAX_YAML_VALUES` values to
    those written out (an alias bomb; measured without expanding it)."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:  # no document
            return None
        written = _written(loader, root, where)
        value = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {_short(str(exc), 400)}") from None
    except RecursionError:
        raise ValueError(f"{where}: YAML nested too deep") from None
    finally:
        loader.dispose()
    sizes: dict[int, int] = {}

    def size(v: Any, depth: int = 0) -> int:  # each shared (aliased) collection counted once, then looked up
        if not isinstance(v, dict | list):
            return 1
        if depth > 100:
            raise ValueError(f"{where}: YAML nested deeper than 100 levels")
        if id(v) not in sizes:
            sizes[id(v)] = 1 + sum(size(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        return sizes[id(v)]

    expanded = size(value)
    if expanded - written > MAX_YAML_VALUES:
        raise ValueError(f"{where}: {expanded:,} values after expanding YAML aliases ({written:,} as written); "
                         f"aliases may add at most {MAX_YAML_VALUES:,} (an alias bomb?); write the values out")
    return value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """A params file with its ``extends`` chain (each relative to the file that names it) and the
    ``--set`` ``overrides``, merged and validated (:func:`build`)."""
    return apply_overrides(_read_params(Path(path), ()), overrides or [])


def _read_params(path: Path, seen: tuple[Path, ...]) -> list[Layer]:
    if not path.is_file():
        raise ValueError(f"{path}: params file not found")
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' forms a cycle")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    params = parse_yaml(text, str(path))
    if not params:
        raise ValueError(f"{path}: params file is empty; expected sections such as seed, data, pretrain, probe "
                         "(see params.yaml), or 'extends: params.yaml' for a profile")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    base = params.pop("extends", None)
    chain = _read_params(path.parent / str(base), (*seen, path.resolve())) if base else []
    return [*chain, (str(path), params)]


def apply_overrides(params: Params | list[Layer], overrides: list[str]) -> Params:
    """``params`` (or its layers) with ``key.path=value`` overrides (values parsed as YAML) as the
    top layers. Two overrides that set one key to different values are refused."""
    layers = list(params._layers if isinstance(params, Params) else params)
    leaves: dict[str, tuple[Any, str]] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = (part.strip() for part in item.split("=", 1))
        value = parse_yaml(text, f"--set {item!r}: the value")
        for leaf, v in (flatten(value, key) if isinstance(value, Mapping) else {key: value}).items():
            if leaf in leaves and leaves[leaf][0] != v:
                raise ParamError(leaf, f"--set {item!r}: {{key}} is also set to {_short(leaves[leaf][0])} by "
                                       f"--set {leaves[leaf][1]!r}; give it once")
            leaves[leaf] = (v, item)
        for part in reversed(key.split(".")):
            value = {part: value}
        layers.append((f"--set {item!r}", value))
    return build(layers)


# ------------------------------------------------------------------------------------ sections
def pretrain_config(params: Params | Mapping[str, Any], method: str) -> PretrainConfig:
    """Method ``method``'s settings: ``pretrain.common`` merged under ``pretrain.<method>`` (see the
    module's rule), the top-level seed and the corpus ``pretrain.data``; the method's own rules
    checked here, reported where the user set the value."""
    methods.get(method)  # an unknown name is refused with the registered ones
    p = _params(params)
    cfg = p.pretrain[method]
    try:
        METHOD_RULES[method](cfg)
    except ParamError as exc:
        raise _placed(ParamError(f"pretrain.{method}.{exc.key}", exc.template), p._layers) from None
    return cfg


def data_config(params: Params | Mapping[str, Any]) -> DataConfig:
    return _params(params).data


def probe_config(params: Params | Mapping[str, Any]) -> ProbeConfig:
    return _params(params).probe


def transfer_config(params: Params | Mapping[str, Any]) -> TransferConfig:
    return _params(params).transfer


def validate_config(params: Params | Mapping[str, Any]) -> ValidateConfig:
    return _params(params).validate


def mlflow_config(params: Params | Mapping[str, Any]) -> MlflowConfig:
    return _params(params).mlflow


# pretrain settings outside the method sections: those that change only how fast a run goes, and
# those that also change what it learns (the global batch and CLICv2's negatives; where and in what
# order the views are finished), which docs/recipes.md lists in its table of them with
# data.cache_size. Every other setting is a method's, on the card with its source.
SPEED_ONLY = ("num_workers", "checkpoint_every", "sync_every", "compile", "threads", "amp", "channels_last",
              "shard_cache")
OUTSIDE_LEARNING = ("nprocs", "augment_on", "decode_on")


def method_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The resolved settings ``cfg.method`` reads, with the names of ``params.yaml`` (a ResNet has
    no patch size, SGD no betas): what ``clic params --method`` prints and docs/recipes.md lists."""
    full = to_dict(cfg)
    out = {k: v for k, v in full.items() if not isinstance(v, dict)}
    if not cfg.backbone.startswith("vit"):
        for k in ("patch_size", "depth", "pool"):
            out.pop(k)
    for section in methods.get(cfg.method).sections:
        out[section] = dict(full[section])
    out["optim"].pop("betas" if cfg.optim.name == "sgd" else "momentum")
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for tracking systems that want flat params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
