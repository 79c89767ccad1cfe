"""LoRA adapters on the Helios transformer (spec training.md §3.5).

"all-linear" = every Dense of the transformer (attention q/k/v/out of both attentions, both FFN
linears, the time and text embedders' linears, time_proj, proj_out); norms have no Dense and are
never adapted. Patch embeddings (Conv3d with kernel = stride) can get a conv LoRA: A is a conv with
the layer's kernel to r channels, B a 1x1x1 conv r -> dim.

An adapter is attached as the layer's `lora` attribute; Dense / PatchEmbed add its update
(layers.add_adapter), so the base weights keep their paths and shardings. Inside the scanned block
stack the adapter's parameters carry the same leading `layers` axis as the kernels, and the scan
slices them with the rest of the block.

y = W x + (alpha / r) * B (A x), A ~ N(0, (1/r)^2), B = 0 (PEFT's "gaussian" init): the adapted model
starts equal to the base. Adapter parameters are `LoRAParam` (an nnx.Param) kept in fp32; in the
forward they are cast to the layer's compute dtype (torch autocast does the same) and accumulate
in fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.transformer_keys import diffusers_module_name
from helios_jax.models.layers import Dense, PatchEmbed
from helios_jax.parallel import logical_axes_of

PATCH_EMBEDDING = "patch_embedding"
HISTORY_PATCHES = ("patch_short", "patch_mid", "patch_long")
PATCH_EMBEDDING_MODES = ("lora", "frozen")
HISTORY_PATCH_MODES = ("full", "lora", "frozen")


class LoRAParam(nnx.Param):
    """A LoRA factor: a parameter type of its own so optimiser and checkpoint filters can pick it."""


class LoRA(nnx.Module):
    """The low-rank update of one layer: `down` [..., *in, r] and `up` [..., r, out]."""

    def __init__(self, down: LoRAParam, up: LoRAParam, scale: float):
        self.down = down
        self.up = up
        self.scale = scale

    def __call__(self, equation: str, x: jax.Array, dtype) -> jax.Array:
        """fp32 update for input `x`; `equation` contracts x with `down` the way the layer does."""
        hidden = jnp.einsum(equation, x, self.down[...].astype(dtype), preferred_element_type=jnp.float32)
        update = jnp.einsum("...r,ro->...o", hidden.astype(dtype), self.up[...].astype(dtype),
                            preferred_element_type=jnp.float32)
        return self.scale * update

    def delta_kernel(self) -> jax.Array:
        """scale * A @ B in the layer's kernel layout ([*leading, *in, out]), fp32."""
        down, up = self.down[...], self.up[...]
        lead = up.ndim - 2  # the stacked `layers` axis, if any
        flat = down.reshape(*down.shape[:lead], -1, down.shape[-1])
        delta = jnp.einsum("...ir,...ro->...io", flat, up)
        return self.scale * delta.reshape(*down.shape[:-1], up.shape[-1])


def add_lora(model: nnx.Module, *, rank: int, alpha: float, patch_embedding: str = "frozen",
             history_patches: str = "frozen", rngs: nnx.Rngs) -> nnx.Module:
    """Attach LoRA (rank, scale alpha / rank) to every Dense of `model`, and conv LoRA to the patch
    embedding and/or the history patchers as configured. `history_patches="full"` trains those
    patchers whole instead (their weights are upcast to fp32, the reference's master copy).
    Works under nnx.eval_shape. Returns `model` (changed in place)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank must be a positive integer; got {rank!r}")
    if patch_embedding not in PATCH_EMBEDDING_MODES:
        raise ValueError(f"lora patch_embedding must be one of {PATCH_EMBEDDING_MODES}; got {patch_embedding!r}")
    if history_patches not in HISTORY_PATCH_MODES:
        raise ValueError(f"lora history_patches must be one of {HISTORY_PATCH_MODES}; got {history_patches!r}")
    conv_targets = {PATCH_EMBEDDING} if patch_embedding == "lora" else set()
    if history_patches == "lora":
        conv_targets.update(HISTORY_PATCHES)
    scale = float(alpha) / rank
    for path, module in list(nnx.iter_modules(model)):
        if getattr(module, "lora", None) is not None:
            raise ValueError(f"{_name(path)} already has a LoRA adapter (merge_lora first)")
        if isinstance(module, Dense):
            module.lora = _adapter(module.kernel, 2, rank, scale, rngs)
        elif isinstance(module, PatchEmbed) and path and path[-1] in conv_targets:
            module.lora = _adapter(module.kernel, 5, rank, scale, rngs)
        elif isinstance(module, PatchEmbed) and path and path[-1] in HISTORY_PATCHES and history_patches == "full":
            for variable in (module.kernel, module.bias):
                variable.set_value(variable.get_value().astype(jnp.float32))
    return model


def _adapter(kernel: nnx.Param, layer_ndim: int, rank: int, scale: float, rngs: nnx.Rngs) -> LoRA:
    """Factors for a kernel [*leading, *in, out] whose last `layer_ndim` dimensions are the layer's
    own (leading = the stacked `layers` axis inside the block stack)."""
    shape = tuple(kernel.shape)
    axes = logical_axes_of(kernel) or (None,) * len(shape)
    lead = len(shape) - layer_ndim
    in_shape, out_dim = shape[lead:-1], shape[-1]
    down_axes = (*axes[:-1], None)
    up_axes = (*axes[:lead], None, axes[-1])
    down = _gaussian(rngs, (*shape[:lead], *in_shape, rank), 1.0 / rank)
    up = jnp.zeros((*shape[:lead], rank, out_dim), jnp.float32)
    return LoRA(LoRAParam(down, out_sharding=down_axes, eager_sharding=False),
                LoRAParam(up, out_sharding=up_axes, eager_sharding=False), scale)


def _gaussian(rngs: nnx.Rngs, shape, stddev: float) -> jax.Array:
    # Traced (eval_shape / jit): jax.random. Eager: numpy, which skips a compile per shape.
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return stddev * jax.random.normal(key, shape, jnp.float32)
    generator = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    return jnp.asarray(stddev * generator.standard_normal(shape, dtype=np.float32))


def lora_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) of every layer carrying an adapter."""
    return [(path, m) for path, m in nnx.iter_modules(model) if getattr(m, "lora", None) is not None]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fuse W <- W + scale * A @ B into every adapted layer (in the base dtype) and remove the
    adapters: the export of a finished stage (the reference's merge_lora_for_helios). In place."""
    for _, layer in lora_layers(model):
        kernel = layer.kernel.get_value()
        merged = kernel.astype(jnp.float32) + layer.lora.delta_kernel()
        layer.kernel.set_value(merged.astype(kernel.dtype))
        del layer.lora
    return model


def trainable_filter(history_patches: str = "frozen"):
    """nnx filter of the trained parameters: every LoRAParam, plus the history patchers' own weights
    when they are trained whole (`history_patches="full"`)."""
    if history_patches not in HISTORY_PATCH_MODES:
        raise ValueError(f"lora history_patches must be one of {HISTORY_PATCH_MODES}; got {history_patches!r}")
    if history_patches != "full":
        return LoRAParam

    def full_history_patcher(path, variable) -> bool:
        return isinstance(variable, nnx.Param) and any(name in path for name in HISTORY_PATCHES)

    return nnx.Any(LoRAParam, full_history_patcher)


def lora_parameter_count(model: nnx.Module, under: str | None = None) -> int:
    """Number of LoRA parameters, optionally only those whose path contains `under`."""
    state = nnx.state(model, LoRAParam)
    return sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(state) if under is None or under in path)


def _name(path) -> str:
    return ".".join(str(p) for p in path) or "<model>"


# ------------------------------------------------------------------------------------------------
# Export in PEFT / diffusers naming (spec §10: `pytorch_lora_weights.safetensors`)

def peft_lora_state_dict(model: nnx.Module, prefix: str = "transformer.") -> tuple[dict[str, np.ndarray], dict]:
    """Every adapter as `{prefix}<module>.lora_A.weight` / `lora_B.weight` in torch layout (Linear:
    A [r, in], B [out, r]; Conv3d: A [r, C, kT, kH, kW], B [out, r, 1, 1, 1]), fp32 numpy, plus
    {"r", "lora_alpha", "target_modules"} for the PEFT LoraConfig. One rank and scale for all."""
    tensors, ranks, scales, targets = {}, set(), set(), []
    for path, layer in lora_layers(model):
        down, up = np.asarray(layer.lora.down.get_value()), np.asarray(layer.lora.up.get_value())
        rank = up.shape[-2]
        ranks.add(rank)
        scales.add(layer.lora.scale)
        stacked = path[0] == "blocks"
        for index in range(up.shape[0]) if stacked else [None]:
            d, u = (down[index], up[index]) if stacked else (down, up)
            name = diffusers_module_name(path, index)
            targets.append(name)
            if isinstance(layer, PatchEmbed):  # [kT, kH, kW, C, r] -> [r, C, kT, kH, kW]
                a, b = d.transpose(4, 3, 0, 1, 2), u.T[:, :, None, None, None]
            else:
                a, b = d.T, u.T
            tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
            tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"adapters differ in rank {sorted(ranks)} or scale {sorted(scales)}; PEFT export needs one")
    rank = ranks.pop() if ranks else 0
    config = {"r": rank, "lora_alpha": scales.pop() * rank if rank else 0, "target_modules": targets}
    return tensors, config
