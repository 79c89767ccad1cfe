"""FLOPs of one transformer forward (spec §4.2): 2 x multiply-adds of every matmul, elementwise work
(norms, RoPE, softmax) not counted."""
from __future__ import annotations

import math


def transformer_flops(config, history_tokens: int, current_tokens: int, text_tokens: int = 512) -> float:
    """FLOPs for L = history + current tokens and `text_tokens` text tokens."""
    d = config.num_attention_heads * config.attention_head_dim
    f = config.ffn_dim
    length, current, s = history_tokens + current_tokens, current_tokens, text_tokens
    cross = current if config.guidance_cross_attn else length
    per_block = (
        8 * length * d * d  # self-attention q, k, v and output projections
        + 4 * length * length * d  # scores and attention-weighted values
        + 4 * cross * d * d  # cross-attention q and output projections
        + 4 * s * d * d  # cross-attention k, v of the text
        + 4 * cross * s * d  # cross-attention scores and values
        + 4 * length * d * f  # feed-forward
    )
    patch_volume = math.prod(config.patch_size)
    outside = (
        2 * s * (config.text_dim * d + d * d)  # text embedder
        # Patch embeddings, counted as if every token came through the main patch: the coarser history
        # kernels add ~1e10 FLOPs at 14B, under 0.01% of a forward.
        + 2 * length * patch_volume * config.in_channels * d
        + 2 * current * d * config.out_channels * patch_volume  # proj_out
        + 2 * 2 * (config.freq_dim * d + d * d + 6 * d * d)  # time embedder and projection, t and t = 0
    )
    return float(config.num_layers * per_block + outside)
