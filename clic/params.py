"""Reading params files into the typed sections of :mod:`clic.config`.

:func:`load_params` reads a file and its ``extends`` chain as safe YAML (repeated keys, alias bombs
and non-UTF-8 files refused), checks every key and value type and applies ``--set`` overrides; the
section builders (:func:`pretrain_config`, ...) check bounds and cross-field rules. Every failure is
a :class:`ParamError` naming the dotted key, in a user's words (not pydantic's). Nothing read runs.

One precedence for a method's settings, lowest first: the files' ``pretrain.common``, the files'
``pretrain.<method>``, ``--set pretrain.common.K``, ``--set pretrain.<method>.K`` (the top-level
``seed`` is a level below ``pretrain.common``, in files and overrides alike). A key the user sets
wins over every file's value of it (:func:`apply_overrides`), or is refused with the reason when
the section is built (``--set pretrain.common.backbone=resnet50`` for CLICv2, a ViT method).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from clic import methods
from clic.config import (
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
TOP_LEVEL = frozenset({"seed", "data", "pretrain", "validate", "probe", "transfer", "mlflow"})
SECTIONS: dict[str, type[Section]] = {"data": DataConfig, "validate": ValidateConfig, "probe": ProbeConfig,
                                      "transfer": TransferConfig, "mlflow": MlflowConfig}


def _join(where: str, name: object) -> str:
    if isinstance(name, int):
        return f"{where}[{name}]"
    return f"{where}.{name}" if where and name != "" else (where or str(name))


def _dotted(where: str, loc: tuple[Any, ...]) -> str:
    return functools.reduce(_join, loc, where)


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``("a.b", 1)`` -> ``{"a": {"b": 1}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _unknown(keys: Collection[str], name: object, where: str) -> ParamError:
    """An unknown key, with the nearest of the valid ``keys`` (``pretrian`` -> ``pretrain``)."""
    valid = sorted(keys)
    near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean {_join(where, near[0])!r}? " if near else ""
    if not near and keys is TOP_LEVEL and str(name) in PretrainConfig.model_fields:
        hint = f"did you mean 'pretrain.<method>.{name}' (or 'pretrain.common.{name}')? "
    if not near and name == "common" and where.startswith("pretrain."):
        hint = "did you mean 'pretrain.common'? "  # beside the methods' sections, not in one
    return ParamError(_join(where, name), "{key}: unknown key; " + hint + f"valid keys here: {', '.join(valid)}")


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    for part in loc:
        ann = cls.model_fields[str(part)].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
    return cls


def _translate(exc: ValidationError, cls: type[BaseModel], where: str) -> ParamError:
    """pydantic's first error as a :class:`ParamError` at its dotted key, in this module's words."""
    err = exc.errors()[0]
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err.get("input"), err.get("ctx") or {}
    key = _dotted(where, loc)
    if kind == "extra_forbidden":
        return _unknown(_model_at(cls, loc[:-1]).model_fields, loc[-1], _dotted(where, loc[:-1]))
    if kind == "value_error":
        orig = ctx.get("error")
        if isinstance(orig, ParamError):  # a section's cross-field rule, keyed relative to the section
            return ParamError(_join(key, orig.key), orig.template)
        text = str(orig)
        return ParamError(key, "{key}" + (text if text.startswith(":") else f" {text}"))
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        shown = float(value) if isinstance(ctx[name], float) and isinstance(value, int) else value  # as validated
        return ParamError(key, f"{{key}} must be {sign} {ctx[name]:g}, got {_short(shown)}")
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return ParamError(key, f"{{key}}: expected one of {choices}, got {_short(value)}")
    if kind == "finite_number":
        return ParamError(key, f"{{key}} must be a finite number, got {value}")
    if kind == "too_short":
        return ParamError(key, "{key} must not be empty")
    typ = _TYPE_NAMES.get(kind.rsplit("_", 1)[0])
    if typ:
        return ParamError(key, f"{{key}}: expected {typ}, got {_short(value)}")
    return ParamError(key, f"{{key}}: {err['msg']}, got {_short(value)}")


def from_dict(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """Build section ``cls`` from a mapping; unknown keys, wrongly typed and out-of-range values
    raise :class:`ParamError` naming the dotted key under ``where``."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ParamError(where or cls.__name__, f"{{key}}: expected a mapping, got {_short(raw)}")
    try:
        return cls.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise _translate(exc, cls, where) from None


_LEAVES: dict[tuple[type, str], TypeAdapter] = {}


def check_tree(cls: type[BaseModel], raw: Any, where: str) -> None:
    """Check the keys and value types of a partial section ``raw`` (bounds and cross-field rules
    are checked when the whole section is built, by the command that uses it)."""
    if not isinstance(raw, Mapping):
        raise ParamError(where, f"{{key}}: expected a mapping, got {_short(raw)}")
    for name, value in raw.items():
        field = cls.model_fields.get(str(name))
        if field is None:
            raise _unknown(cls.model_fields, name, where)
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            check_tree(ann, value, _join(where, name))
            continue
        if (cls, name) not in _LEAVES:
            lax = getattr(ann, "__origin__", None) is tuple
            _LEAVES[(cls, name)] = TypeAdapter(Annotated[ann, Field(strict=False)] if lax else ann,
                                               config=ConfigDict(strict=True))
        try:
            _LEAVES[(cls, name)].validate_python(value)
        except ValidationError as exc:
            raise _translate(exc, cls, _join(where, name)) from None


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse unknown keys (top-level and in every section) and wrongly typed values anywhere in
    a params tree, naming the dotted key and the nearest valid one."""
    for name, value in params.items():
        if name not in TOP_LEVEL:
            raise _unknown(TOP_LEVEL, name, "")
        if name == "seed" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ParamError("seed", f"{{key}}: expected int, got {_short(value)}")
        if name in SECTIONS and value is not None:
            check_tree(SECTIONS[name], value, name)
        if name == "pretrain" and value is not None:
            if not isinstance(value, Mapping):
                raise ParamError("pretrain", f"{{key}}: expected a mapping, got {_short(value)}")
            for part, sub in value.items():
                if part == "data":
                    _corpus(sub)
                elif part in ("common", *methods.names()):
                    if sub is not None:
                        check_tree(PretrainConfig, sub, f"pretrain.{part}")
                else:
                    raise _unknown(("data", "common", *methods.names()), part, "pretrain")


def _corpus(data: Any) -> list[str]:
    data = [data] if isinstance(data, str) else (data or [])
    if not isinstance(data, list | tuple) or not all(isinstance(d, str) for d in data):
        raise ParamError("pretrain.data", f"{{key}}: expected a list of folder/archive paths (or one path), got "
                         f"{_short(data)}")
    for i, entry in enumerate(data):  # existence is checked when the corpus is listed
        if not entry.strip():
            raise ParamError(f"pretrain.data[{i}]", "{key} is empty; name an image folder, archive or prepared dataset")
    return list(data)


# --------------------------------------------------------------------------------- reading
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
    those written out (an alias bomb; measured without expanding it). A long file without aliases
    is only as large as it is written."""
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


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a params file; a top-level ``extends: OTHER.yaml`` (relative to the file) names a base
    that this file is deep-merged over. Each file and each override is checked for unknown keys
    and value types (:func:`check_params`)."""
    return apply_overrides(_read_params(Path(path), ()), overrides or [])


def _read_params(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
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
    try:
        check_params(params)
    except ParamError as exc:
        raise ParamError(exc.key, f"{path}: {exc.template}") from None
    if base:
        params = deep_merge(_read_params(path.parent / str(base), (*seen, path.resolve())), params)
    return params


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def check_override(key: str, value: Any) -> None:
    """Refuse an override of dotted ``key`` that the schema does not know or whose ``value`` has
    the wrong type (:class:`ParamError` naming the key and the nearest valid one)."""
    check_params(_nest(key, value))


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a params mapping. A mapping
    value merges into its section; two overrides that set one key to different values, an unknown
    key or a wrongly typed value are refused (:class:`ParamError` naming the override).

    A value set here beats every value of the files, also the more specific ones: the result is a
    params tree that means, read as a file, what the user asked for (see :func:`_shadowed`)."""
    params = dict(params)
    leaves: dict[str, tuple[Any, str]] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = (part.strip() for part in item.split("=", 1))
        value = parse_yaml(text, f"--set {item!r}: the value")
        try:
            check_override(key, value)
        except ParamError as exc:
            raise ParamError(exc.key, f"--set {item!r}: {exc.template}") from None
        for leaf, v in (flatten(value, key) if isinstance(value, Mapping) else {key: value}).items():
            if leaf in leaves and leaves[leaf][0] != v:
                raise ParamError(leaf, f"--set {item!r}: {{key}} is also set to {_short(leaves[leaf][0])} by "
                                       f"--set {leaves[leaf][1]!r}; give it once")
            leaves[leaf] = (v, item)
        params = deep_merge(params, _nest(key, value))
    for leaf in leaves:
        for specific in _shadowed(leaf):
            if specific not in leaves:
                params = _drop(params, specific)
    return params


def _shadowed(key: str) -> list[str]:
    """The more specific keys that a file's value of ``key`` gives way to, and that an override of
    ``key`` therefore clears. One order for a method's settings, lowest first: the top-level
    ``seed``, ``pretrain.common``, ``pretrain.<method>``; the files merge in that order, then the
    overrides do (``--set pretrain.common.epochs=3`` reaches every method, over the methods' own
    ``epochs``; ``--set pretrain.clicv2.epochs=4`` beats it for CLICv2)."""
    if key == "seed":
        return ["pretrain.common.seed", *(f"pretrain.{m}.seed" for m in methods.names())]
    if key.startswith("pretrain.common."):
        return [f"pretrain.{m}.{key.removeprefix('pretrain.common.')}" for m in methods.names()]
    return []


def _drop(tree: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of ``tree`` without the dotted key (the same tree where it is absent)."""
    head, _, rest = dotted.partition(".")
    out = dict(tree)
    if head in out and not rest:
        del out[head]
    elif isinstance(out.get(head), Mapping):
        out[head] = _drop(out[head], rest)
    return out


# ------------------------------------------------------------------------------------ sections
def pretrain_config(params: Mapping[str, Any], method: str) -> PretrainConfig:
    """``pretrain.common`` deep-merged with ``pretrain.<method>`` (the method's section wins: in a
    file; overrides of ``pretrain.common`` have already cleared the method sections' values, see
    :func:`apply_overrides`), plus the top-level seed and the corpus ``pretrain.data`` (one list for
    every method: what the validate stage checks)."""
    methods.get(method)  # an unknown name is refused with the registered ones
    section = params.get("pretrain") or {}
    for part in ("common", method):
        for key, why in (("data", "the pretraining corpus is set once, as pretrain.data (it applies to every "
                                  "method)"), ("method", "the method is the section's name")):
            if key in (section.get(part) or {}):
                raise ParamError(f"pretrain.{part}.{key}", "{key}: " + why)
    merged = deep_merge(section.get("common") or {}, section.get(method) or {})
    merged.setdefault("seed", params.get("seed", 0))
    merged["data"], merged["method"] = _corpus(section.get("data")), method
    try:
        return from_dict(PretrainConfig, merged, f"pretrain.{method}")
    except ParamError as exc:  # a value inherited from pretrain.common is reported there
        rel = exc.key.removeprefix(f"pretrain.{method}.")
        if _has_path(section.get("common"), rel) and not _has_path(section.get(method), rel):
            raise ParamError(f"pretrain.common.{rel}", exc.template) from None
        raise


def _has_path(tree: Any, dotted: str) -> bool:
    for part in dotted.split("[", 1)[0].split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True


def _section(cls: type[T], name: str) -> Any:
    return lambda params: from_dict(cls, params.get(name) or {}, name)


probe_config = _section(ProbeConfig, "probe")
transfer_config = _section(TransferConfig, "transfer")
data_config = _section(DataConfig, "data")
validate_config = _section(ValidateConfig, "validate")
mlflow_config = _section(MlflowConfig, "mlflow")


# the settings that change how fast a run goes, not what it learns (docs/recipes.md lists every
# other one with its source; each method names the sections it reads)
ENGINEERING = ("num_workers", "checkpoint_every", "sync_every", "compile", "threads", "augment_on", "decode_on",
               "nprocs", "amp", "channels_last", "shard_cache")


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
