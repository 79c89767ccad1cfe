"""Argument types and flags that several commands share: each parses or checks one thing and names
the flag in its one-line error."""
from __future__ import annotations

import argparse
import os


def steps_list(text: str) -> tuple[int, ...]:
    """`2,2,2` -> (2, 2, 2): steps per pyramid stage."""
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts such as 2,2,2; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive; got {text!r}")
    return steps


def latent_size(text: str) -> tuple[int, int, int]:
    """`9,16,16` -> (9, 16, 16): latent T,H,W."""
    try:
        t, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,H,W latent sizes, got {text!r}") from None
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"latent sizes must be positive, got {text!r}")
    return t, h, w


def variant_list(text: str) -> tuple[str, ...]:
    """`distilled,base` -> ("distilled", "base")."""
    from helios_jax.sampling.variants import VARIANTS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(VARIANTS)}; got {text!r}")
    return names


def byte_size(text: str) -> int:
    """`5GB`, `500MiB` -> bytes."""
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")


# ------------------------------------------------------------------------------------------------
# How generate and serve use the devices


def add_device_arguments(parser) -> None:
    """--mesh, --quantize, --memory-plan, --attention."""
    from helios_jax.sampling.memory_plan import PLANS

    parser.add_argument("--mesh", default="auto", metavar="auto|AXIS=SIZE,...",
                        help="devices to run on: auto (default: every device, the layout over data,fsdp,tensor whose "
                        "compiled chunk program fits and is fastest) or sizes over data,fsdp,tensor,seq, e.g. fsdp=8 "
                        "or tensor=4,fsdp=2 (one size may be -1)")
    parser.add_argument("--quantize", choices=("int8",), help="weight-only int8 transformer and text encoder "
                        "(half the memory of bf16: the 14B on one 16 GiB chip)")
    parser.add_argument("--memory-plan", default="auto", choices=PLANS,
                        help="where the text encoder waits between prompts: resident (on the device), "
                        "offload_text_encoder (host memory), sequential (host; the transformer too while it "
                        "encodes), one_at_a_time (each large component alone on the device; frames after the last "
                        "chunk); auto: the first that fits")
    parser.add_argument("--attention", help="force one attention implementation (xla, cudnn, pallas_gpu, pallas_tpu, "
                        "splash_tpu) instead of the measured choice; also HELIOS_ATTENTION_IMPL")


def check_device_arguments(args) -> None:
    """The device flags, checked before any weight is read or program compiled."""
    import jax

    from helios_jax.kernels.dispatch import FORCE_VARIABLE, IMPLEMENTATIONS, forced_impl
    from helios_jax.sampling.mesh_choice import check_mesh_flag

    check_mesh_flag(args.mesh, jax.device_count())
    if args.quantize and args.dtype == "float32":
        raise ValueError("--quantize int8 stores bf16-scaled int8 weights for bf16 matmuls; it cannot be combined "
                         "with --dtype float32")
    if args.attention is not None:
        if args.attention not in IMPLEMENTATIONS or args.attention == "auto":
            raise ValueError(f"--attention must be one of {', '.join(i for i in IMPLEMENTATIONS if i != 'auto')}; "
                             f"got {args.attention!r}")
        try:
            forced_impl({FORCE_VARIABLE: args.attention})  # one this backend cannot run fails here, not mid-compile
        except ValueError as error:
            raise ValueError(str(error).replace(f"{FORCE_VARIABLE}=", "--attention ")) from None
        os.environ[FORCE_VARIABLE] = args.attention  # what impl="auto" resolves to
    else:
        forced_impl()  # a bad HELIOS_ATTENTION_IMPL is reported before anything is built


def device_options(args, height: int, width: int, progress) -> dict:
    """The pipeline constructors' placement keywords from the device flags."""
    return dict(mesh=args.mesh, quantize=args.quantize, memory_plan=args.memory_plan, height=height, width=width,
                progress=progress)
