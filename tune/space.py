"""A search space over a stage's config fields, parsed from YAML or `--param` flags into Ray Tune domains.

Two spellings, one meaning:

    # YAML (--space FILE)                      # flags
    lr: {loguniform: [1e-4, 1e-2]}             --param lr=loguniform:1e-4,1e-2
    batch_size: {grid: [8, 16]}                --param batch_size=grid:8,16
    warmup: [0, 0.03, 0.1]                     --param warmup=grid:0,0.03,0.1   (a plain list is a grid)
    accumulation_steps: {choice: [1, 2, 4]}    --param accumulation_steps=choice:1,2,4
    min_lr_ratio: {uniform: [0.05, 0.2]}       --param min_lr_ratio=uniform:0.05,0.2
    seed: 3                                    --param seed=3                   (a constant)

Every name is checked against the stage's config dataclass and every value converted to the field's type
here, in the driver, so a typo or an empty grid fails before any trial (and its cluster time) starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from minimind.configcli import convert

KINDS = ("grid", "choice", "uniform", "loguniform", "const")

# Fields the sweep sets per trial (each trial writes its own output and Ray Train run).
PER_TRIAL = frozenset({"out", "storage_path", "run_name", "resume"})


@dataclass(frozen=True)
class Param:
    kind: str             # one of KINDS
    values: tuple         # grid/choice: the values; uniform/loguniform: (low, high); const: (value,)


def field_types(config_cls) -> dict[str, type]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _convert(name: str, tp, value):
    """One value to the field's type, by the stages' own conversion (YAML reads `1e-4` as a string, flags
    are all strings), so a sweep accepts exactly the words the stage's flags and config files do."""
    try:
        return convert(name, tp, value)
    except ValueError as e:
        raise ValueError(f"search space: {e}") from None
    except TypeError:
        raise ValueError(f"search space: field {name} has type {tp}, which cannot be swept") from None


def make_param(name: str, kind: str, values, config_cls) -> Param:
    types = field_types(config_cls)
    if name not in types:
        raise ValueError(f"search space: unknown field {name!r} for {config_cls.__name__}; "
                         f"known: {sorted(set(types) - PER_TRIAL)}")
    if name in PER_TRIAL:
        raise ValueError(f"search space: {name} is set per trial by the sweep and cannot be swept")
    if kind not in KINDS:
        raise ValueError(f"search space: {name}: unknown kind {kind!r}; use one of {KINDS[:-1]}")
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if kind in ("grid", "choice") and not values:
        raise ValueError(f"search space: {name}: empty {kind} (give at least one value)")
    values = tuple(_convert(name, types[name], v) for v in values)
    if kind in ("uniform", "loguniform"):
        if types[name] is not float or len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"search space: {name}: {kind} needs a float field and LOW,HIGH with LOW < HIGH")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"search space: {name}: loguniform needs LOW > 0")
    if kind == "const" and len(values) != 1:
        raise ValueError(f"search space: {name}: a constant takes one value")
    return Param(kind, values)


def parse_yaml(path, config_cls) -> dict[str, Param]:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"search space file {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a search space is a mapping of field names to values or domains")
    space = {}
    for name, value in spec.items():
        name = name.replace("-", "_")
        if isinstance(value, dict):
            if len(value) != 1:
                raise ValueError(f"{path}: {name}: give exactly one of {KINDS[:-1]}, got {sorted(value)}")
            (kind, values), = value.items()
        elif isinstance(value, list):
            kind, values = "grid", value
        else:
            kind, values = "const", [value]
        space[name] = make_param(name, kind, values, config_cls)
    return space


def parse_flag(text: str, config_cls) -> tuple[str, Param]:
    """`name=kind:v1,v2,...` or `name=value`."""
    if "=" not in text:
        raise ValueError(f"--param {text!r}: expected NAME=KIND:V1,V2 or NAME=VALUE")
    name, rhs = text.split("=", 1)
    name = name.strip().replace("-", "_")
    kind, sep, rest = rhs.partition(":")
    if sep and kind in KINDS:
        values = [v.strip() for v in rest.split(",") if v.strip()]
    else:
        kind, values = "const", [rhs]
    return name, make_param(name, kind, values, config_cls)


def parse_space(config_cls, space_file=None, flags=()) -> dict[str, Param]:
    """The YAML file's space with `--param` flags added or overriding it."""
    space = parse_yaml(space_file, config_cls) if space_file else {}
    for text in flags:
        name, param = parse_flag(text, config_cls)
        space[name] = param
    return space


def grid_size(space: dict[str, Param]) -> int:
    n = 1
    for p in space.values():
        if p.kind == "grid":
            n *= len(p.values)
    return n


def to_tune(space: dict[str, Param], search: str) -> dict:
    """Ray Tune's param_space. `grid` runs every grid point (x num_samples for the random domains);
    `random` draws each trial's values, grid lists included, from the space."""
    from ray import tune
    if search not in ("grid", "random"):
        raise ValueError(f"--search {search!r}: use grid or random")
    out = {}
    for name, p in space.items():
        if p.kind == "const":
            out[name] = p.values[0]
        elif p.kind == "grid":
            out[name] = tune.grid_search(list(p.values)) if search == "grid" else tune.choice(list(p.values))
        elif p.kind == "choice":
            out[name] = tune.choice(list(p.values))
        elif p.kind == "uniform":
            out[name] = tune.uniform(*p.values)
        else:
            out[name] = tune.loguniform(*p.values)
    return out
