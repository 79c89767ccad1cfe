"""Interactive mode (spec sampler.md 7): the prompt CSV and the chunk -> prompt schedule, quirks included."""
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax.media import chunk_count
from helios_jax.sampling.interactive import (blend_embeddings, chunk_prompt_weights, interpolated_chunk_count,
                                             interpolation_weights, read_prompt_csv)

EXAMPLE_CSV = "/work/shared/data/prompt_interactive_helios.csv"


def test_example_csv_groups_and_orders_prompts():
    videos = read_prompt_csv(EXAMPLE_CSV)
    assert [i for i, _ in videos] == ["6", "8", "11", "14", "20", "153", "200", "312", "334"]  # numeric order
    assert [len(p) for _, p in videos] == [6, 6, 6, 6, 6, 6, 6, 5, 6]
    assert videos[0][1][0].startswith("Underwater tornado")
    assert videos[0][1][1].startswith("The underwater vortex intensifies")


def test_refined_prompt_wins_when_present_and_rows_are_sorted(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt_index,prompt,refined_prompt\n2,5,"late, with comma",\n2,1,early,early refined\n'
                    "10,0,ten,\n", encoding="utf-8")
    assert read_prompt_csv(path) == [("2", ["early refined", "late, with comma"]), ("10", ["ten"])]


@pytest.mark.parametrize("content, message", [
    ("id,prompt\n1,a\n", "missing column"),
    ("id,prompt_index,prompt\n", "no prompt rows"),
    ("", "missing column"),
    ("id,prompt_index,prompt\n1,x,a\n", "line 2: prompt_index 'x'"),
])
def test_bad_csv_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.csv.*{message}"):
        read_prompt_csv(path)
    with pytest.raises(OSError, match="nowhere.csv"):
        read_prompt_csv(tmp_path / "nowhere.csv")


def test_new_prompt_blends_in_over_interpolation_steps():
    times = [7] * 6
    schedule = [chunk_prompt_weights(k, times, 3) for k in range(44)]
    assert schedule[:7] == [(0, 0, 1.0)] * 7
    assert schedule[7:10] == [(0, 1, 0.0), (0, 1, 0.5), (1, 1, 1.0)]  # old prompt, 50/50, new prompt
    assert schedule[14:17] == [(1, 2, 0.0), (1, 2, 0.5), (2, 2, 1.0)]
    assert schedule[41] == (5, 5, 1.0)


def test_chunks_past_the_last_prompt_revert_to_the_first():
    times = [7] * 6
    num_chunks = interpolated_chunk_count(chunk_count(1452), times)
    assert num_chunks == 44  # enough frames requested: the count stands
    assert [chunk_prompt_weights(k, times, 3) for k in (42, 43)] == [(0, 0, 1.0)] * 2
    assert chunk_prompt_weights(43, times, 3, hold_last_prompt=True) == (5, 5, 1.0)
    five = [7] * 5  # id 312: chunks 35-43 use P_0
    assert all(chunk_prompt_weights(k, five, 3) == (0, 0, 1.0) for k in range(35, 44))
    assert chunk_prompt_weights(34, five, 3) == (4, 4, 1.0)


def test_too_few_chunks_become_the_sum_of_cumulative_ends():
    assert interpolated_chunk_count(chunk_count(99), [7, 7, 7]) == 42  # 7 + 14 + 21, not 21
    assert interpolated_chunk_count(3, [7, 7, 7], sum_quirk=False) == 21
    assert interpolated_chunk_count(21, [7, 7, 7]) == 21


def test_interpolation_steps_must_be_below_every_count():
    with pytest.raises(ValueError, match="interpolation_steps=3"):
        chunk_prompt_weights(0, [7, 3, 7], 3)
    assert chunk_prompt_weights(7, [7, 7], 1) == (0, 1, 0.0) and chunk_prompt_weights(8, [7, 7], 1) == (1, 1, 1.0)
    assert interpolation_weights(3) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, interpolation_weights(4)[1], interpolation_weights(4)[2]])
def test_blend_matches_torch_lerp_in_bfloat16(w):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    embeds = torch.from_numpy(rng.standard_normal((3, 16, 32)).astype(np.float32)).to(torch.bfloat16)
    expected = torch.lerp(embeds[0], embeds[2], w).float().numpy()
    actual = blend_embeddings(jnp.asarray(embeds.float().numpy(), jnp.bfloat16), 0, 2, w)
    assert actual.dtype == jnp.bfloat16 and isinstance(actual, np.ndarray) and actual.shape == (16, 32)
    np.testing.assert_array_equal(np.asarray(actual, np.float32), expected)
