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

A folder with no `tokenizer.json` but a SentencePiece `spiece.model` (how many T5/UMT5 folders ship)
is converted as transformers 5 converts it for `T5Tokenizer` (`T5TokenizerFast` is the same class):
the model's pieces, then `extra_ids` sentinels `<extra_id_{n-1}>` ... `<extra_id_0>` (extra_ids from
tokenizer_config.json, 100 when it does not say), the model's charsmap as the normaliser, and as
added special tokens (not normalised, no stripping) the model's control pieces, the pad/EOS/unknown
tokens, the sentinels and any special tokens the json files list. The file is read by
`spiece_model` (no sentencepiece or protobuf needed), then built by `build_backend` as above.

`check_tokenizer_folder` loads a folder and raises `CheckpointError` naming the file at fault: the
converter and `TextEncoder.from_pretrained` call it before reading any weights.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax.text.spiece_model import MODEL_TYPE_NAMES, UNIGRAM, SpieceError, parse_spiece_model

MAX_LENGTH = 512
UNKNOWN_ID = 2  # fixed by transformers 5's T5Tokenizer, whatever the vocabulary calls `<unk>`
EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "</s>", "<pad>", "<unk>"
TOKENIZER_JSON, SPIECE_MODEL = "tokenizer.json", "spiece.model"
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
DEFAULT_EXTRA_IDS = 100  # T5Tokenizer's number of sentinels when tokenizer_config.json gives none


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
        """A checkpoint's `tokenizer/` folder: `tokenizer.json`, or else `spiece.model`; reads
        `tokenizer_config.json` and `special_tokens_map.json` for the special tokens when they are there."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder (expected the UMT5 tokenizer folder)")
        settings = read_token_settings(folder)
        if (folder / TOKENIZER_JSON).is_file():
            path, build = folder / TOKENIZER_JSON, _backend_from_tokenizer_json
        elif (folder / SPIECE_MODEL).is_file():
            path, build = folder / SPIECE_MODEL, _backend_from_spiece_model
        else:
            raise CheckpointError(f"{folder}: neither {TOKENIZER_JSON} nor {SPIECE_MODEL} "
                                  "(the UMT5 tokenizer folder must hold one)")
        backend = build(path, settings)
        try:
            return cls(backend, max_length=max_length, pad_token=settings.pad_token)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None

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


def check_tokenizer_folder(folder: str | Path) -> None:
    """Raise `CheckpointError` (naming the file) unless `folder` is a usable UMT5 tokenizer folder.
    Loads it: a second or so, next to minutes for the encoder weights, so callers check first."""
    PromptTokenizer.from_folder(folder)


@dataclass
class TokenSettings:
    """The special tokens a tokenizer folder's json files name (transformers' defaults otherwise)."""

    eos_token: str = EOS_TOKEN
    pad_token: str = PAD_TOKEN
    unk_token: str = UNK_TOKEN
    extra_ids: int = DEFAULT_EXTRA_IDS
    special_tokens: list[str] = field(default_factory=list)  # additional/extra special tokens, listed tokens
    flags: dict[str, dict] = field(default_factory=dict)  # content -> AddedToken flags from added_tokens_decoder


def read_token_settings(folder: Path) -> TokenSettings:
    """tokenizer_config.json, then special_tokens_map.json (transformers reads that legacy file too)."""
    settings = TokenSettings()
    config = _read_json(folder / TOKENIZER_CONFIG)
    for values in (config, _read_json(folder / SPECIAL_TOKENS_MAP)):
        for name in ("eos_token", "pad_token", "unk_token"):
            if values.get(name):
                setattr(settings, name, _content(values[name]))
        for name in ("additional_special_tokens", "extra_special_tokens"):
            listed = values.get(name) or []
            settings.special_tokens += [_content(t) for t in (listed.values() if isinstance(listed, dict) else listed)]
    extra_ids = config.get("extra_ids", DEFAULT_EXTRA_IDS)
    if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or extra_ids < 0:
        raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: extra_ids must be a whole number >= 0; got {extra_ids!r}")
    settings.extra_ids = extra_ids
    decoder = config.get("added_tokens_decoder") or {}
    for token in decoder.values() if isinstance(decoder, dict) else ():
        if isinstance(token, dict) and token.get("content"):
            settings.flags[token["content"]] = token
            settings.special_tokens.append(token["content"])
    return settings


def _backend_from_tokenizer_json(path: Path, settings: TokenSettings) -> Tokenizer:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    try:
        return build_backend(spec, eos_token=settings.eos_token)
    except Exception as error:  # malformed entries; tokenizers raises plain Exceptions
        raise CheckpointError(f"{path}: not a UMT5/T5 Unigram tokenizer ({error})") from None


def _backend_from_spiece_model(path: Path, settings: TokenSettings) -> Tokenizer:
    try:
        spec = spiece_tokenizer_spec(path.read_bytes(), settings)
        return build_backend(spec, eos_token=settings.eos_token)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    except SpieceError as error:
        raise CheckpointError(f"{path}: not a SentencePiece model ({error})") from None
    except Exception as error:  # tokenizers raises plain Exceptions
        raise CheckpointError(f"{path}: not a UMT5/T5 Unigram tokenizer ({error})") from None


def spiece_tokenizer_spec(data: bytes, settings: TokenSettings) -> dict:
    """A tokenizer.json-like spec (what `build_backend` reads) for a serialized spiece.model, laid out
    as transformers 5's T5Tokenizer converts it: pieces, then the sentinels in reverse order."""
    model = parse_spiece_model(data)
    if model.model_type != UNIGRAM:
        name = MODEL_TYPE_NAMES.get(model.model_type, model.model_type)
        raise SpieceError(f"model type {name}, expected unigram")
    sentinels = [f"<extra_id_{i}>" for i in range(settings.extra_ids)]
    vocab = [(p.text, p.score) for p in model.pieces] + [(s, 0.0) for s in reversed(sentinels)]
    special = model.control_pieces + [settings.pad_token, settings.eos_token, settings.unk_token]
    special += sentinels + settings.special_tokens
    added = [{"content": token, "special": True, "normalized": False, **_flags(settings.flags.get(token))}
             for token in dict.fromkeys(special) if token]
    charsmap = model.precompiled_charsmap
    normalizer = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()} if charsmap else None
    return {"model": {"type": "Unigram", "vocab": vocab}, "normalizer": normalizer, "added_tokens": added}


def _flags(token: dict | None) -> dict:
    names = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return {name: token[name] for name in names if name in token} if token else {}


def _content(value) -> str:
    # Older files store special tokens as AddedToken dicts.
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
