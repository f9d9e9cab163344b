"""Command configs: every knob declared once, on a frozen dataclass, and filled from flags and `--config`.

A command's config is a frozen dataclass whose field defaults are the only defaults: its Typer
function names each parameter after the field and takes the default from the dataclass
(`lr: LrOpt = SFT_TRAIN.lr`), and its body is validation plus `from_cli(SftConfig, ctx, locals())`.
The options every trainer shares live in one `TrainOptions`, held by each trainer's config beside
its own knobs (`cfg.train.lr`); `build()` / `update()` take flat keyword arguments and route each to
the dataclass that owns it, so `build(SftConfig, data=(...,), lr=1e-3)` needs no nesting.

`--config FILE` (YAML or JSON, a mapping) supplies any field; keys are flag names (`kl-horizon`,
`lora`) or field names (`kl_horizon`, `lora_r`). The command line wins over the file. An unknown
key, a value of the wrong type or a value out of range exits 2 naming the file, the key and the fix.

Ranges and choices are declared beside the fields, as class-level `LIMITS` (checked by `check()`,
which every `run(cfg)` calls before loading anything):

    LIMITS = {"lr": "> 0", "warmup": ">= 0", "eval_split": "[0, 1)", "schedule": ("constant", "cosine")}
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from rlhf_cli.errors import RlhfError

C = TypeVar("C")
SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass(frozen=True)
class TrainOptions:
    """What every trainer (sft, train-rm, ppo) shares; each command sets its own defaults."""

    out: str = "out"  # the checkpoint directory; resume state goes to OUT-state/ beside it
    resume: bool = False
    save_every: int = 100  # resume state every N optimizer steps (0: never)
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-5  # peak AdamW learning rate
    schedule: str = "cosine"
    warmup: float = 0.0  # < 1: a fraction of the steps; >= 1: a number of steps
    decay_frac: float = 0.2  # wsd: the final decay's share of the steps
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # on matrices only, never on norms and biases
    max_grad_norm: float = 1.0  # 0: measure only
    grad_accum: int = 1  # microbatches per optimizer step, per process
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: float = 32.0
    keep_adapter: bool = False  # save the LoRA adapter instead of merging it
    gradient_checkpointing: bool = False
    shard: str = "none"  # under torchrun: none = DDP, full = FSDP2 (sharding.py)
    shard_offload: bool = False  # FSDP2 on CUDA: shards live in CPU memory
    dtype: str = "fp32"  # bf16: autocast over fp32 weights
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False

    LIMITS: ClassVar[dict[str, Any]] = {
        "save_every": ">= 0", "epochs": ">= 1", "max_steps": ">= 1", "lr": "> 0", "schedule": SCHEDULES,
        "warmup": ">= 0", "decay_frac": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": ">= 0",
        "max_grad_norm": ">= 0", "grad_accum": ">= 1", "lora_r": ">= 0", "lora_alpha": "> 0",
        "dtype": ("fp32", "bf16"), "shard": ("none", "full"),
    }
    FLAGS: ClassVar[dict[str, str]] = {"lora_r": "--lora"}

    @property
    def state_dir(self) -> Path:
        """Resume state lives beside the checkpoint, never inside it."""
        out = Path(self.out)
        return out.parent / f"{out.name}-state"


def check_train(opts: TrainOptions) -> None:
    """The shared option combinations every trainer refuses before loading anything."""
    from rlhf_cli.models.checkpoint import check_out_dir

    if opts.keep_adapter and not opts.lora_r:
        raise RlhfError("--keep-adapter needs --lora R")
    if opts.shard_offload and opts.shard != "full":
        raise RlhfError("--shard-offload needs --shard full")
    if opts.shard == "full" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise RlhfError("--shard full shards over the processes torchrun starts; this is one process",
                        "launch with torchrun --nproc-per-node N (N >= 2), or drop --shard full")
    if opts.resume and not (opts.state_dir / "latest").is_file():
        raise RlhfError(f"{opts.state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    check_out_dir(opts.out)


# ---------------------------------------------------------------- building configs from flat values


def leaf_fields(cls: type) -> dict[str, type]:
    """Every settable name of a config class -> the dataclass that owns it (nested dataclasses flattened)."""
    return _leaf_fields(typing.cast(Hashable, cls))


@functools.cache
def _leaf_fields(cls: Any) -> dict[str, type]:
    """Cached: config classes never change at run time (callers must not modify the returned dict)."""
    out: dict[str, type] = {}
    for f in fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            out.update(leaf_fields(sub))
        else:
            out[f.name] = cls
    return out


def build(cls: type[C], **values: Any) -> C:
    """`cls` from flat keyword arguments; nested dataclass fields start from the class's default instance."""
    return _fill(cls, _defaults(cls), values)


def update(cfg: C, **values: Any) -> C:
    """`dataclasses.replace` for flat keyword arguments (each routed to the dataclass that owns it)."""
    unknown = set(values) - set(leaf_fields(type(cfg)))
    if unknown:
        raise TypeError(f"{type(cfg).__name__} has no field {sorted(unknown)}")
    return _fill(type(cfg), {f.name: getattr(cfg, f.name) for f in fields(type(cfg))}, values)  # type: ignore[arg-type]


def flat(cfg: Any) -> dict[str, Any]:
    """The resolved values by field name, nested dataclasses flattened: what the manifest records,
    and a valid `--config` file for the same command."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out.update(flat(value) if is_dataclass(value) else {f.name: value})
    return out


def _fill(cls: type, base: dict[str, Any], values: dict[str, Any]) -> Any:
    kw: dict[str, Any] = {}
    for f in fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            start = base.get(f.name)
            start_kw = {g.name: getattr(start, g.name) for g in fields(sub)} if start is not None else _defaults(sub)
            kw[f.name] = _fill(sub, start_kw, values)
        elif f.name in values:
            kw[f.name] = values[f.name]
        elif f.name in base:
            kw[f.name] = base[f.name]
    return cls(**kw)


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _hints(cls: type) -> dict[str, Any]:
    return _hints_cached(typing.cast(Hashable, cls))


@functools.cache
def _hints_cached(cls: Any) -> dict[str, Any]:
    import sys

    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


# ---------------------------------------------------------------- ranges and choices


def check(cfg: Any, where: dict[str, str] | None = None) -> None:
    """Raise RlhfError for the first value outside its declared range or choices.

    `where` maps a field to how the user gave it (`--lr`, or `cfg.yaml: key 'lr'`); by default the
    field's flag name.
    """
    for name, owner in leaf_fields(type(cfg)).items():
        rule = getattr(owner, "LIMITS", {}).get(name)
        if rule is None:
            continue
        value = _get(cfg, name)
        problem = _violates(value, rule)
        if problem:
            label = (where or {}).get(name) or flag_of(type(cfg), name)
            raise RlhfError(f"{label} must be {problem}; got {value!r}", _range_hint(rule))


def _get(cfg: Any, name: str) -> Any:
    """The value of a leaf field, looked up in the (nested) dataclass that owns it."""
    if leaf_fields(type(cfg))[name] is type(cfg):
        return getattr(cfg, name)
    sub = next(v for f in fields(cfg) if is_dataclass(v := getattr(cfg, f.name)) and name in leaf_fields(type(v)))
    return _get(sub, name)


_INTERVAL = re.compile(r"^([\[(])\s*([-\d.e+]+)\s*,\s*([-\d.e+]+)\s*([\])])$")


def _violates(value: Any, rule: Any) -> str | None:
    """The rule text if `value` breaks it ('> 0', '>= 1', '[0, 1)', a tuple of choices), else None."""
    if value is None:
        return None
    if isinstance(rule, tuple):
        return None if value in rule else "one of " + ", ".join(map(str, rule))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"a finite number {rule}"
    m = _INTERVAL.match(rule)
    if m:
        lo, hi = float(m[2]), float(m[3])
        ok = (value >= lo if m[1] == "[" else value > lo) and (value <= hi if m[4] == "]" else value < hi)
        return None if ok else f"in {rule}"
    op, _, bound = rule.partition(" ")
    b = float(bound)
    ok = {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op]
    return None if ok else rule


def _range_hint(rule: Any) -> str:
    return "pick one of the listed values" if isinstance(rule, tuple) else f"use a value {rule}" if not rule.startswith(("[", "(")) else f"use a value in {rule}"


def flag_of(cls: type, name: str) -> str:
    owner = leaf_fields(cls).get(name, cls)
    return getattr(owner, "FLAGS", {}).get(name) or "--" + name.replace("_", "-")


# ---------------------------------------------------------------- the command line and --config


def from_cli(cls: type[C], ctx: Any, params: dict[str, Any], config_file: str | None = None, **fixed: Any) -> C:
    """Build `cls` from a Typer command's parameters (named as the fields) and an optional config file.

    Values the user typed (or set through the environment) beat the file; the file beats the
    defaults. `fixed` are values the command body computed itself (they win over both). The result
    is range-checked, naming the flag or the file key that gave a bad value.
    """
    names = leaf_fields(cls)
    values = {k: v for k, v in params.items() if k in names}
    where = {k: flag_of(cls, k) for k in names}
    if config_file:
        for key, (name, value) in read_config_file(config_file, cls, _aliases(ctx, cls)).items():
            if name not in values or not _typed(ctx, name):
                values[name] = value
                where[name] = f"{config_file}: key {key!r}"
    values.update(fixed)
    cfg = build(cls, **values)
    check(cfg, where)
    return cfg


def _typed(ctx: Any, name: str) -> bool:
    """Whether the user gave `name` on the command line (or through an environment variable)."""
    try:
        source = ctx.get_parameter_source(name)
    except Exception:  # not a parameter of this command
        return False
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def _aliases(ctx: Any, cls: type) -> dict[str, str]:
    """Every spelling a config key may use -> the field: field names and the command's flag names."""
    names = leaf_fields(cls)
    out = {n: n for n in names}
    for n in names:
        out[flag_of(cls, n).lstrip("-").replace("-", "_")] = n
    for p in getattr(getattr(ctx, "command", None), "params", []):
        if p.name in names:
            for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
                if opt.startswith("--"):
                    out.setdefault(opt[2:].replace("-", "_"), p.name)
    return out


def read_config_file(path: str, cls: type, aliases: dict[str, str] | None = None) -> dict[str, tuple[str, Any]]:
    """key as written -> (field, typed value) from a YAML or JSON mapping; exits 2 on anything wrong."""
    aliases = aliases if aliases is not None else {n: n for n in leaf_fields(cls)}
    p = Path(path)
    if not p.is_file():
        raise RlhfError(f"--config {path}: no such file", "give a YAML or JSON file of flag: value pairs")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            import orjson

            data = orjson.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # the parsers' own errors name the line and column
        raise RlhfError(f"{path}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} ({_one_line(e)})",
                        "write one 'flag: value' pair per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RlhfError(f"{path}: expected a mapping of flag: value, got {type(data).__name__}", "write one 'flag: value' pair per line")
    hints = {n: _hints(owner)[n] for n, owner in leaf_fields(cls).items()}
    out: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        name = aliases.get(str(key).strip().lstrip("-").replace("-", "_"))
        if name is None:
            near = difflib.get_close_matches(str(key).replace("_", "-"), sorted({k.replace("_", "-") for k in aliases}), n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"see `rlhf {_command_name(cls)} --help` for the flag names"
            raise RlhfError(f"{path}: unknown key {key!r}", hint)
        try:
            out[str(key)] = (name, coerce(value, hints[name]))
        except (TypeError, ValueError) as e:
            raise RlhfError(f"{path}: key {key!r}: {e}", f"write e.g. {key}: {_example(hints[name])}") from None
    return out


def coerce(value: Any, hint: Any) -> Any:
    """`value` (from YAML/JSON) as the field type `hint`; TypeError with a readable reason otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"got {value!r}")
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise TypeError(f"expected a list, got {value!r}")
        return tuple(coerce(v, args[0]) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _example(hint: Any) -> str:
    text = str(hint)
    return "2e-5" if "float" in text else "8" if "int" in text else "true" if "bool" in text else "[a, b]" if "tuple" in text else "'text'"


def _command_name(cls: type) -> str:
    return getattr(cls, "COMMAND", cls.__name__.removesuffix("Config").lower())


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
