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


# ------------------------------------------------------------------------------------------------
# The training presets (helios_jax/training/presets.py) and configs/train/*.py

# every preset:arg -> the spec training.md §7.1 run and (lr, seed, LoRA rank, stage, GAN on)
TRAINING_RUNS = {
    "stage1": ("stage_1_init", 5e-5, 43, 128, "stage1", None),
    "stage1:post": ("stage_1_post", 3e-5, 44, 128, "stage1", None),
    "stage2": ("stage_2_init", 1e-4, 45, 256, "stage2", None),
    "stage2:post": ("stage_2_post", 3e-5, 46, 256, "stage2", None),
    "stage3_ode": ("stage_3_ode", 2e-6, 47, 256, "stage3_ode", None),
    "stage3_dmd": ("stage_3_post", 2e-6, 49, 256, "stage3_dmd", False),
    "stage3_dmd:gan": ("stage_3_post_gan", 2e-6, 49, 256, "stage3_dmd", True),
}


def _with_tiny(spec):
    return f"{spec},tiny" if ":" in spec else f"{spec}:tiny"


@pytest.mark.parametrize("spec", sorted(TRAINING_RUNS))
def test_every_training_preset_and_arg_loads_the_spec_run(spec):
    from helios_jax.training.presets import run_name

    run, lr, seed, rank, stage, gan = TRAINING_RUNS[spec]
    preset, _, arg = spec.partition(":")
    assert run_name(preset, arg) == run == run_name(preset, _with_tiny(spec).partition(":")[2])
    config = load_config(spec)
    assert (config.optimizer.lr, config.seed, config.lora.rank, config.train.stage) == (lr, seed, rank, stage)
    assert config.model.config == "helios_14b" and config.data_dir == ""
    assert config.get("gan", {}).get("enabled") == gan
    # the repository's file and the name give the same config; `tiny` combines with the other args
    assert load_config(f"configs/train/{preset}.py{spec[len(preset):]}").to_dict() == config.to_dict()
    # `tiny` combines with the preset's other arg, in either order, by name or by file
    tinies = [_with_tiny(spec)] + ([f"{preset}:tiny,{arg}", f"{preset}: {arg} , tiny"] if arg else [])
    for name in tinies:
        tiny = load_config(name)
        assert tiny.model.config == "tiny-random" and tiny.seed == seed and tiny.data_dir == "synthetic"
        assert tiny.train.stage == stage and tiny.get("gan", {}).get("enabled") == gan
        assert load_config(f"configs/train/{preset}.py{name[len(preset):]}").to_dict() == tiny.to_dict()


def test_training_presets_load_without_the_repository_configs(monkeypatch, tmp_path):
    """An installed wheel has no configs/ next to the package: the presets come from the package."""
    import helios_jax.config_flags as config_flags

    monkeypatch.setattr(config_flags, "REPO_CONFIGS", tmp_path / "no-configs")
    monkeypatch.chdir(tmp_path)  # no configs/train/ relative to the working folder either
    for spec in TRAINING_RUNS:
        assert load_config(spec).seed == TRAINING_RUNS[spec][2]
        assert load_config(_with_tiny(spec)).model.config == "tiny-random"
    with pytest.raises(ConfigError, match="no config file"):
        load_config("tiny")  # the model configs are still files of the repository


@pytest.mark.parametrize("spec, accepted", [("stage1:gan", "post and/or tiny"), ("stage2:post,fast", "post and/or tiny"),
                                            ("stage3_ode:post", "tiny"), ("stage3_dmd:post,tiny,x", "gan and/or tiny"),
                                            ("configs/train/stage3_dmd.py:nope", "gan and/or tiny")])
def test_a_bad_training_arg_is_one_clear_error(spec, accepted):
    with pytest.raises(ValueError) as error:
        load_config(spec)
    assert isinstance(error.value, ConfigError) and "unknown argument" in str(error.value)
    assert str(error.value).endswith(f"; use {accepted}") and "\n" not in str(error.value)


def test_configs_train_holds_one_file_per_stage():
    from pathlib import Path

    from helios_jax.training.presets import PRESETS

    files = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "train").glob("*.py"))
    assert files == sorted(PRESETS) == ["stage1", "stage2", "stage3_dmd", "stage3_ode"]
