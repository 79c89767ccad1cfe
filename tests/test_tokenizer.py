"""Our prompt cleaning and tokenizer give the ids and masks of the reference path: diffusers' Helios
`prompt_clean`, then transformers' AutoTokenizer with the pipeline's call settings (spec B.6, B.7)."""
import json

import numpy as np
import pytest
from diffusers.pipelines.helios.pipeline_helios import prompt_clean
from transformers import AutoTokenizer

from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax.text import MAX_LENGTH, PromptTokenizer, clean_prompt
from tests.tokenizer_reference import STRESS_PROMPTS, heliosbench_prompts, write_tokenizer_folder

pytest.importorskip("sentencepiece")  # only to build the test tokenizer; the product reads tokenizer.json


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer_folder(tmp_path_factory.mktemp("umt5_tokenizer"))


def reference_tokenize(tokenizer_dir, prompts):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=MAX_LENGTH,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


def test_cleaning_matches_the_helios_pipeline():
    prompts = heliosbench_prompts() + STRESS_PROMPTS
    cleaned = [clean_prompt(p) for p in prompts]
    assert cleaned == [prompt_clean(p) for p in prompts]
    assert sum(c != p for c, p in zip(cleaned, prompts)) > 10  # curly quotes and the like did change
    assert clean_prompt(" a&amp;amp;b \u3000\n c ") == "a&b c"


@pytest.mark.parametrize("prompt_set", ["heliosbench", "stress"])
def test_ids_and_masks_match_transformers(tokenizer_dir, prompt_set):
    prompts = heliosbench_prompts() if prompt_set == "heliosbench" else STRESS_PROMPTS
    assert len(prompts) == (240 if prompt_set == "heliosbench" else len(STRESS_PROMPTS))
    expected_ids, expected_mask = reference_tokenize(tokenizer_dir, prompts)
    ids, mask = PromptTokenizer.from_folder(tokenizer_dir)([clean_prompt(p) for p in prompts])
    assert ids.shape == mask.shape == (len(prompts), MAX_LENGTH) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    lengths = mask.sum(1)
    assert (ids[np.arange(len(prompts)), lengths - 1] == 1).all()  # EOS closes every prompt
    assert all((ids[i, n:] == 0).all() and (mask[i, n:] == 0).all() for i, n in enumerate(lengths))


def test_truncation_keeps_eos_at_the_last_row(tokenizer_dir):
    long_prompt = " ".join(heliosbench_prompts()[:6])
    ids, mask = PromptTokenizer.from_folder(tokenizer_dir)([clean_prompt(long_prompt), ""])
    expected_ids, _ = reference_tokenize(tokenizer_dir, [long_prompt, ""])
    np.testing.assert_array_equal(ids, expected_ids)
    assert mask[0].all() and ids[0, -1] == 1 and ids[0, -2] > 1  # 511 content tokens + EOS
    assert mask[1].sum() == 1 and ids[1, 0] == 1  # the empty (negative) prompt is EOS alone


def test_unknown_characters_get_id_2_as_in_transformers_5(tokenizer_dir):
    # The umt5 vocabulary calls id 3 <unk>, but transformers 5 fixes the Unigram unknown id at 2 (<s>).
    ids, _ = PromptTokenizer.from_folder(tokenizer_dir)(["a ö 🙂"])
    assert 2 in ids[0] and 3 not in ids[0]


def test_folder_without_tokenizer_json_is_refused(tokenizer_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        PromptTokenizer.from_folder(tmp_path)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="tokenizer.json: not a UMT5/T5 Unigram tokenizer"):
        PromptTokenizer.from_folder(tmp_path)
