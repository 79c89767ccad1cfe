"""A small UMT5-style tokenizer folder built in the test (the real umt5 files cannot be downloaded
here): a SentencePiece Unigram model trained on the HeliosBench prompts with umt5's special ids
(pad 0, eos 1, bos 2, unk 3) and nmt_nfkc normalisation, converted and saved by transformers'
T5Tokenizer with 300 sentinel ids, as the real `tokenizer/` folder is. Test-only."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

# A copy of the Helios repository's HeliosBench T2V prompt list (Apache-2.0, tests/data/LICENSE-helios-data.txt).
HELIOSBENCH_CSV = Path(__file__).parent / "data" / "heliosbench_t2v_prompts.csv"
EXTRA_IDS = 300

# Prompts that exercise cleaning, normalisation, unknown characters, special-token text and truncation.
STRESS_PROMPTS = [
    "",
    "   \t\n ",
    "Hello wörld’s “quote” 🙂 test ｆｕｌｌｗｉｄｔｈ </s> <extra_id_0>x <pad>y",
    "&amp;lt;b&amp;gt; a tag &quot;x&quot;  \t\n new\u3000line\u00a0here",
    "日本語のテキストと中文",
    "Ã©tÃ© mojibake",
    "a cat " * 400,  # far past 512 tokens: truncated, EOS kept at row 511
]


def heliosbench_prompts() -> list[str]:
    with HELIOSBENCH_CSV.open(encoding="utf-8", newline="") as handle:
        return [row["prompt"] for row in csv.DictReader(handle)]


def write_tokenizer_folder(folder: Path, vocab_size: int = 1000) -> Path:
    import sentencepiece
    from transformers import T5Tokenizer

    spm_dir = folder / "spm"
    spm_dir.mkdir(parents=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(heliosbench_prompts()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>",
        bos_piece="<s>", unk_piece="<unk>", normalization_rule_name="nmt_nfkc", character_coverage=0.9995,
        minloglevel=2, num_threads=1,
    )
    (spm_dir / "spiece.model").write_bytes(model.getvalue())
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS}))
    tokenizer_dir = folder / "tokenizer"
    T5Tokenizer.from_pretrained(spm_dir).save_pretrained(tokenizer_dir)
    return tokenizer_dir


def character_tokenizer():
    """A PromptTokenizer over single characters (no SentencePiece needed): ids < 100."""
    from helios_jax.text.tokenizer import PromptTokenizer, build_backend

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["▁", -2.0]]
    vocab += [[c, -3.0] for c in characters] + [["▁" + c, -3.0] for c in characters]
    added = [{"content": token, "special": True} for token in ("<pad>", "</s>", "<unk>")]
    return PromptTokenizer(build_backend({"model": {"type": "Unigram", "vocab": vocab}, "added_tokens": added}))
