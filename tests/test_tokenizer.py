"""Our prompt cleaning and tokenizer give the ids and masks of the reference path: diffusers' Helios
`prompt_clean`, then transformers' AutoTokenizer with the pipeline's call settings (spec B.6, B.7)."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers.pipelines.helios.pipeline_helios import prompt_clean
from transformers import AutoTokenizer, T5Tokenizer, T5TokenizerFast

from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax.text import MAX_LENGTH, PromptTokenizer, clean_prompt
from helios_jax.text.tokenizer import check_tokenizer_folder
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
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor spiece.model"):
        PromptTokenizer.from_folder(tmp_path)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="tokenizer.json: not a UMT5/T5 Unigram tokenizer"):
        PromptTokenizer.from_folder(tmp_path)


# ------------------------------------------------------------------------------------------------
# Folders with spiece.model and no tokenizer.json (how many T5/UMT5 tokenizer folders ship)

SENTINELS_300 = [f"<extra_id_{i}>" for i in range(300)]
SPECIAL_TEXT_PROMPTS = ["<s> <unk> <pad> </s> <extra_id_0> <extra_id_99>x<extra_id_299>y", "a<extra_id_5>b c </s>d",
                        "x <tag> y<tag>z"]


def train_spiece_model(vocab_size=1000, **options) -> bytes:
    import sentencepiece

    settings = dict(model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                    eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>", normalization_rule_name="nmt_nfkc",
                    character_coverage=0.9995, minloglevel=2, num_threads=1)
    settings.update(options)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(heliosbench_prompts()), model_writer=model,
                                             vocab_size=vocab_size, **settings)
    return model.getvalue()


def legacy_umt5_files(vocab_size=1000) -> dict:
    """tokenizer_config.json and special_tokens_map.json as transformers 4 wrote them for umt5 (300 sentinels)."""
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    decoder = {str(i): dict(content=t, **flags) for i, t in enumerate(["<pad>", "</s>", "<s>", "<unk>"])}
    decoder.update({str(vocab_size + 299 - i): dict(content=f"<extra_id_{i}>", **flags) for i in range(300)})
    config = dict(added_tokens_decoder=decoder, additional_special_tokens=SENTINELS_300, eos_token="</s>",
                  extra_ids=300, model_max_length=512, pad_token="<pad>", tokenizer_class="T5Tokenizer",
                  unk_token="<unk>")
    special = dict(additional_special_tokens=SENTINELS_300, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


SPIECE_FOLDERS = {
    "spiece_only": ({}, {}),
    "extra_ids_300": ({}, {"tokenizer_config.json": {"tokenizer_class": "T5Tokenizer", "extra_ids": 300}}),
    "legacy_umt5_json": ({}, legacy_umt5_files()),
    # No charsmap (no normaliser), no <s>, a user-defined piece.
    "identity_no_bos": (dict(vocab_size=600, bos_id=-1, unk_id=2, normalization_rule_name="identity",
                             user_defined_symbols=["<tag>"]), {}),
}


@pytest.fixture(scope="module")
def spiece_models():
    return {}


def spiece_folder(root, name, spiece_models):
    options, files = SPIECE_FOLDERS[name]
    key = json.dumps(options, sort_keys=True)
    if key not in spiece_models:
        spiece_models[key] = train_spiece_model(**options)
    folder = root / name
    folder.mkdir()
    (folder / "spiece.model").write_bytes(spiece_models[key])
    for file_name, content in files.items():
        (folder / file_name).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("name", list(SPIECE_FOLDERS))
def test_spiece_only_folders_match_t5_tokenizer_and_t5_tokenizer_fast(name, spiece_models, tmp_path):
    folder = spiece_folder(tmp_path, name, spiece_models)
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".json") or p.name == "tokenizer.json") \
        == sorted(SPIECE_FOLDERS[name][1])  # no tokenizer.json: the spiece.model path is what is tested
    prompts = [clean_prompt(p) for p in heliosbench_prompts() + STRESS_PROMPTS] + SPECIAL_TEXT_PROMPTS
    ids, mask = PromptTokenizer.from_folder(folder)(prompts)
    for reference_class in (T5Tokenizer, T5TokenizerFast):
        reference = reference_class.from_pretrained(folder)
        expected = reference(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="np")
        np.testing.assert_array_equal(ids, expected["input_ids"])
        np.testing.assert_array_equal(mask, expected["attention_mask"])
    stress = len(heliosbench_prompts())
    assert mask[stress].sum() == 1 and ids[stress, 0] == 1  # the empty prompt is EOS alone
    assert mask[stress + len(STRESS_PROMPTS) - 1].all() and ids[stress + len(STRESS_PROMPTS) - 1, -1] == 1  # truncated
    assert (ids == 2).any(axis=1)[stress:stress + len(STRESS_PROMPTS)].any()  # unknown characters: id 2


def test_tokenizer_json_is_preferred_to_spiece_model(tokenizer_dir, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")  # would fail if it were read
    prompts = STRESS_PROMPTS
    np.testing.assert_array_equal(PromptTokenizer.from_folder(folder)(prompts)[0],
                                  PromptTokenizer.from_folder(tokenizer_dir)(prompts)[0])


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "bpe_model", "text_file"])
def test_a_corrupt_spiece_model_is_one_error_naming_the_file(damage, spiece_models, tmp_path):
    good = spiece_folder(tmp_path, "spiece_only", spiece_models) / "spiece.model"
    data = {"garbage": bytes(range(256)) * 8, "empty": b"", "truncated": good.read_bytes()[:5000],
            "bpe_model": train_spiece_model(vocab_size=600, model_type="bpe") if damage == "bpe_model" else b"",
            "text_file": b"<pad>\n</s>\n<unk>\nhello world\n"}[damage]
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        check_tokenizer_folder(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / 'spiece.model'}: ") and "\n" not in message, message
    assert ("model type bpe" in message) == (damage == "bpe_model"), message


def test_an_unreadable_spiece_model_names_the_file(spiece_models, tmp_path, monkeypatch):
    path = spiece_folder(tmp_path, "spiece_only", spiece_models) / "spiece.model"
    # A permission error as a non-root user meets it (chmod does not stop root, which CI runs as).
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "spiece.model" else real_read_bytes(self))
    with pytest.raises(CheckpointError, match=r"spiece.model: unreadable"):
        check_tokenizer_folder(path.parent)


def test_check_tokenizer_folder_refuses_missing_files_and_bad_json(spiece_models, tmp_path):
    check_tokenizer_folder(spiece_folder(tmp_path, "legacy_umt5_json", spiece_models))  # a good one passes
    with pytest.raises(CheckpointError, match=r"empty: neither tokenizer.json nor spiece.model"):
        (tmp_path / "empty").mkdir()
        check_tokenizer_folder(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"missing: no such folder"):
        check_tokenizer_folder(tmp_path / "missing")
    folder = spiece_folder(tmp_path, "spiece_only", spiece_models)
    (folder / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"special_tokens_map.json: invalid JSON"):
        check_tokenizer_folder(folder)
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": "many"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: extra_ids must be a whole number >= 0"):
        check_tokenizer_folder(folder)


class WeightsRead(Exception):
    pass


def test_text_encoder_from_pretrained_checks_the_tokenizer_before_the_weights(spiece_models, tmp_path, monkeypatch):
    from helios_jax.text import prompt_embeddings

    def load_weights(folder, **kwargs):
        raise WeightsRead(str(folder))

    monkeypatch.setattr(prompt_embeddings, "load", load_weights)
    model = tmp_path / "model"
    (model / "text_encoder").mkdir(parents=True)
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "spiece.model").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"tokenizer/spiece.model: not a SentencePiece model"):
        prompt_embeddings.TextEncoder.from_pretrained(model)
    (model / "tokenizer" / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer: neither tokenizer.json nor spiece.model"):
        prompt_embeddings.TextEncoder.from_pretrained(model)
    shutil.rmtree(model / "tokenizer")
    spiece_folder(model, "spiece_only", spiece_models).rename(model / "tokenizer")
    with pytest.raises(WeightsRead, match="text_encoder"):  # a good tokenizer: on to the weights
        prompt_embeddings.TextEncoder.from_pretrained(model)
