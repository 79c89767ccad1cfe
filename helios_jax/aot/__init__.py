"""Ahead-of-time compilation for a TPU topology on a machine without TPUs (`helios-jax aot`).

libtpu describes any slice (`v5p:4x4x4`) as abstract devices (helios_jax/tpu_topology.py); a mesh
over them, parameters and inputs as `ShapeDtypeStruct`s with shardings from helios_jax.parallel,
and `jit(...).lower(...).compile()` give the compiler's own memory plan and FLOP count per device,
without allocating anything. That answers "does this step fit on that slice, with that mesh?"
before renting it.

- `steps.py`: what is compiled, one builder per task in `TASKS` but `generate`;
- `report.py`: compiling one step and the report `helios-jax aot` prints;
- `generate.py`: `--task generate`, every program of a generate and the memory plan of the run.

This module imports no jax, so the command's parser can read the task names.
"""
TASKS = ("forward", "rollout", "train", "stage1", "stage3_generator", "stage3_critic", "generate")
MODELS = ("helios_14b", "tiny")
