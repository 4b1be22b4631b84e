"""Loading a Config: YAML plus dotted CLI overrides, typed and validated.

Every key has a type and a default. An unknown key is an error that names the closest valid key;
a wrong type or an impossible value is one line naming the field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from posttrain.config.checks import validate
from posttrain.config.schema import Config
from posttrain.errors import ConfigError, did_you_mean


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last, so a
    second `train:` section would silently drop the first one's keys)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be overridden here
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key '{key}' at line {line}; give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where (line, column) and what."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and start != mark:
        context += f" from line {start.line + 1}, column {start.column + 1}"
    return f"{where}: {what}" + (f" ({context})" if context else "")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `["a.b=1", "c=x"]` into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override '{item}': the value is not valid YAML{_yaml_problem(err)}; quote it "
                "(key='[text') or fix its brackets"
            ) from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain (YAML-shaped) dict."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply `a.b=value` overrides and validate.

    Args:
        path: a YAML file, or None for all defaults.
        overrides: dotted `key=value` strings (values parsed as YAML).

    Raises:
        ConfigError: unknown key (naming the closest valid one), wrong type or impossible value.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        try:
            data = yaml.load(p.read_text(), Loader=_RecipeLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML{_yaml_problem(err)}") from None
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def to_dict(cfg: Any) -> Any:
    """Plain-dict form of a config (for logging and checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def replace(cfg: Config, **sections: dict) -> Config:
    """Return a copy of `cfg` with some fields of some sections changed, validated."""
    data = to_dict(cfg)
    return config_from_dict(_merge(data, sections))


# What an SFT run reads; the SFT warm-up of an RL run inherits these sections and nothing else
WARMUP_INHERITS = ("model", "data", "optim", "train", "sft", "log", "env", "guide")


def warmup_config(cfg: Config, model_path: str, output_dir: str) -> Config:
    """The SFT warm-up run of `cfg`: `warmup.*` steps of SFT from `model_path` into `output_dir`.

    It inherits the sections an SFT run reads (WARMUP_INHERITS); every other section (the RL
    algorithm's advantage, KL, PPO, rollout, rewards, eval...) is at its defaults.
    """
    w = cfg.warmup
    data = {name: to_dict(getattr(cfg, name)) for name in WARMUP_INHERITS}
    if w.train_size is not None:
        data["data"]["train_size"] = w.train_size
    changes = {
        "model": {"path": model_path},
        "train": {
            "algorithm": "sft",
            "steps": w.steps,
            "output_dir": output_dir,
            "save_every": 0,
            "eval_every": 0,
            "resume": "auto",  # a warm-up stopped by SIGTERM continues from its checkpoint
            "sft_batch_size": w.batch_size,
            "stop_loss": w.stop_loss,
        },
        "optim": {"lr": w.lr, "warmup_steps": w.warmup_steps},
        "guide": {"enabled": False},  # only `guide.warmup_hinted` and the hint source apply
    }
    return config_from_dict(_merge(data, changes))
