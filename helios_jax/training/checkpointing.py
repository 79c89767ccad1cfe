"""Orbax checkpoints of a training run in WORKDIR/checkpoints/<step>/: the train state (trainable
parameters, optimizer state, step, rng), the data iterator's state (grain's Orbax handler, one
JSON file per process) and the resolved config. Saves are asynchronous; resuming picks the latest
complete checkpoint (a save cut off by a kill is never one), and a checkpoint written with a
config that differs in a resume-guarded field is refused."""
from __future__ import annotations

import grain
import orbax.checkpoint as ocp
from etils import epath

from helios_jax.training.config import flatten, guarded_differences


class ConfigMismatch(ValueError):
    """The checkpoint to resume from was written with another config."""


class Checkpoints:
    def __init__(self, workdir, config):
        self.config = flatten(config)
        workdir = epath.Path(workdir)
        # A local folder is made absolute (Orbax wants that); gs://... paths go to Orbax as they are.
        self.directory = (workdir if "://" in str(workdir) else workdir.resolve()) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(config.train.keep_checkpoints),
            save_interval_steps=int(config.checkpoint_every),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_latest_config(self) -> None:
        """Refuse early (before any model is built) when the latest checkpoint has another config."""
        latest = self.latest_step()
        if latest is not None:
            self.check_config(latest)

    def check_config(self, step: int) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        differences = guarded_differences(saved, self.config)
        if differences:
            raise ConfigMismatch(f"checkpoint {self.directory / str(step)} was written with a different config: "
                                 f"{'; '.join(differences)} (use another --workdir, or the checkpoint's values)")

    def restore(self, step: int, abstract_state, iterator):
        """The train state at `step` (placed as `abstract_state`'s shardings say); `iterator` is
        set to where it was when that checkpoint was saved."""
        self.check_config(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        return restored["state"]

    def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
        """Save if `step` is a checkpoint step (or `force`); returns whether it did."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            config=ocp.args.JsonSave(self.config)))

    def save_step(self, done: int, total: int, state, iterator) -> bool:
        """After step `done` of `total`: save when it is a checkpoint step, the last step, or a
        preemption is signalled. True when the run should stop now (preempted; the step is saved,
        so re-running the command resumes here)."""
        last = done == total and self.latest_step() != done
        self.save(done, state, iterator, force=last)
        return self.manager.reached_preemption(done)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
