"""The UMT5 encoder (transformers' `UMT5EncoderModel`, spec vae_and_text.md Part B) in Flax NNX.

A T5 v1.1 encoder stack: token table, pre-norm blocks of self-attention and gated-GELU feed-forward,
final RMS norm. As in T5, attention is not scaled by 1/sqrt(d_kv) and positions enter only as a
learned bias over relative-distance buckets; unlike T5, every layer has its own bias table, so the
table is stacked and scanned with the other layer parameters.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from helios_jax.models.layers import RMSNorm, gelu_tanh, normal, param, stacked_layers
from helios_jax.models.text_encoder_config import validate
from helios_jax.parallel import constrain

HIDDEN_AXES = ("batch", "length", "embed")


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of (key - query) for every pair, bidirectional, as int32 [query_length, key_length].

    Half the buckets are for keys after the query. Within a half, the first quarter of all buckets
    are exact distances and the rest grow logarithmically up to `max_distance`, then saturate. The
    log is taken in fp32 and truncated toward zero, as the reference does, so bucket edges match it.
    """
    delta = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(delta)
    # Distances below `exact` never use the log; clamping them to 1 keeps log(0) out.
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    log_bucket = np.minimum(exact + scaled.astype(np.int64), half - 1)
    bucket = np.where(distance < exact, distance, log_bucket) + (delta > 0) * half
    return bucket.astype(np.int32)


class Linear(nnx.Module):
    """y = x @ kernel with no bias (every T5 projection), kernel stored [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], stddev: float, dtype, rngs):
        self.dtype = dtype
        self.kernel = param(rngs, normal(stddev), (in_features, out_features), dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...], preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


class TokenEmbedding(nnx.Module):
    """The token table (`shared.weight`): ids -> rows, unscaled, no positions."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs):
        self.embedding = param(rngs, normal(1.0), (vocab_size, dim), dtype, ("vocab", "embed"))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], input_ids, axis=0)


class SelfAttention(nnx.Module):
    """Unscaled multi-head self-attention with this layer's relative position bias and a key mask.

    Numerics (spec B.4): projections in the parameter dtype, scores and softmax in fp32 with the
    bias added in fp32, probabilities rounded to the parameter dtype before P.V (fp32 accumulation).
    """

    def __init__(self, config, *, dtype, rngs):
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        d_model = config.d_model
        # T5's initialisation absorbs the missing 1/sqrt(d_kv) into q.
        self.q = Linear(d_model, inner, axes=("embed", "heads"), stddev=(d_model * config.d_kv) ** -0.5,
                        dtype=dtype, rngs=rngs)
        self.k = Linear(d_model, inner, axes=("embed", "heads"), stddev=d_model**-0.5, dtype=dtype, rngs=rngs)
        self.v = Linear(d_model, inner, axes=("embed", "heads"), stddev=d_model**-0.5, dtype=dtype, rngs=rngs)
        self.o = Linear(inner, d_model, axes=("heads", "embed"), stddev=inner**-0.5, dtype=dtype, rngs=rngs)
        # [bucket, head], as transformers' nn.Embedding stores it.
        self.relative_attention_bias = param(
            rngs, normal(d_model**-0.5), (config.relative_attention_num_buckets, config.num_heads), dtype,
            (None, "heads"),
        )

    def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [B, S, D]; buckets [S, S] int; key_mask [B, S] bool (True = real token)."""
        batch, length, _ = x.shape
        q, k, v = (proj(x).reshape(batch, length, self.heads, -1) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        bias = jnp.take(self.relative_attention_bias[...], buckets, axis=0)  # [S, S, H]
        scores = scores + jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
        return self.o(out.reshape(batch, length, -1))


class GatedGeluFeedForward(nnx.Module):
    """gelu_tanh(x W_i0) * (x W_i1), then W_o. wi_0 is the GELU branch, wi_1 the linear one."""

    def __init__(self, config, *, dtype, rngs):
        d_model, d_ff = config.d_model, config.d_ff
        self.wi_0 = Linear(d_model, d_ff, axes=("embed", "mlp"), stddev=d_model**-0.5, dtype=dtype, rngs=rngs)
        self.wi_1 = Linear(d_model, d_ff, axes=("embed", "mlp"), stddev=d_model**-0.5, dtype=dtype, rngs=rngs)
        self.wo = Linear(d_ff, d_model, axes=("mlp", "embed"), stddev=d_ff**-0.5, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class UMT5Block(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config, *, rngs):
        dtype = jnp.dtype(config.dtype)
        eps = config.layer_norm_epsilon
        self.attention_norm = RMSNorm(config.d_model, eps, dtype=dtype, rngs=rngs)
        self.attention = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.feed_forward_norm = RMSNorm(config.d_model, eps, dtype=dtype, rngs=rngs)
        self.feed_forward = GatedGeluFeedForward(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), buckets, key_mask)
        return x + self.feed_forward(self.feed_forward_norm(x))


class UMT5EncoderModel(nnx.Module):
    """transformers' `UMT5EncoderModel`: `encoder(input_ids, attention_mask)` -> last hidden state [B, S, D]."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(config)
        config = ml_collections.FrozenConfigDict(config)  # hashable: the module is usable under nnx.jit
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.token_embedding = TokenEmbedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.blocks = _stacked_blocks(config, rngs)
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids [B, S] int; attention_mask [B, S] (1 = real token, 0 = padding) or None (all real).

        Padded query rows are computed too (they attend to the real keys only), as in the reference.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        key_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
        if key_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {key_mask.shape} differs from input_ids shape {input_ids.shape}")
        config = self.config
        length = input_ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(
            length, length, config.relative_attention_num_buckets, config.relative_attention_max_distance))
        x = constrain(self.token_embedding(input_ids), HIDDEN_AXES)
        x = self._run_blocks(x, buckets, key_mask)
        return self.final_norm(x)

    def _run_blocks(self, x, buckets, key_mask):
        graphdef, state = nnx.split(self.blocks)

        def body(carry, block_state):
            return constrain(nnx.merge(graphdef, block_state)(carry, buckets, key_mask), HIDDEN_AXES), None

        x, _ = jax.lax.scan(body, x, state)
        return x


def _stacked_blocks(config, rngs: nnx.Rngs) -> UMT5Block:
    """All blocks as one module whose parameters (bias tables included) have a leading `layers` axis."""
    return stacked_layers(lambda rngs: UMT5Block(config, rngs=rngs), config.num_layers, rngs)
