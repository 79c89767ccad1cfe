"""The Helios transformer (diffusers' `HeliosTransformer3DModel`, spec §2) in Flax NNX.

Inside, tokens are [B, L, D] and latents channels last; the call takes and returns the diffusers
layout [B, C, T, H, W]. The token sequence is [long | mid | short | current]; the current (noisy)
tokens are always the last L_c. History tokens are modulated with the t = 0 embedding and skip
cross-attention; both segments share one self-attention.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from helios_jax.kernels import dot_product_attention, self_attention
from helios_jax.kernels.norm_rope_tpu import norm_rope
from helios_jax.models import rope
from helios_jax.parallel import constrain
from helios_jax.models.layers import (
    AffineLayerNorm,
    Dense,
    PatchEmbed,
    RMSNorm,
    gelu_tanh,
    layer_norm,
    normal,
    param,
    silu,
    stacked_layers,
)
from helios_jax.models.transformer_config import history_patch_kernels, validate

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Modulation(NamedTuple):
    """Block conditioning in two segments instead of a per-token [B, L, 6, D] tensor.

    history: [6, D] (from t = 0, shared by the batch) or None when every token uses `current`.
    current: [B, 6, D]. Both are the time projection before the block's own table is added.
    """

    history: jax.Array | None
    current: jax.Array
    history_length: int


# Logical axes of the token stream; the rules put batch on data/fsdp and tokens on seq.
TOKEN_AXES = ("batch", "length", "embed")


def modulate_segments(x: jax.Array, history: jax.Array | None, current: jax.Array, length: int, rows, fn):
    """fn(x, vectors) where vectors[i] (i in `rows`) is row i of the `history` [6, D] table for the
    first `length` tokens and of the `current` [B, 6, D] table for the rest. A per-token select of
    each row, not slices of x rejoined: the select fuses into fn's one element-wise pass, where
    slicing and concatenating cost a pass each (bench/fusions.py)."""
    if history is None or length == 0:
        return fn(x, {i: current[:, None, i] for i in rows})
    is_history = (jnp.arange(x.shape[1]) < length)[None, :, None]
    return fn(x, {i: jnp.where(is_history, history[None, None, i], current[:, None, i]) for i in rows})


def timestep_sinusoid(timestep: jax.Array, dim: int) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos | sin], fp32."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half
    angles = timestep.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Sinusoid -> Linear -> SiLU -> Linear, kept in fp32."""

    def __init__(self, freq_dim: int, dim: int, *, rngs):
        self.linear_1 = Dense(freq_dim, dim, axes=(None, "embed"), dtype=jnp.float32, rngs=rngs)
        self.linear_2 = Dense(dim, dim, axes=("embed", "embed_out"), dtype=jnp.float32, rngs=rngs)

    def __call__(self, sinusoid):
        return self.linear_2(jax.nn.silu(self.linear_1(sinusoid)))


class TextProjection(nnx.Module):
    """PixArt-alpha caption projection: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, text_dim: int, dim: int, *, dtype, rngs):
        self.linear_1 = Dense(text_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(dim, dim, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class ConditionEmbedder(nnx.Module):
    def __init__(self, config, dim: int, *, dtype, rngs):
        self.freq_dim = config.freq_dim
        self.dtype = dtype
        self.time_embedder = TimestepEmbedder(config.freq_dim, dim, rngs=rngs)
        self.time_proj = Dense(dim, 6 * dim, axes=("embed", "modulation"), dtype=dtype, rngs=rngs)
        self.text_embedder = TextProjection(config.text_dim, dim, dtype=dtype, rngs=rngs)

    def embed_time(self, timestep: jax.Array):
        """temb [N, D] (rounded to the compute dtype) and its time projection [N, 6, D]."""
        temb = self.time_embedder(timestep_sinusoid(timestep, self.freq_dim)).astype(self.dtype)
        projection = self.time_proj(silu(temb))
        return temb, projection.reshape(projection.shape[0], 6, -1)


class Attention(nnx.Module):
    """Multi-head attention with RMSNorm on q and k across all heads (spec §2.6)."""

    def __init__(self, dim: int, heads: int, eps: float, *, dtype, attention_impl: str, norm_rope_impl: str = "xla",
                 rngs):
        self.heads = heads
        self.attention_impl = attention_impl
        self.norm_rope_impl = norm_rope_impl
        self.to_q = Dense(dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_k = Dense(dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_v = Dense(dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_out = Dense(dim, dim, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(dim, eps, dtype=dtype, axis_name="heads", rngs=rngs)
        self.norm_k = RMSNorm(dim, eps, dtype=dtype, axis_name="heads", rngs=rngs)

    def __call__(self, x, context=None, rotary=None):
        source = x if context is None else context
        if rotary is not None and self._fused_norm_rope(x):
            head_dim = x.shape[-1] // self.heads
            q, k = (norm_rope(dense(x), norm.scale[...], *rotary, eps=norm.eps, head_dim=head_dim)
                    for dense, norm in ((self.to_q, self.norm_q), (self.to_k, self.norm_k)))
            q, k, v = (t.reshape(*t.shape[:-1], self.heads, -1) for t in (q, k, self.to_v(source)))
        else:
            q = self.norm_q(self.to_q(x))
            k = self.norm_k(self.to_k(source))
            v = self.to_v(source)
            q, k, v = (t.reshape(*t.shape[:-1], self.heads, -1) for t in (q, k, v))
            if rotary is not None:
                cos, sin = rope.pair_tables(*rotary, q.shape[-1])
                q = rope.apply_rope(q, cos, sin)
                k = rope.apply_rope(k, cos, sin)
        # Self-attention goes sequence-parallel under a mesh with seq > 1; cross-attention keys
        # (512 text tokens) are short enough to stay replicated.
        attend = self_attention if context is None else dot_product_attention
        out = attend(q, k, v, impl=self.attention_impl)
        return self.to_out(out.reshape(*out.shape[:-2], -1).astype(x.dtype))

    def _fused_norm_rope(self, x) -> bool:
        return fused_norm_rope(self.norm_rope_impl, x.shape[-1] // self.heads)


NORM_ROPE_ENV = "HELIOS_NORM_ROPE_IMPL"


def fused_norm_rope(impl: str, head_dim: int) -> bool:
    """Whether q/k RMSNorm + RoPE run as the Pallas TPU kernel (kernels/norm_rope_tpu.py):
    `pallas_tpu`, or `auto` on a TPU (HELIOS_NORM_ROPE_IMPL=xla turns `auto` to XLA without
    touching a model folder's config); heads must fill whole 128-lane groups (the released 14B: 128)."""
    if impl == "auto":
        impl = os.environ.get(NORM_ROPE_ENV) or ("pallas_tpu" if jax.default_backend() == "tpu" else "xla")
    return impl == "pallas_tpu" and head_dim % 128 == 0


class FeedForward(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, rngs):
        self.linear_in = Dense(dim, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.linear_out = Dense(hidden, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_out(gelu_tanh(self.linear_in(x)))


class HeliosBlock(nnx.Module):
    def __init__(self, config, *, rngs):
        dim = config.num_attention_heads * config.attention_head_dim
        dtype = jnp.dtype(config.dtype)
        self.eps = config.eps
        self.guidance_cross_attn = config.guidance_cross_attn
        self.scale_shift_table = param(rngs, normal(dim**-0.5), (6, dim), jnp.float32, (None, "embed"))
        attention = dict(dtype=dtype, attention_impl=config.attention_impl, rngs=rngs)
        self.attn1 = Attention(dim, config.num_attention_heads, config.eps, norm_rope_impl=config.norm_rope_impl,
                               **attention)
        self.attn2 = Attention(dim, config.num_attention_heads, config.eps, **attention)
        self.norm2 = AffineLayerNorm(dim, config.eps, rngs=rngs) if config.cross_attn_norm else None
        self.ffn = FeedForward(dim, config.ffn_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context, modulation: Modulation, rotary, current_length: int):
        table = self.scale_shift_table[...]
        history = None if modulation.history is None else table + modulation.history.astype(jnp.float32)
        current = table[None] + modulation.current.astype(jnp.float32)
        length = modulation.history_length

        def modulated_norm(x, i_shift: int, i_scale: int):
            def fn(segment, vectors):
                normed = layer_norm(segment, self.eps) * (1 + vectors[i_scale]) + vectors[i_shift]
                return normed.astype(x.dtype)

            return modulate_segments(x, history, current, length, (i_shift, i_scale), fn)

        def gated_residual(x, update, i_gate: int):
            gated = modulate_segments(update.astype(jnp.float32), history, current, length, (i_gate,),
                                      lambda segment, vectors: segment * vectors[i_gate])
            return (x.astype(jnp.float32) + gated).astype(x.dtype)

        # 1. Self-attention over every token, gated residual in fp32.
        x = gated_residual(x, self.attn1(modulated_norm(x, 0, 1), rotary=rotary), 2)

        # 2. Cross-attention to the text: the current tokens only (guidance cross-attention).
        split = x.shape[1] - current_length if self.guidance_cross_attn else 0
        x_hist, x_cur = x[:, :split], x[:, split:]
        normed = self.norm2(x_cur) if self.norm2 is not None else x_cur
        x_cur = x_cur + self.attn2(normed.astype(x.dtype), context=context)
        x = jnp.concatenate([x_hist, x_cur], axis=1) if split else x_cur

        # 3. Feed-forward on every token, gated residual in fp32.
        return gated_residual(x, self.ffn(modulated_norm(x, 3, 4)), 5)


class OutputNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs):
        self.eps = eps
        self.scale_shift_table = param(rngs, normal(dim**-0.5), (2, dim), jnp.float32, (None, "embed"))

    def __call__(self, x, temb):
        """x [B, L_c, D], temb [B, D]: shift and scale come from temb, not the time projection."""
        vectors = self.scale_shift_table[...][None] + temb.astype(jnp.float32)[:, None]
        shift, scale = vectors[:, 0][:, None], vectors[:, 1][:, None]
        return (layer_norm(x, self.eps) * (1 + scale) + shift).astype(x.dtype)


class HeliosTransformer3DModel(nnx.Module):
    """Helios DiT. Call it as diffusers' `HeliosTransformer3DModel.forward` (output index 0)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(config)
        config = ml_collections.FrozenConfigDict(config)  # hashable: the module is usable under nnx.jit
        self.config = config
        dim = config.num_attention_heads * config.attention_head_dim
        dtype = jnp.dtype(config.dtype)
        self.dtype = dtype
        short, mid, long = history_patch_kernels(config)
        self.patch_embedding = PatchEmbed(config.in_channels, dim, short, pad_to_multiple=False, dtype=dtype, rngs=rngs)
        if config.has_multi_term_memory_patch:
            self.patch_short = PatchEmbed(config.in_channels, dim, short, pad_to_multiple=False, dtype=dtype, rngs=rngs)
            self.patch_mid = PatchEmbed(config.in_channels, dim, mid, pad_to_multiple=True, dtype=dtype, rngs=rngs)
            self.patch_long = PatchEmbed(config.in_channels, dim, long, pad_to_multiple=True, dtype=dtype, rngs=rngs)
        self.condition_embedder = ConditionEmbedder(config, dim, dtype=dtype, rngs=rngs)
        self.blocks = _stacked_blocks(config, rngs)
        self.norm_out = OutputNorm(dim, config.eps, rngs=rngs)
        self.proj_out = Dense(dim, config.out_channels * math.prod(config.patch_size), axes=("embed", None),
                              dtype=dtype, rngs=rngs)

    def __call__(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        *,
        indices_hidden_states=None,
        latents_history_short=None,
        latents_history_mid=None,
        latents_history_long=None,
        indices_latents_history_short=None,
        indices_latents_history_mid=None,
        indices_latents_history_long=None,
        feature_layers: tuple[int, ...] = (),
    ):
        """The velocity [B, C, T, H, W]; with `feature_layers` (block indices) also the current
        tokens after each of those blocks as [B, T', H', W', dim] on the post-patch grid (the
        GAN discriminator's features, spec training.md §6.3)."""
        config = self.config
        batch = hidden_states.shape[0]
        patch_t, patch_h, patch_w = config.patch_size

        # Patchify the current chunk; its RoPE grid is its own post-patch grid.
        tokens = self.patch_embedding(_channels_last(hidden_states))
        _, grid_t, grid_h, grid_w, _ = tokens.shape
        if indices_hidden_states is None:
            indices_hidden_states = jnp.arange(grid_t)
        cos, sin = rope.rope_table(_batched(indices_hidden_states, batch), grid_h, grid_w,
                                   config.rope_dim, config.rope_theta)
        terms = [(rope.flatten_tokens(tokens), rope.flatten_tokens(cos), rope.flatten_tokens(sin))]
        current_length = terms[0][0].shape[1]
        terms += self._history_terms(
            batch,
            (latents_history_short, indices_latents_history_short, "short"),
            (latents_history_mid, indices_latents_history_mid, "mid"),
            (latents_history_long, indices_latents_history_long, "long"),
        )
        # Sequence order [long | mid | short | current]: history terms were collected short first.
        terms = terms[::-1]
        x = constrain(jnp.concatenate([t[0] for t in terms], axis=1), TOKEN_AXES)
        rotary = tuple(jnp.concatenate([t[i] for t in terms], axis=1) for i in (1, 2))
        if fused_norm_rope(config.norm_rope_impl, config.attention_head_dim):
            rotary = rope.lane_tables(*rotary)  # once per forward, not per attention call
        rotary = tuple(constrain(table, ("batch", "length", None)) for table in rotary)
        history_length = x.shape[1] - current_length

        # Conditioning: temb/projection for t, and for t = 0 for the history segment.
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
        context = self.condition_embedder.text_embedder(jnp.asarray(encoder_hidden_states).astype(self.dtype))
        context = constrain(context, ("batch", None, "embed"))  # text tokens stay whole: every query needs all
        temb, projection = self.condition_embedder.embed_time(timestep)
        history_projection = None
        if config.zero_history_timestep:
            _, history_projection = self.condition_embedder.embed_time(jnp.zeros((1,), timestep.dtype))
            history_projection = history_projection[0]
        modulation = Modulation(history_projection, projection, history_length)

        x, per_layer = self._run_blocks(x, context, modulation, rotary, current_length, bool(feature_layers))

        # Output head on the current tokens, then unpatchify to [B, C, T, H, W].
        x = self.proj_out(self.norm_out(x[:, -current_length:], temb))
        x = x.reshape(batch, grid_t, grid_h, grid_w, patch_t, patch_h, patch_w, -1)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(batch, -1, grid_t * patch_t, grid_h * patch_h, grid_w * patch_w)
        if not feature_layers:
            return x
        for layer in feature_layers:
            if not 0 <= layer < config.num_layers:
                raise ValueError(f"feature_layers: block {layer} is outside the model's {config.num_layers} blocks")
        features = [per_layer[layer].reshape(batch, grid_t, grid_h, grid_w, -1) for layer in feature_layers]
        return x, features

    def _history_terms(self, batch, short, mid, long):
        """(tokens, cos, sin) for each history term given, in the order short, mid, long."""
        terms = []
        given = {name: (latents, indices) for latents, indices, name in (short, mid, long)}
        for name, (latents, indices) in given.items():
            if (latents is None) != (indices is None):
                pair = (f"latents_history_{name}", f"indices_latents_history_{name}")
                given_name, missing = pair if indices is None else pair[::-1]
                raise ValueError(f"{given_name} needs {missing} as well")
        if given["short"][0] is None:
            if given["mid"][0] is not None or given["long"][0] is not None:
                raise ValueError("latents_history_mid/long need latents_history_short (their RoPE grid is its grid)")
            return terms
        if not self.config.has_multi_term_memory_patch:
            raise ValueError("this model has no history patch embeddings (has_multi_term_memory_patch=false)")
        tokens = self.patch_short(_channels_last(given["short"][0]))
        _, _, short_h, short_w, _ = tokens.shape
        cfg = self.config
        cos, sin = rope.rope_table(_batched(given["short"][1], batch), short_h, short_w, cfg.rope_dim, cfg.rope_theta)
        terms.append((tokens, cos, sin))
        for name, patch, pool in (("mid", self.patch_mid, (2, 2, 2)), ("long", self.patch_long, (4, 4, 4))):
            latents, indices = given[name]
            if latents is None:
                continue
            # The RoPE table is built on the short grid, then pooled (cos and sin averaged).
            cos, sin = rope.rope_table(_batched(indices, batch), short_h, short_w, cfg.rope_dim, cfg.rope_theta)
            terms.append((patch(_channels_last(latents)), rope.pool_table(cos, pool), rope.pool_table(sin, pool)))
        return [tuple(rope.flatten_tokens(a) for a in term) for term in terms]

    def _run_blocks(self, x, context, modulation, rotary, current_length, keep_current: bool = False):
        """x after every block; with `keep_current` also each block's current tokens, stacked [layers, B, L_c, D]."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, block_state):
            block = nnx.merge(graphdef, block_state)
            out = constrain(block(carry, context, modulation, rotary, current_length), TOKEN_AXES)
            return out, (out[:, -current_length:] if keep_current else None)

        policy = self.config.remat_policy
        if policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}; got {policy!r}")
        if policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
        return jax.lax.scan(body, x, state)


def _stacked_blocks(config, rngs: nnx.Rngs) -> HeliosBlock:
    """All blocks as one module whose parameters have a leading `layers` axis (scanned at run time)."""
    return stacked_layers(lambda rngs: HeliosBlock(config, rngs=rngs), config.num_layers, rngs)


def _channels_last(latents) -> jax.Array:
    return jnp.moveaxis(jnp.asarray(latents), 1, -1)


def _batched(indices, batch: int) -> jax.Array:
    """Frame indices as [B, n]; a 1-D input is shared by the batch."""
    indices = jnp.asarray(indices)
    if indices.ndim == 1:
        indices = indices[None]
    return jnp.broadcast_to(indices, (batch, indices.shape[1]))
