"""`helios-jax aot`: compile a step for a TPU slice on this (TPU-less) machine and print its memory
plan per device and its FLOPs (helios_jax/aot/ does the work)."""
from __future__ import annotations

from helios_jax.aot import MODELS, TASKS  # no jax import: building the parser stays cheap


def add_command(commands) -> None:
    aot = commands.add_parser(
        "aot", help="compile a step ahead of time for a TPU topology and print memory per device and FLOPs",
        description="Compile one step of the Helios transformer at 384x640 for a TPU slice described by "
        "libtpu (no TPU needed) and print per-device memory (arguments, outputs, temporaries, peak), "
        "FLOPs, and whether the peak fits the chip's HBM. Exit 0 when it compiled.")
    aot.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x4, v6e:2x4, v5p:2x2x1, v5p:4x4x4")
    aot.add_argument("--model", default="helios_14b", choices=MODELS, help="transformer preset")
    aot.add_argument("--task", default="forward", choices=TASKS,
                     help="forward: one transformer call; rollout: the Distilled chunk program; "
                     "train: loss + gradient of every parameter with full remat; "
                     "stage1: the real Stage-1 LoRA optimizer step of `helios-jax train`; "
                     "stage3_generator / stage3_critic: the two Stage-3b updates (GAN version); "
                     "generate: every program a Distilled generate runs (text encoder, chunk, VAE decode) on "
                     "generate's mesh, and the whole run's peak per chip for each memory plan")
    aot.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                     help="mesh over data,fsdp,tensor,seq (one size may be -1); default fsdp over all devices "
                     "(--task generate: auto, the choice generate makes)")
    aot.add_argument("--quantize", choices=("int8",), help="--task generate: weight-only int8 transformer and text encoder")
    aot.add_argument("--height", type=int, default=384, help="--task generate: pixels (multiple of 64)")
    aot.add_argument("--width", type=int, default=640, help="--task generate: pixels (multiple of 64)")
    aot.add_argument("--memory-plan", default="auto", help="--task generate: the plan to report as generate's "
                     "(auto: the first that fits)")
    aot.add_argument("--batch", type=int, default=None,
                     help="global batch (default: 1 video for forward/rollout, one sample per data-parallel rank for train)")
    aot.add_argument("--attention", default="xla", choices=("xla", "pallas_tpu", "splash_tpu"),
                     help="self/cross-attention implementation compiled into the program "
                          "(pallas_tpu: our flash kernels, splash_tpu: jax's splash kernels)")
    aot.set_defaults(run=run)


def run(args, overrides) -> None:
    if overrides:
        raise ValueError(f"{overrides[0]}: aot takes no --config overrides")
    from helios_jax.aot.report import compile_report, format_report
    from helios_jax.tpu_topology import quiet_libtpu_environment
    from helios_jax.distributed import log

    quiet_libtpu_environment(args.topology)
    import jax

    # The host runs nothing itself: keep its own backend on the CPU even where libtpu is installed.
    jax.config.update("jax_platforms", "cpu")
    if args.task == "generate":
        from helios_jax.aot.generate import format_generate_report, generate_report

        report = generate_report(args.topology, model=args.model, mesh_text=args.mesh or "auto",
                                 quantize=args.quantize, attention=args.attention, memory_plan=args.memory_plan,
                                 height=args.height, width=args.width, progress=log)
        for line in format_generate_report(report):
            log(line)
        return
    if args.quantize:
        raise ValueError("--quantize applies to --task generate")
    report = compile_report(args.topology, model=args.model, task=args.task, mesh_text=args.mesh,
                            batch=args.batch, attention=args.attention, progress=log)
    for line in format_report(report):
        log(line)
