"""A command line generated from a config dataclass, so flags never drift from the config.

Every field becomes `--field-name` (bools get `--x/--no-x`); help text comes from `field(metadata={"help": ...})`.
Values are layered: dataclass defaults < `--config FILE` (JSON or YAML) < explicit flags.
Unknown keys in a config file are an error naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _inherited_help(cls, name: str) -> str:
    """A subclass that only changes a default keeps the base field's help."""
    for base in cls.__mro__:
        for f in dataclasses.fields(base) if dataclasses.is_dataclass(base) else ():
            if f.name == name and f.metadata.get("help"):
                return f.metadata["help"]
    return ""


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hints: dict, cls):
    flag = "--" + f.name.replace("_", "-")
    tp, optional = _unwrap_optional(hints[f.name])
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    help_text = f.metadata.get("help") or _inherited_help(cls, f.name)
    help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
    kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        parser.add_argument(flag, nargs="*", type=inner, metavar=f.name.upper(), **kwargs)
    elif tp in (int, float, str):
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=tp, metavar=f.name.upper() if "choices" not in f.metadata else None,
                            **kwargs)
    else:
        raise TypeError(f"config field {f.name}: unsupported type {tp}")


def build_parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", dest="__config__", metavar="FILE", default=argparse.SUPPRESS,
                        help="JSON or YAML file of config values; flags given on the command line win")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            _add_field(parser, f, hints, cls)
    return parser


def read_config_file(path, cls) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise ValueError(f"{path}: cannot parse config ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of field names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown config fields {unknown}; known: {sorted(names)}")
    return values


def coerce(cls, values: dict) -> dict:
    """Convert JSON/YAML values (lists, ints for floats) to the field types."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        tp, _ = _unwrap_optional(hints[name])
        if value is None:
            out[name] = None
        elif typing.get_origin(tp) is tuple:
            out[name] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif tp is bool and isinstance(value, str):
            out[name] = parse_bool(value)
        else:
            out[name] = value
    return out


def parse_config(cls, argv=None, description: str = "", prog: str | None = None, base=None):
    """Build `cls` from defaults (or `base`, an instance), an optional --config file and flags."""
    args = vars(build_parser(cls, description, prog).parse_args(argv))
    values = dataclasses.asdict(base) if base is not None else {}
    config_file = args.pop("__config__", None)
    if config_file:
        values.update(read_config_file(config_file, cls))
    values.update(args)
    return cls(**coerce(cls, values))


def save_config(cfg, path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")
