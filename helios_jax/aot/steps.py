"""The steps `helios-jax aot` compiles, as (jitted function, abstract arguments, model FLOPs):
`forward` (one transformer call), `rollout` (the Distilled chunk program: 3 pyramid stages x 2 DMD
steps, its real schedule tables), `train` (flow-matching loss + gradient of every parameter, full
remat, no optimizer), `stage1` (the real Stage-1 LoRA optimizer step) and `stage3_generator` /
`stage3_critic` (the two Stage-3b updates), each at the pipeline's 384x640 shapes (latent 9x48x80
per chunk). Parameters and inputs are ShapeDtypeStructs sharded on the mesh: nothing is allocated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helios_jax.aot import MODELS
from helios_jax.parallel import abstract_sharded, mesh_over_all, parse_mesh_sizes, sharding_for
from helios_jax.sampling.abstract_chunk import batch_sharded as _batch_sharded
from helios_jax.sampling.abstract_chunk import replicated as _replicated
from helios_jax.tpu_topology import TopologyError as AotError



def parse_mesh(text: str | None) -> dict:
    """`fsdp=4,tensor=2` -> {"fsdp": 4, "tensor": 2}; None or "" -> fsdp over every device."""
    if not text:
        return {"fsdp": -1}
    try:
        return parse_mesh_sizes(text)
    except ValueError as error:
        raise AotError(str(error)) from None


def build_mesh(devices: list, sizes: dict) -> Mesh:
    try:
        return mesh_over_all(sizes, devices)
    except ValueError as error:
        raise AotError(str(error)) from None


LATENT_SIZE = (9, 48, 80)  # one chunk at 384x640: 33 frames -> 9 latent frames, 8x spatial VAE


TEXT_TOKENS = 512


ATTENTION = ("xla", "pallas_tpu", "splash_tpu")


def model_config(name: str, task: str, attention: str = "xla"):
    from helios_jax.models import transformer_config

    if name not in MODELS:
        raise AotError(f"--model must be one of {', '.join(MODELS)}; got {name!r}")
    if attention not in ATTENTION:
        raise AotError(f"--attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    # Training keeps only each block's input across the scan (full remat): memory flat in depth.
    # The host traces on its CPU backend, where "auto" would mean xla: the kernel is named explicitly.
    training = task in TRAINING_TASKS
    # A TPU kernel attention (pallas_tpu, splash_tpu) compiles the Pallas kernels of a TPU run: that
    # attention and the q/k norm + RoPE.
    return transformer_config.preset(name, remat_policy="full" if training else "none", attention_impl=attention,
                                     norm_rope_impl="pallas_tpu" if attention.endswith("_tpu") else "xla")


def abstract_state(config, mesh: Mesh):
    """(graphdef, parameters as ShapeDtypeStructs sharded by their logical axes). Nothing is allocated."""
    from helios_jax.models.transformer import HeliosTransformer3DModel

    return abstract_sharded(lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)), mesh)


def abstract_forward_inputs(config, mesh: Mesh, batch: int) -> dict:
    """The transformer's keyword arguments as the pipeline shapes them (history 16+2+2 frames)."""
    from helios_jax.models.example_inputs import example_inputs

    shapes = jax.eval_shape(lambda: example_inputs(config, LATENT_SIZE, batch=batch, text_len=TEXT_TOKENS))
    return {name: (_replicated if name.startswith("indices") else _batch_sharded)(s.shape, s.dtype, mesh)
            for name, s in shapes.items()}


def forward_step(graphdef, state, config, mesh: Mesh, batch: int):
    """(jitted function, its abstract arguments)."""
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return jax.jit(forward), (state, abstract_forward_inputs(config, mesh, batch)), batch * forward_flops(config)


def train_step(graphdef, state, config, mesh: Mesh, batch: int):
    """Flow matching: x_t = (1 - s) x0 + s noise, target noise - x0, MSE in fp32; returns the loss
    and the gradient of every parameter (sharded like the parameter)."""
    inputs = abstract_forward_inputs(config, mesh, batch)
    clean = inputs.pop("hidden_states")
    noise = jax.ShapeDtypeStruct(clean.shape, jnp.float32, sharding=clean.sharding)
    clean = jax.ShapeDtypeStruct(clean.shape, jnp.float32, sharding=clean.sharding)
    sigma = _batch_sharded((batch,), jnp.float32, mesh)
    inputs.pop("timestep")

    def loss_fn(state, clean, noise, sigma, inputs):
        s = sigma[:, None, None, None, None]
        noisy = ((1 - s) * clean + s * noise).astype(config.dtype)
        prediction = nnx.merge(graphdef, state)(noisy, sigma * 1000.0, **inputs)
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - (noise - clean)))

    def step(state, clean, noise, sigma, inputs):
        return jax.value_and_grad(loss_fn)(state, clean, noise, sigma, inputs)

    param_shardings = jax.tree.map(lambda s: s.sharding, state)
    jitted = jax.jit(step, out_shardings=(NamedSharding(mesh, PartitionSpec()), param_shardings))
    # Backward = 2 x forward (the convention of MFU); full remat adds one more forward not counted.
    return jitted, (state, clean, noise, sigma, inputs), 3 * batch * forward_flops(config)


def rollout_step(graphdef, state, config, mesh: Mesh, batch: int):
    """The Distilled chunk program (steady-state chunk: 3 stages x 2 DMD steps, no CFG)."""
    from helios_jax.sampling.abstract_chunk import chunk_arguments
    from helios_jax.sampling.rollout import make_chunk_program

    scheduler, settings = distilled_sampling()
    _, h, w = LATENT_SIZE
    spec, inputs, tables = chunk_arguments(config, scheduler, settings, mesh, latent_height=h, latent_width=w,
                                           batch=batch)
    return make_chunk_program(graphdef), (spec, state, inputs, tables), chunk_flops(config, spec, batch)


def distilled_sampling():
    """(scheduler, settings) of the Distilled variant's defaults, no CFG."""
    from helios_jax.sampling.chunk_plan import HISTORY_SIZES, LATENT_FRAMES_PER_CHUNK, SamplingSettings
    from helios_jax.sampling.schedulers import HeliosScheduler
    from helios_jax.sampling.variants import DEFAULTS, SCHEDULER_CONFIGS

    scheduler = HeliosScheduler.from_config_json(SCHEDULER_CONFIGS["distilled"])
    settings = SamplingSettings(pyramid_steps=tuple(DEFAULTS["distilled"]["pyramid_num_inference_steps_list"]),
                                guidance="none", history_sizes=HISTORY_SIZES, frames=LATENT_FRAMES_PER_CHUNK,
                                is_amplify_first_chunk=True)
    return scheduler, settings


def chunk_flops(config, spec, batch: int) -> float:
    return batch * sum(s.num_steps * forward_flops(config, (spec.frames, s.height, s.width)) for s in spec.stages)


def forward_flops(config, current_size=None) -> float:
    """Matmul FLOPs of one transformer call on one sample (helios_jax.models.flops)."""
    from helios_jax.models.example_inputs import token_counts
    from helios_jax.models.flops import transformer_flops

    history, current = token_counts(config, LATENT_SIZE, current_size=current_size)
    return transformer_flops(config, history, current, TEXT_TOKENS)


def stage1_step(graphdef, state, config, mesh: Mesh, batch: int):
    """The real Stage-1 optimizer step of `helios-jax train` (configs/train/stage_1_init.py): LoRA
    rank 128 on every linear and the patch embedding, full fp32 history patchers, the flow-matching
    loss with history augmentation, clip + AdamW on the trainable parameters only (fp32 masters and
    moments, sharded like the parameters), the frozen base in bf16."""
    from helios_jax.config_flags import load_config
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.training.stage1_flow_matching import stage1_loss
    from helios_jax.training.lora import add_lora, trainable_filter
    from helios_jax.training.optimizer import make_optimizer
    from helios_jax.training.trainer import TrainState, make_train_step

    del graphdef, state  # the base model is rebuilt with its adapters
    train_config = load_config("stage1")
    lora = train_config.lora

    def model():  # built abstractly inside _abstract_split (nnx.eval_shape): nothing is allocated
        return add_lora(HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)), rank=int(lora.rank),
                        alpha=float(lora.alpha), patch_embedding=lora.patch_embedding,
                        history_patches=lora.history_patches, rngs=nnx.Rngs(1))

    split, master, opt_state, optimizer = _abstract_split(model, trainable_filter(lora.history_patches),
                                                          make_optimizer(train_config.optimizer), mesh)
    frozen = split.frozen
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    train_state = TrainState(master, opt_state, step, rng)
    frames, height, width = LATENT_SIZE
    channels = config.in_channels
    batch_inputs = {
        "x0_latents": _batch_sharded((batch, channels, 1, height, width), jnp.float32, mesh),
        "history_latents": _batch_sharded((batch, channels, 19, height, width), jnp.float32, mesh),
        "target_latents": _batch_sharded((batch, channels, frames, height, width), jnp.float32, mesh),
        "prompt_embeds": _batch_sharded((batch, TEXT_TOKENS, config.text_dim), jnp.float32, mesh),
    }
    loss = lambda model, batch, key: stage1_loss(model, batch, key, train_config)  # noqa: E731
    state_shardings = jax.tree.map(lambda x: x.sharding, train_state)
    jitted = jax.jit(make_train_step(split, loss, optimizer), out_shardings=(state_shardings, None), donate_argnums=(0,))
    return jitted, (train_state, frozen, batch_inputs), 3 * batch * forward_flops(config)


def stage3_step(kind: str):
    """The Stage-3b updates of `helios-jax train` with configs/train/stage_3_post_gan.py (the GAN
    version, the larger one): `generator` = backward-simulation roll-out + DMD + GAN generator loss
    and its AdamW step; `critic` = no-grad roll-out + denoising + discriminator/R1 loss and its step
    (with the EMA update). Two frozen 14B backbones in bf16 (generator; score = teacher + critic),
    LoRA r256 + the GAN heads in fp32 with their moments, all FSDP-sharded."""

    def build(graphdef, state, config, mesh: Mesh, batch: int):
        from helios_jax.config_flags import load_config
        from helios_jax.models.transformer import HeliosTransformer3DModel
        from helios_jax.training.stage3_dmd import Critic
        from helios_jax.training.stage3_dmd_trainer import DistillState, critic_filter, make_distill_steps
        from helios_jax.training.ema import EMAState
        from helios_jax.training.stage3_gan_heads import GanHeads
        from helios_jax.training.lora import add_lora, trainable_filter
        from helios_jax.training.optimizer import make_optimizer

        del graphdef, state  # both backbones are rebuilt with their adapters
        train_config = load_config("stage3_dmd:gan")
        if max(train_config.gan.hooks) >= config.num_layers:  # the tiny model: hook its first and last block
            train_config.gan.update(hooks=(0, config.num_layers - 1), cond_map_dim=64)
        lora, critic_lora, gan = train_config.lora, train_config.critic, train_config.gan
        dim = config.num_attention_heads * config.attention_head_dim

        def generator():
            return add_lora(HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)), rank=int(lora.rank),
                            alpha=float(lora.alpha), patch_embedding=lora.patch_embedding,
                            history_patches=lora.history_patches, rngs=nnx.Rngs(1))

        def critic():
            backbone = add_lora(HeliosTransformer3DModel(config, rngs=nnx.Rngs(2)), rank=int(critic_lora.lora_rank),
                                alpha=float(critic_lora.lora_alpha), rngs=nnx.Rngs(3))
            heads = GanHeads(dim, config.out_channels, int(gan.cond_map_dim), hooks=tuple(gan.hooks), rngs=nnx.Rngs(4))
            return Critic(backbone, heads)

        g_split, g_master, g_opt_state, g_opt = _abstract_split(generator, trainable_filter(lora.history_patches),
                                                                make_optimizer(train_config.optimizer), mesh)
        c_split, c_master, c_opt_state, c_opt = _abstract_split(critic, critic_filter(),
                                                                make_optimizer(train_config.critic_optimizer), mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
        state = DistillState(g_master, g_opt_state, c_master, c_opt_state, EMAState(g_master, scalar), scalar, rng)
        frames, height, width = LATENT_SIZE
        channels, f32 = config.in_channels, jnp.float32
        batch_inputs = {}
        for suffix in ("", "_2"):
            batch_inputs.update({
                "x0_latents" + suffix: _batch_sharded((batch, channels, 1, height, width), f32, mesh),
                "history_latents" + suffix: _batch_sharded((batch, channels, 19, height, width), f32, mesh),
                "target_latents" + suffix: _batch_sharded((batch, channels, frames, height, width), f32, mesh),
                "prompt_embeds" + suffix: _batch_sharded((batch, TEXT_TOKENS, config.text_dim), f32, mesh),
            })
        batch_inputs["negative_prompt_embeds"] = _batch_sharded((batch, TEXT_TOKENS, config.text_dim), f32, mesh)
        generator_step, critic_step = make_distill_steps(g_split, c_split, g_opt, c_opt, train_config)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        # Forwards per update (spec §6.2.5, max exits): roll-out 6 (+3 with gradient for the generator),
        # scores F + 2 R, the discriminator on half-size crops (generator: 1 sample, critic: 3).
        forward = forward_flops(config)
        if kind == "generator":
            jitted = jax.jit(lambda st, fg, fc, b: generator_step(st, fg, fc, b, True), out_shardings=(shardings, None),
                             donate_argnums=0)
            flops = batch * forward * (6 + 2 * 3 + 3 + 3 * 0.25)
        else:
            jitted = jax.jit(lambda st, fg, fc, b, ema: critic_step(st, fg, fc, b, ema, True),
                             out_shardings=(shardings, None), donate_argnums=0)
            flops = batch * forward * (6 + 3 + 3 * 3 * 0.25)
        args = (state, g_split.frozen, c_split.frozen, batch_inputs)
        if kind == "critic":
            args += (jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated),)
        return jitted, args, flops

    return build


def _abstract_split(build_fn, trainable, optimizer, mesh: Mesh):
    """(SplitModel, fp32 master structs, optimizer state structs, optimizer) of `build_fn()`, all
    abstract and sharded by the parameters' logical axes (the trainer's split, without arrays)."""
    import optax

    from helios_jax.training.trainer import SplitModel

    model = nnx.eval_shape(build_fn)
    graphdef, selected, frozen = nnx.split(model, trainable, ...)
    frozen = jax.tree.map(lambda var: _abstract_variable(var, mesh), frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
    variables = [var for _, var in nnx.to_flat_state(selected)]
    master = jax.tree.unflatten(jax.tree.structure(nnx.to_pure_dict(selected)),
                                [_sharded_struct(var, mesh, jnp.float32) for var in variables])
    split = SplitModel(graphdef, jax.tree.structure(selected), [var.get_value().dtype for var in variables], frozen)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(optimizer.init, master)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, m: m.sharding, opt_abstract, master,
                                          transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt_abstract, opt_shardings)
    return split, master, opt_state, optimizer


def _sharded_struct(var, mesh: Mesh, dtype=None) -> jax.ShapeDtypeStruct:
    value = var.get_value()
    axes = tuple(var.get_metadata().get("out_sharding") or ()) or (None,) * len(value.shape)
    return jax.ShapeDtypeStruct(value.shape, dtype or value.dtype, sharding=sharding_for(value.shape, axes, mesh))


def _abstract_variable(var, mesh: Mesh):
    return var.replace(_sharded_struct(var, mesh))


STEPS = {"forward": forward_step, "rollout": rollout_step, "train": train_step, "stage1": stage1_step,
         "stage3_generator": stage3_step("generator"), "stage3_critic": stage3_step("critic")}


TRAINING_TASKS = ("train", "stage1", "stage3_generator", "stage3_critic")

