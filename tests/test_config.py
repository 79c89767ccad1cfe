"""Config files, --config.FIELD=VALUE overrides, and config.json handling."""
import pytest

from helios_jax.config_flags import ConfigError, apply_overrides, load_config, split_overrides
from helios_jax.models.transformer_config import from_diffusers_json, transformer_config


def test_helios_14b_values_from_spec():
    config = load_config("configs/models/helios_14b.py")
    assert config.num_attention_heads * config.attention_head_dim == 5120
    assert (config.num_layers, config.ffn_dim, config.text_dim, config.freq_dim) == (40, 13824, 4096, 256)
    assert tuple(config.rope_dim) == (44, 42, 42) and tuple(config.patch_size) == (1, 2, 2)
    assert config.guidance_cross_attn and config.zero_history_timestep and config.has_multi_term_memory_patch
    assert not config.is_amplify_history and config.dtype == "bfloat16"


def test_names_args_and_overrides():
    assert load_config("tiny").dtype == "float32"
    assert load_config("tiny:bfloat16").dtype == "bfloat16"
    config = apply_overrides(load_config("tiny"), ["--config.num_layers=4", "--config.rope_theta=500",
                                                   "--config.remat_policy=full", "--config.patch_size=[1,2,2]"])
    assert (config.num_layers, config.rope_theta, config.remat_policy) == (4, 500.0, "full")
    assert split_overrides(["a", "--config.x=1"]) == (["a"], ["--config.x=1"])


@pytest.mark.parametrize("bad", ["--config.nope=1", "--config.num_layers", "--config.num_layers=abc"])
def test_bad_override_names_the_flag(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        apply_overrides(load_config("tiny"), [bad])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no config file"):
        load_config("configs/models/nope.py")


def test_config_json_ignores_extra_keys_and_refuses_official_only_paths():
    config = from_diffusers_json({"_class_name": "HeliosTransformer3DModel", "num_layers": 3, "is_use_gan": False,
                                  "restrict_lora_rank": 128, "gan_hooks": [5, 15], "some_future_key": 1})
    assert config.num_layers == 3 and config.num_attention_heads == 40
    for flag in ("restrict_self_attn", "is_amplify_history"):
        with pytest.raises(ValueError, match=flag):
            from_diffusers_json({flag: True})


def test_inconsistent_rope_dim_is_refused():
    with pytest.raises(ValueError, match="rope_dim"):
        transformer_config(rope_dim=(44, 42, 40))
