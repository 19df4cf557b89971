"""A command line generated from a config dataclass, so flags never drift from the config.

Every field becomes `--field-name` (bools get `--x/--no-x`; an Optional[bool] takes `--x true|false`, absent
is None); help text comes from `field(metadata={"help": ...})`.
Values are layered: dataclass defaults < `--config FILE` (JSON or YAML) < explicit flags.
Unknown keys in a config file are an error naming the file.
`convert` is the one place a raw value (a flag's or `k=v` string, a YAML/JSON value) becomes a field's type:
the stages, the sweep's search space and --set, and Serve's builder arguments all go through it.
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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def convert(name: str, tp, value):
    """`value` as field `name`'s declared type `tp`, or a ValueError naming the field.

    Strings are what flags and `serve run k=v` give; YAML/JSON give typed values, with the quirks handled
    here: `1e-4` reads as a string, `4090` as an int where a str is declared, a single item where a list is.
    An Optional field takes None, or '' from a string (so `--set use_gpu=` restores the default).
    """
    inner, optional = _unwrap_optional(tp)
    if optional and (value is None or value == ""):
        return None
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        item = args[0] if args else str
        items = value if isinstance(value, (list, tuple)) else [value]
        return origin(convert(name, item, v) for v in items)
    if inner not in (bool, int, float, str):
        raise TypeError(f"config field {name}: unsupported type {tp}")
    bad = ValueError(f"{name}={value!r} is not a valid {_type_name(inner)}"
                     + (" (true or false)" if inner is bool else ""))
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `kv_cache: 0` in a YAML file
            return bool(value)
        if isinstance(value, str):
            try:
                return parse_bool(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise bad
    if inner is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    try:
        if inner is float:
            if isinstance(value, (int, float, str)):
                return float(value)
            raise bad
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                value = float(value)  # '1e3' from YAML or a flag
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    raise bad


def _flag_type(name: str, tp):
    """An argparse `type` through `convert`, whose message names the field (argparse's says 'invalid value')."""
    def parse(text: str):
        try:
            return convert(name, tp, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = _type_name(tp)
    return parse


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
    if tp is bool and not optional:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif tp is bool:  # three states, so a value is needed: true, false, or no flag (None)
        parser.add_argument(flag, type=_flag_type(f.name, tp), metavar="{true,false}", **kwargs)
    elif typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        parser.add_argument(flag, nargs="*", type=_flag_type(f.name, inner), metavar=f.name.upper(), **kwargs)
    elif tp in (int, float, str):
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=_flag_type(f.name, tp),
                            metavar=f.name.upper() if "choices" not in f.metadata else None, **kwargs)
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
    """`values` (field name -> raw value) with each converted to its field's type by `convert`."""
    hints = typing.get_type_hints(cls)
    return {name: convert(name, hints[name], value) for name, value in values.items()}


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
