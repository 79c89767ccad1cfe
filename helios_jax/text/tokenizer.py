"""The UMT5 tokenizer, read from a checkpoint's `tokenizer/` folder with the `tokenizers` library.

The reference calls transformers' `AutoTokenizer` (a `T5Tokenizer`, spec B.6). transformers 5 does
not use the pipeline stored in `tokenizer.json` as is: it takes the Unigram vocabulary and the
SentencePiece normaliser (precompiled charsmap) from it and rebuilds the rest. We rebuild it the
same way, so that ids match the reference:

* model: Unigram over the file's vocabulary, unknown id fixed at 2 and no byte fallback (for the
  umt5 vocabulary id 2 is `<s>`, so an unknown character becomes 2, as in the reference);
* normaliser: the precompiled charsmap, or none when the file has none;
* pre-tokeniser: whitespace split, then Metaspace ("▁" prepended to every word);
* post-processor: `$A </s>` (EOS appended, no BOS);
* added tokens: those listed in `tokenizer.json`, with their matching flags.

Calls pad to `max_length` (512) on the right with `<pad>` and truncate to it, EOS included.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from checkpoints_convert.safetensors_folder import CheckpointError

MAX_LENGTH = 512
UNKNOWN_ID = 2  # fixed by transformers 5's T5Tokenizer, whatever the vocabulary calls `<unk>`
EOS_TOKEN, PAD_TOKEN = "</s>", "<pad>"


class PromptTokenizer:
    """`tokenizer(prompts)` -> (input_ids, attention_mask), int32 [B, max_length] numpy arrays."""

    def __init__(self, backend: Tokenizer, *, max_length: int = MAX_LENGTH, pad_token: str = PAD_TOKEN):
        self.max_length = max_length
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._backend = backend
        backend.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        backend.enable_padding(length=max_length, direction="right", pad_id=self.pad_id, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int = MAX_LENGTH) -> "PromptTokenizer":
        """A checkpoint's `tokenizer/` folder; needs `tokenizer.json` (and reads `tokenizer_config.json`
        for the EOS and pad token names when it is there)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json (the UMT5 tokenizer folder must include it)")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: invalid JSON ({error})") from None
        special = _special_token_names(folder / "tokenizer_config.json")
        try:
            backend = build_backend(spec, eos_token=special["eos_token"])
            return cls(backend, max_length=max_length, pad_token=special["pad_token"])
        except Exception as error:  # malformed entries; tokenizers raises plain Exceptions
            raise CheckpointError(f"{path}: not a UMT5/T5 Unigram tokenizer ({error})") from None

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self._backend.encode_batch(list(prompts), add_special_tokens=True)
        input_ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), self.max_length)
        attention_mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(input_ids.shape)
        return input_ids, attention_mask


def build_backend(spec: dict, *, eos_token: str = EOS_TOKEN) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a parsed tokenizer.json, rebuilt as transformers 5's T5Tokenizer does."""
    model = spec.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"model type {model.get('type')!r}, expected Unigram")
    vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    backend = Tokenizer(Unigram(vocab, unk_id=UNKNOWN_ID, byte_fallback=False))
    charsmap = _precompiled_charsmap(spec.get("normalizer"))
    if charsmap is not None:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.add_special_tokens([
        AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                   rstrip=t.get("rstrip", False), normalized=t.get("normalized", False), special=t.get("special", True))
        for t in spec.get("added_tokens") or ()
    ])
    eos_id = backend.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}", special_tokens=[(eos_token, eos_id)]
    )
    return backend


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece charsmap of a `Precompiled` normaliser, alone or inside a `Sequence`."""
    if not normalizer:
        return None
    candidates = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for candidate in candidates:
        if candidate.get("type") == "Precompiled" and candidate.get("precompiled_charsmap"):
            return base64.b64decode(candidate["precompiled_charsmap"])
    return None


def _special_token_names(config_path: Path) -> dict:
    names = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path}: invalid JSON ({error})") from None
        for name in names:
            value = config.get(name)
            # Older files store special tokens as AddedToken dicts.
            names[name] = value.get("content", names[name]) if isinstance(value, dict) else (value or names[name])
    return names
