"""`helios-jax forward`: one transformer call on random inputs shaped as the pipeline builds them."""
from __future__ import annotations

import time

from helios_jax.commands.arguments import latent_size


def add_command(commands) -> None:
    forward = commands.add_parser(
        "forward",
        help="run one transformer forward on random pipeline-shaped inputs and report it",
        description="Run the Helios transformer once on random inputs shaped as the pipeline builds them "
        "(history of 16+2+2 latent frames, 512 text tokens) and print shapes, statistics and timings. "
        "Accepts --config PATH[:ARG] and --config.FIELD=VALUE overrides with --model tiny-random.",
    )
    forward.add_argument("--model", required=True, help="'tiny-random' (random weights) or a transformer folder")
    forward.add_argument("--config", default="tiny", help="model config for tiny-random: PATH[:ARG] or a name")
    forward.add_argument("--latent-size", type=latent_size, default=(9, 16, 16), help="current chunk T,H,W in latents")
    forward.add_argument("--no-history", action="store_true", help="run without history latents (a plain Wan forward)")
    forward.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    forward.add_argument("--seed", type=int, default=0)
    forward.set_defaults(run=run)


def run(args, overrides) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from helios_jax.config_flags import apply_overrides, load_config
    from helios_jax.distributed import log
    from helios_jax.loading import load
    from helios_jax.models.example_inputs import example_inputs, token_counts
    from helios_jax.models.forward import make_forward, parameter_count
    from helios_jax.models.transformer import HeliosTransformer3DModel

    if args.model == "tiny-random":
        config = apply_overrides(load_config(args.config), overrides)
        if args.dtype:
            config.dtype = args.dtype
        model = HeliosTransformer3DModel(config, rngs=nnx.Rngs(args.seed))
    else:
        if overrides:
            raise ValueError(f"{overrides[0]}: --config overrides apply to --model tiny-random only")
        model = load(args.model, dtype=args.dtype)
        config = model.config
    history = not args.no_history
    inputs = example_inputs(config, args.latent_size, history=history, seed=args.seed)
    history_tokens, current_tokens = token_counts(config, args.latent_size, history=history)
    forward, state = make_forward(model)

    log(f"model: {args.model}  layers={config.num_layers}  dim={config.num_attention_heads * config.attention_head_dim}"
          f"  dtype={config.dtype}  parameters={parameter_count(model):,}")
    log(f"tokens: {history_tokens} history + {current_tokens} current = {history_tokens + current_tokens}"
          f"  (backend: {jax.default_backend()})")
    for name, value in inputs.items():
        log(f"  {name:32s} {tuple(value.shape)} {value.dtype}")
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, **inputs))
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, **inputs))
    ran = time.perf_counter() - start
    values = np.asarray(out, np.float32)
    if not np.isfinite(values).all():
        raise FloatingPointError("transformer output has non-finite values")
    log(f"output (velocity for the current chunk): {tuple(out.shape)} {out.dtype}"
          f"  mean={values.mean():+.4f} std={values.std():.4f}")
    log(f"first call (compile + run): {compiled:.2f} s   second call: {ran * 1e3:.1f} ms")
