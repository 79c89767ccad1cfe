"""What every key map shares: where a checkpoint key lands in our tree, and rule matching."""
from __future__ import annotations

import re
from typing import NamedTuple


class Target(NamedTuple):
    path: str  # dotted NNX path of the leaf
    layer: int | None  # index into the stacked `layers` axis, for block parameters
    transform: str


# What `locate` returns for a key that is read past, as the reference does.
IGNORED_KEY = Target("", None, "ignored")


def match_rules(key: str, block_pattern: str, top_rules, block_rules) -> Target | None:
    """The first rule matching `key`. A key matching `block_pattern` (groups: layer, rest) is a
    per-layer key: its rest is matched against `block_rules` and the layer index is kept."""
    block = re.match(block_pattern, key)
    rules, name, layer = (block_rules, block.group(2), int(block.group(1))) if block else (top_rules, key, None)
    for pattern, template, transform in rules:
        match = re.match(pattern, name)
        if match:
            return Target(template.format(*match.groups()), layer, transform)
    return None
