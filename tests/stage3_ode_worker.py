"""Stage 3a end to end on the tiny model, run as a script by tests/test_stage3_ode.py (in its own
process so XLA can compile with less optimisation: these steps are compile-bound on CPU).

argv: a scratch folder. It runs
  1. `helios-jax prepare-ode --model tiny-random` on two prompts -> SCRATCH/ode,
  2. `helios-jax train --config configs/train/stage3_ode.py:tiny` on it with seed 0, so the student
     starts from the teacher's weights (the reference's student init = Mid) -> SCRATCH/run,
  3. the student's deterministic distance to the teacher (ode_distance over every chunk, stage and
     stored step) before training, after it, and for the EMA, both restored from the last checkpoint,
     and for the EMA fused into the transformer by `helios-jax merge-lora` -> SCRATCH/merged,
  4. the teacher's chunk 0 for the first prompt again, with the plain (not recording) chunk program
     on the same merged schedule and draws -> SCRATCH/plain_chunk0.npy,
and prints one JSON line with what the test asserts on.
"""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.cli import main
from helios_jax.config_flags import apply_overrides, load_config
from helios_jax.parallel import make_mesh
from helios_jax.data.negative_prompt import TRAINING_NEGATIVE_PROMPT
from helios_jax.commands.prepare_ode import load_teacher
from helios_jax.sampling.noise import NoiseSource
from helios_jax.sampling.rollout import make_chunk_program
from helios_jax.training.checkpointing import Checkpoints
from helios_jax.loading import load
from helios_jax.sampling.pipeline import HeliosPipeline
from helios_jax.training.lora import trainable_filter
from helios_jax.training.model_setup import build_student
from helios_jax.training.stage3_ode_data import OdeDataset, make_ode_loader
from helios_jax.training.stage3_ode_regression import ode_distance
from helios_jax.training.stage3_ode_teacher import TeacherRollout
from helios_jax.training.optimizer import make_optimizer
from helios_jax.training.trainer import abstract_of, initial_state, merge_model, split_model

CONFIG = "configs/train/stage3_ode.py:tiny"
STEPS = 30
HEIGHT = WIDTH = 64  # latent 8x8: pyramid stages 2x2, 4x4, 8x8
TEACHER_STEPS, SEED = 2, 42
PROMPTS = "a red fox running through snow\n\n  a boat on a lake at dusk  \n"


def plain_first_chunk(data: Path, out: Path) -> None:
    """Chunk 0 of the first record's prompt, run by the sampler's chunk program without recording."""
    teacher, text_encoder = load_teacher("tiny-random")
    record = OdeDataset(data)[0]
    rollout = TeacherRollout(teacher, latent_height=HEIGHT // 8, latent_width=WIDTH // 8, teacher_steps=TEACHER_STEPS,
                             guidance_scale=5.0)
    plan = rollout.plans[True]
    channels, size = teacher.config.in_channels, (HEIGHT // 8, WIDTH // 8)
    inputs = rollout.chunk_inputs(NoiseSource(SEED), plan, jnp.zeros((1, channels, 19, *size)),
                                  jnp.zeros((1, channels, 1, *size)), record["prompt_embed"][None],
                                  text_encoder.encode_negative(TRAINING_NEGATIVE_PROMPT, 1))
    latents = make_chunk_program(nnx.graphdef(teacher))(plan.spec, nnx.state(teacher), inputs, plan.tables)
    np.save(out, np.asarray(latents))


def record_batches(path):
    dataset = OdeDataset(path)
    batches = []
    for index in range(len(dataset)):
        record = dataset[index]
        batch = {k: v[None] for k, v in record.items() if isinstance(v, np.ndarray) and k != "prompt_embed"}
        batches.append({**batch, "prompt_embeds": record["prompt_embed"][None]})
    return batches


def restored_models(config, workdir, mesh):
    """(trained student, its EMA, restored state) from the run's last checkpoint."""
    model = build_student(config, mesh)
    split, master = split_model(model, trainable_filter(config.lora.history_patches))
    abstract = abstract_of(initial_state(master, make_optimizer(config.optimizer), int(config.seed), mesh,
                                         with_ema=True))
    checkpoints = Checkpoints(workdir, config)
    iterator = make_ode_loader(config.data_dir, batch_size=1, seed=int(config.data.seed))
    state = checkpoints.restore(checkpoints.latest_step(), abstract, iterator)
    checkpoints.close()
    return (merge_model(split, state.trainable, split.frozen), merge_model(split, state.ema.params, split.frozen),
            state)


def run(scratch: Path) -> dict:
    prompts = scratch / "prompts.txt"
    prompts.write_text(PROMPTS)
    data, workdir = scratch / "ode", scratch / "run"
    code = main(["prepare-ode", "--prompts", str(prompts), "--model", "tiny-random", "--out", str(data),
                 "--num-chunks", "2", "--height", str(HEIGHT), "--width", str(WIDTH),
                 "--teacher-steps", str(TEACHER_STEPS), "--seed", str(SEED)])
    assert code == 0, f"prepare-ode exited {code}"
    plain_first_chunk(data, scratch / "plain_chunk0.npy")
    overrides = [f"--config.data_dir={data}", "--config.seed=0", f"--config.total_steps={STEPS}",
                 f"--config.checkpoint_every={STEPS}", "--config.distill.ode_sections=2",
                 "--config.optimizer.lr=5e-3", "--config.train.log_every=1"]
    config = apply_overrides(load_config(CONFIG), overrides)
    mesh = make_mesh(fsdp=-1)
    batches = record_batches(data)
    initial = build_student(config, mesh)
    before = float(np.mean([ode_distance(initial, b) for b in batches]))
    del initial
    code = main(["train", "--config", CONFIG, "--workdir", str(workdir), *overrides])
    assert code == 0, f"train exited {code}"
    trained, ema, state = restored_models(config, workdir, mesh)
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    code = main(["merge-lora", "--workdir", str(workdir), "--out", str(scratch / "merged")])
    assert code == 0, f"merge-lora exited {code}"
    merged = load(scratch / "merged", dtype="float32")
    pipe = HeliosPipeline.tiny_random("distilled", transformer=scratch / "merged")  # generate --transformer
    uses_merged = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(pipe.transformer)),
                                                           jax.tree.leaves(nnx.state(merged))))
    return {
        "records": len(batches),
        "ids": [OdeDataset(data)[i]["id"] for i in range(len(batches))],
        "before": before,
        "after": float(np.mean([ode_distance(trained, b) for b in batches])),
        "ema_after": float(np.mean([ode_distance(ema, b) for b in batches])),
        "merged_ema_after": float(np.mean([ode_distance(merged, b) for b in batches])),
        "pipeline_uses_merged": uses_merged,
        "ema_updates": int(state.ema.updates),
        "step": int(state.step),
        "losses": losses,
    }


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
