"""One way to build a component config: defaults, checked overrides, validation, named presets."""
from __future__ import annotations

from typing import Callable

import ml_collections


def build_config(
    component: str,
    defaults: dict,
    overrides: dict,
    validate: Callable[[ml_collections.ConfigDict], None],
    tuple_fields: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """`defaults` with `overrides` applied; an unknown field is an error naming the component.
    List values of `tuple_fields` (as JSON gives them) become tuples so configs compare and hash."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {component} config field(s): {', '.join(unknown)}")
    fields = {**defaults, **overrides}
    for key in tuple_fields:
        if fields[key] is not None:
            fields[key] = tuple(fields[key])
    config = ml_collections.ConfigDict(fields)
    validate(config)
    return config


def preset_overrides(component: str, presets: dict, name: str) -> dict:
    if name not in presets:
        raise ValueError(f"unknown {component} preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]
