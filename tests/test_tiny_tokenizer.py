"""The in-memory tokenizer of `--model tiny-random`: real conventions, small vocabulary."""
import numpy as np
import pytest

from helios_jax.text import MAX_LENGTH
from helios_jax.text.tiny_tokenizer import tiny_tokenizer


def test_a_red_car_is_tokenised_padded_and_closed_with_eos():
    tokenizer = tiny_tokenizer(vocab_size=320)
    ids, mask = tokenizer(["a red car", ""])
    assert ids.shape == mask.shape == (2, MAX_LENGTH) and ids.dtype == np.int32
    assert ids[0, :4].tolist() == [tokenizer._backend.token_to_id(t) for t in ("▁a", "▁red", "▁car", "</s>")]
    assert mask[0].tolist() == [1] * 4 + [0] * (MAX_LENGTH - 4)
    assert (ids[0, 4:] == 0).all()  # <pad>
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # the empty (negative) prompt is EOS alone
    assert ids.max() < 320


def test_any_text_stays_inside_the_vocabulary():
    for vocab_size in (98, 320, 800):
        ids, mask = tiny_tokenizer(vocab_size)(["Héllo wörld 🙂, an unusual zyzzyva! " * 40])
        assert 0 <= ids.min() and ids.max() < vocab_size
        assert mask.all() and ids[0, -1] == 1  # truncated to 512 with EOS kept last
        assert (ids == 2).any()  # characters outside the vocabulary map to <unk>
    with pytest.raises(ValueError, match="vocab_size=50"):
        tiny_tokenizer(50)
