"""Prompts to text embeddings: cleaning, the UMT5 tokenizer and the `TextEncoder` front end."""
from helios_jax.text.prompt_cleaning import clean_prompt
from helios_jax.text.prompt_embeddings import TextEncoder, trim_and_zero_pad
from helios_jax.text.tiny_tokenizer import tiny_tokenizer
from helios_jax.text.tokenizer import MAX_LENGTH, PromptTokenizer

__all__ = ["MAX_LENGTH", "PromptTokenizer", "TextEncoder", "clean_prompt", "tiny_tokenizer", "trim_and_zero_pad"]
