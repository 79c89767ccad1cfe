"""Prompts -> the text embeddings the Helios transformer reads (spec vae_and_text.md B.7, sampler §8).

Each prompt is cleaned, tokenised to 512 ids (EOS included, right-padded), run through the UMT5
encoder with its mask, and cut to its true length L = mask.sum() (EOS included): rows [0, L) keep
the encoder output, rows [L, 512) become exact zeros. The transformer cross-attends to all 512 rows
with no mask, so those zeros are part of the conditioning, not padding to be ignored.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax import parallel
from helios_jax.loading import load
from helios_jax.models.text_encoder import UMT5EncoderModel
from helios_jax.text.prompt_cleaning import clean_prompt
from helios_jax.text.tokenizer import PromptTokenizer


def trim_and_zero_pad(hidden_states: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Keep rows [0, L) of each sample, L = attention_mask.sum(); the rows after are exact zeros."""
    lengths = jnp.sum(attention_mask > 0, axis=-1)
    keep = jnp.arange(hidden_states.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[..., None], hidden_states, jnp.zeros((), hidden_states.dtype))


def _embed(graphdef, state, input_ids, attention_mask):
    hidden_states = nnx.merge(graphdef, state)(input_ids, attention_mask)
    return trim_and_zero_pad(hidden_states, attention_mask)


class TextEncoder:
    """`encode(prompts)` -> [B, 512, D] embeddings in the encoder's dtype (bf16 by default).

    The encoder runs jitted with its parameters as an argument: one compile per batch size. A
    negative prompt is encoded once and reused for every later call that asks for it.
    """

    def __init__(self, encoder: UMT5EncoderModel, tokenizer: PromptTokenizer):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.mesh = parallel.mesh_of(encoder)  # sharded parameters: the encoder runs on their mesh
        graphdef, self._state = nnx.split(encoder)
        self._embed = jax.jit(partial(_embed, graphdef))
        self._negative: dict[str, jax.Array] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=None, mesh=None) -> "TextEncoder":
        """A model folder holding `text_encoder/` (transformers UMT5EncoderModel) and `tokenizer/`.
        The tokenizer is loaded first: a bad one fails in a second, not after the encoder's 11 GiB."""
        path = Path(path)
        tokenizer = PromptTokenizer.from_folder(path / "tokenizer")  # raises CheckpointError naming the file
        return cls(load(path / "text_encoder", dtype=dtype, mesh=mesh), tokenizer)

    def tokenize(self, prompts: str | Sequence[str]):
        """Cleaned and tokenised prompts: (input_ids, attention_mask), int32 [B, 512]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        return self.tokenizer([clean_prompt(p) for p in prompts])

    def encode(self, prompts: str | Sequence[str]) -> jax.Array:
        input_ids, attention_mask = self.tokenize(prompts)
        with parallel.use_mesh(self.mesh):
            return self._embed(self._state, input_ids, attention_mask)

    def encode_negative(self, negative_prompt: str | None, batch_size: int = 1) -> jax.Array:
        """The negative prompt's embedding repeated to `batch_size`; None means "" (EOS only, L = 1)."""
        negative_prompt = negative_prompt or ""
        if negative_prompt not in self._negative:
            self._negative[negative_prompt] = self.encode([negative_prompt])
        return jnp.broadcast_to(self._negative[negative_prompt], (batch_size, *self._negative[negative_prompt].shape[1:]))

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      do_classifier_free_guidance: bool = True):
        """(prompt_embeds, negative_prompt_embeds), as the diffusers Helios pipelines' `encode_prompt`.

        Without guidance no negative is encoded and the second item is None. A single negative string
        serves the whole batch; a list gives one negative per prompt.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds = self.encode(prompts)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt is None or isinstance(negative_prompt, str):
            return prompt_embeds, self.encode_negative(negative_prompt, len(prompts))
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        return prompt_embeds, jnp.concatenate([self.encode_negative(n) for n in negatives], axis=0)
