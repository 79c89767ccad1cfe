"""`--config PATH[:ARG]` and `--config.FIELD=VALUE`: Python config files, big_vision style.

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`. A name
without a path is a training preset of the package (`stage1`, `stage2`, `stage3_ode`, `stage3_dmd`,
helios_jax/training/presets.py; no configs/ folder needed) or else `configs/models/NAME.py` of this
repository (`tiny`, `helios_14b`).
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names it."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not path.endswith(".py") and not file.exists():
        from helios_jax.training import presets

        if path in presets.PRESETS:
            try:
                return presets.get_config(path, arg or None)
            except ValueError as error:
                raise ConfigError(f"--config: {spec} rejected its argument: {error}") from None
        file = REPO_CONFIGS / "models" / f"{path}.py"
    if not file.is_file():
        raise ConfigError(f"--config: no config file {file}")
    module_spec = importlib.util.spec_from_file_location(f"helios_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(f"--config: {file} failed to load: {error}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {file} has no get_config(arg)")
    try:
        return module.get_config(arg or None)
    except Exception as error:
        raise ConfigError(f"--config: {file}:{arg} rejected its argument: {error}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` strings; values are Python literals, or plain strings."""
    for item in overrides:
        flag, sep, text = item.partition("=")
        if not flag.startswith("--config.") or not sep:
            raise ConfigError(f"{item}: expected --config.FIELD=VALUE")
        *parents, field = flag[len("--config."):].split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ConfigError(f"{flag}: no config field {name!r}")
            node = node[name]
        if field not in node:
            raise ConfigError(f"{flag}: no config field {field!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        current = node[field]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[field] = value
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{flag}: {error}") from None
    return config


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.FIELD=VALUE` items from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides
