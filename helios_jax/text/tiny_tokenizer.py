"""A small UMT5-style tokenizer built in memory, for `--model tiny-random` (no files, no network).

It goes through the same `build_backend` as a checkpoint's tokenizer.json, so it has the real one's
conventions (Unigram model, whitespace + Metaspace pre-tokeniser, `</s>` appended, right padding to 512);
only the vocabulary is made up: `<pad>` 0, `</s>` 1, `<unk>` 2, then "▁", the printable ASCII characters,
"▁" + each letter, a few common words, and letter pairs until `vocab_size` pieces. Any text tokenises
(characters outside the vocabulary become `<unk>`), and every id is below `vocab_size`.
"""
from __future__ import annotations

import itertools
import string

from helios_jax.text.tokenizer import EOS_TOKEN, MAX_LENGTH, PAD_TOKEN, PromptTokenizer, build_backend

UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, as build_backend's fixed unknown id expects
COMMON_WORDS = ("a", "the", "of", "and", "in", "with", "on", "is", "to", "car", "red", "blue", "man", "woman",
                "cat", "dog", "water", "sky", "light", "camera", "video", "scene", "street", "city", "slowly")

# Unigram picks the segmentation with the highest total log-probability: longer pieces score higher
# per piece, so known words stay whole and unknown words fall back to pairs, then single characters.
SCORES = {"char": -10.0, "pair": -9.0, "word_start": -8.0, "word": -5.0}


def tiny_tokenizer(vocab_size: int = 320, *, max_length: int = MAX_LENGTH) -> PromptTokenizer:
    """The tokenizer of the tiny-random model: ids in [0, vocab_size), EOS appended, padded to `max_length`."""
    pieces = _vocabulary(vocab_size)
    spec = {
        "model": {"type": "Unigram", "vocab": pieces},
        "normalizer": None,  # the real tokenizer's SentencePiece charsmap cannot be built in memory
        "added_tokens": [{"content": token, "special": True} for token in SPECIAL_TOKENS],
    }
    return PromptTokenizer(build_backend(spec, eos_token=EOS_TOKEN), max_length=max_length, pad_token=PAD_TOKEN)


def _vocabulary(vocab_size: int) -> list[tuple[str, float]]:
    printable = [c for c in string.printable if not c.isspace()]
    required = [(token, 0.0) for token in SPECIAL_TOKENS] + [("▁", SCORES["char"])]
    required += [(c, SCORES["char"]) for c in printable]
    optional = itertools.chain(
        ((f"▁{c}", SCORES["word_start"]) for c in string.ascii_lowercase),
        ((f"▁{word}", SCORES["word"]) for word in COMMON_WORDS),
        (("".join(pair), SCORES["pair"]) for pair in itertools.product(string.ascii_lowercase, repeat=2)),
    )
    seen = {piece for piece, _ in required}
    unique_optional = [(p, s) for p, s in optional if p not in seen and not seen.add(p)]
    most = len(required) + len(unique_optional)
    if not len(required) <= vocab_size <= most:
        raise ValueError(f"vocab_size={vocab_size}: the tiny tokenizer supports {len(required)} to {most}")
    return required + unique_optional[: vocab_size - len(required)]
