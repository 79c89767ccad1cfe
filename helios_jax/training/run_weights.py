"""The transformer a `helios-jax train` run trained, read back from its workdir: the resolved
config.json, the model with its LoRA built as the run built it, and the trained or EMA values of
one checkpoint (spec training.md §10). Only the generator's parameters are read from the
checkpoint: optimizer moments, the critic and the data state stay on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from helios_jax.training.stages import DISTILL_STAGES  # their state names the trained generator `generator`
from helios_jax.training.lora import trainable_filter
from helios_jax.training.model_setup import build_student
from helios_jax.training.trainer import abstract_of, merge_model, split_model

WEIGHTS = ("ema", "trained")


class RunError(ValueError):
    """A workdir, step or weights choice that names no trained model."""


class TrainedModel(NamedTuple):
    model: nnx.Module  # the transformer with its LoRA adapters, holding the restored values
    config: ml_collections.ConfigDict  # the run's resolved config
    step: int
    weights: str  # "ema" or "trained"


def run_config(workdir) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{workdir}: no config.json (not a `helios-jax train` workdir)")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: invalid JSON ({error})") from None


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the complete checkpoints in WORKDIR/checkpoints (Orbax marks a finished save with
    commit_success.txt or its _CHECKPOINT_METADATA; a save cut off by a kill has a tmp name)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir() and (p / "_CHECKPOINT_METADATA").is_file())


def default_weights(config) -> str:
    """The release recipe: the EMA where the run keeps one (Stage 3), else the trained values."""
    return "ema" if config.get("ema") is not None else "trained"


def load_trained(workdir, *, step: int | None = None, weights: str | None = None, mesh=None) -> TrainedModel:
    """The run's model at checkpoint `step` (default: the latest) with `weights` ("ema" or
    "trained"; default: `default_weights`). `mesh` places it (default: one device)."""
    from helios_jax.parallel import make_mesh

    config = run_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunError(f"{workdir}: no complete checkpoint under checkpoints/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"--step {step}: {workdir} has checkpoints at steps {', '.join(map(str, steps))}")
    weights = weights or default_weights(config)
    if weights not in WEIGHTS:
        raise RunError(f"--weights {weights!r}: must be one of {', '.join(WEIGHTS)}")
    if weights == "ema" and config.get("ema") is None:
        raise RunError(f"--weights ema: the run in {workdir} keeps no EMA (stage {config.train.stage}); "
                       "use --weights trained")
    mesh = mesh if mesh is not None else make_mesh()
    model = build_student(config, mesh)
    split, master = split_model(model, trainable_filter(config.lora.history_patches))
    del model
    trained_field = "generator" if config.train.stage in DISTILL_STAGES else "trainable"
    where = ("ema", "params") if weights == "ema" else (trained_field,)
    values = _restore_subtree(Path(workdir).resolve() / "checkpoints" / str(step) / "state", where,
                              abstract_of(master))
    return TrainedModel(merge_model(split, values, split.frozen), config, step, weights)


def _restore_subtree(state_dir: Path, where: tuple[str, ...], abstract):
    """The subtree of a saved train state at the key path `where`, placed as `abstract` says;
    nothing else of the state is read."""
    item = abstract
    for key in reversed(where):
        item = {key: item}
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    for key in where:
        restored = restored[key]
    return restored
