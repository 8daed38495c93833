"""Typed, nested dataclass configs: YAML file + `key=value` overrides, validated on load.

Every stage defines its config as a dataclass whose fields carry a docstring on the
line below them (CleanRL style). `load_config(Cls, path, overrides)` builds one, checks
every type, runs each dataclass's `validate()` and raises `ConfigError` naming the
offending key and value. `save_config` writes the resolved config beside an output.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rlhflab.errors import ConfigError
from rlhflab.io import TRACKERS, atomic_write_text, tracker_installed, tracker_names

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class RunFields:
    """The fields every stage shares, embedded as `run` in each stage's config (one
    definition, one meaning; lm-human-preferences' RunHParams)."""

    seed: int = 0
    """Seed of everything random in the stage: initialisation, dropout, data order, sampling."""
    device: str = "auto"
    """Where to run: 'auto' (CUDA when present, else the CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    report_to: str | list[str] = "none"
    """Experiment trackers that get every metrics.jsonl row too: 'none', 'tensorboard' (event
    files in <out_dir>/tensorboard), 'wandb' (<out_dir>/wandb, offline unless WANDB_MODE is
    set), or both: 'tensorboard,wandb' or a list; pip extras rlhflab[tensorboard], rlhflab[wandb]."""

    def validate(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(bool(self.device), "device", self.device, "must name a device (auto, cpu, cuda, ...)")
        names = tracker_names(self.report_to)
        known = ", ".join(("none", *TRACKERS))
        check(all(n in TRACKERS for n in names), "report_to", self.report_to, f"must name trackers among {known}")
        for name in names:
            why = f"{name} is not installed: pip install 'rlhflab[{name}]'"
            check(tracker_installed(name), "report_to", self.report_to, why)


@dataclass
class TrainFields:
    """The optimisation fields every training stage shares (pretrain, SFT, RM, PPO), embedded
    as `train`; each stage's default and its source are in that stage's docstring."""

    lr: float = 1e-4
    """Peak learning rate."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this before each optimizer step (PPO: the policy's and the
    value model's, each); null: no clipping."""
    save_every: int = 200
    """Write the resumable checkpoint every this many steps (PPO: PPO iterations), and at
    the end of each epoch and of the run."""
    precision: str = "fp32"
    """'fp32', or 'bf16': forwards under bfloat16 autocast while weights, optimizer state,
    log-softmax and losses stay fp32. Pays on a GPU or a CPU with fast bf16 matmuls
    (BENCHMARKS.md); `rlhflab run --precision auto` picks it where it does."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input in the forward and recompute the rest in the
    backward (HF's activation checkpointing, non-reentrant): activation memory stops growing
    with depth, for about one more forward per step; the same losses and weights. PPO: the
    policy and the value model."""
    parallel: str = "auto"
    """Under torchrun (more than one process): 'ddp' (every rank holds the whole model and
    its optimizer state; gradients all-reduced), 'fsdp' (FSDP2: weights, gradients and
    Adam state sharded over the ranks; each block all-gathered for its forward and
    backward), or 'auto' (DDP). One process ignores it; the steps are the same either way."""

    def validate(self) -> None:
        check(self.lr >= 0 and math.isfinite(self.lr), "lr", self.lr, "must be >= 0 and finite")
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "must be > 0, or null for no clipping",
        )
        check(self.save_every >= 1, "save_every", self.save_every, "must be >= 1")
        check(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {list(PRECISIONS)}")
        check(self.parallel in PARALLEL, "parallel", self.parallel, f"must be one of {list(PARALLEL)}")


def train_fields(**defaults) -> Any:
    """A `train` block default for a stage config: dataclasses.field(default_factory=...)."""
    return dataclasses.field(default_factory=lambda: TrainFields(**defaults))


def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None):
    """Build `cls` from defaults <- `base` <- YAML file <- `key=value` overrides."""
    raw: dict = {}
    if base:
        _merge(raw, base)
    if path is not None:
        _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value", field=item)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key, parsed)
    obj = _build(cls, raw, prefix="", source=str(path) if path else None)
    _validate(obj, prefix="")
    return obj


def add_config_arguments(parser, cls) -> None:
    """`--config FILE.yaml` and `--help-config` for a config-driven command; `--help` lists
    the keys of `cls` with their defaults (the command line takes `--key=value` or
    `--key value` for each)."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", help="YAML config file; --key=value overrides follow it")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its default and meaning, then exit",
    )
    parser.epilog = "config keys (--key=value or --key value; --help-config says what each means):\n" + "\n".join(
        describe(cls, brief=True)
    )


def config_from_args(cls, args, base: dict | None = None):
    """The config of a command: defaults <- `base` <- --config file <- overrides.
    With --help-config, print every key with its meaning and the value it takes (`base`
    applied: `rlhflab run`'s preset), then exit."""
    if getattr(args, "help_config", False):
        shown = load_config(cls, None, [], base=base) if base else None
        print("\n".join(describe(cls, default_obj=shown)))
        raise SystemExit(0)
    return load_config(cls, args.config, args.overrides, base=base)


def save_config(obj, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def flat_dict(obj, prefix: str = "") -> dict:
    """A config (or its dict, as config.yaml holds it) as {dotted key: value}: nested config
    blocks flattened ('train.lr')."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: copy.deepcopy(v)})
        return out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_dict(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = copy.deepcopy(value)
    return out


def check(condition: bool, key: str, value: Any, why: str) -> None:
    """Raise ConfigError for `key` unless `condition` holds (used inside `validate()`)."""
    if not condition:
        raise ConfigError(f"{why} (got {value!r})", field=key)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls, prefix: str = "", default_obj=None, brief: bool = False) -> list[str]:
    """Each (dotted) field: key, default and docstring (`--help-config`); `brief`: key and
    default only, a nested block as one line (`--help`)."""
    lines, docs = [], field_docs(cls)
    hints = typing.get_type_hints(cls)
    default_obj = cls() if default_obj is None else default_obj
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):  # the parent's default for it, not tp()'s
            if brief:
                lines.append(f"  {key}.*  ({tp.__name__}: see --help-config)")
            else:
                lines.extend(describe(tp, key + ".", getattr(default_obj, f.name)))
            continue
        default = getattr(default_obj, f.name)
        lines.append(f"  {key} = {default!r}" if brief else f"  {key} = {default!r}\n      {docs.get(f.name, '')}")
    return lines


# --------------------------------------------------------------------------- internals


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("config file not found", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 (byte {e.start})", file=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(
            f"not valid YAML: {getattr(e, 'problem', e)}",
            file=str(path),
            line=None if line is None else line + 1,
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping of key: value", file=str(path))
    return data


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str, source: str | None, base=None):
    """`raw` over `base` (default: cls()): a nested field starts from its parent's default
    (e.g. a default_factory that sets some keys), not from its own class's defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"expected a mapping, got {type(raw).__name__}", field=prefix.rstrip(".") or "<root>", file=source
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(names))})", field=prefix + str(key), file=source)
    base = cls() if base is None else base
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", source, getattr(base, name))
        else:
            kwargs[name] = _coerce(value, tp, key, source)
    return dataclasses.replace(base, **kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    origin = get_origin(tp)
    bad = ConfigError(f"expected {_type_name(tp)}, got {value!r}", field=key, file=source)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"must be one of {list(get_args(tp))}, got {value!r}", field=key, file=source)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.{k}", source): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate(obj) -> None:
    """Check a config built in Python as `load_config` checks one it reads: every nested
    block's `validate()`, then the config's own; a ConfigError names the dotted key."""
    _validate(obj, prefix="")


def _validate(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child, prefix + f.name + ".")
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            if e.field is not None and prefix and not e.field.startswith(prefix):
                e.field = prefix + e.field
                e.args = (str(e),)
            raise
