"""`helios-jax merge-lora`: a run's LoRA fused into the transformer it started from equals what the
reference's release conversion does (diffusers loads the run's PEFT adapters and whole-trained
history patchers, `fuse_lora`), weight for weight and in the forward; the folder is what
`helios_jax.load`, `helios-jax export` and diffusers' `from_pretrained` read."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HeliosTransformer3DModel as TorchHelios
from diffusers.loaders.lora_pipeline import HeliosLoraLoaderMixin
from safetensors.numpy import load_file

from checkpoints_convert import transformer_keys
from helios_jax.cli import main
from helios_jax.loading import load
from helios_jax.sampling.pipeline import HeliosPipeline
from tests.diffusers_reference import build_reference, relative_error, run_reference
from tests.test_trainer import command_env
from tests.test_transformer_parity import make_inputs, run_ours

REPO = Path(__file__).resolve().parent.parent
STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step Stage-1 run (LoRA on every linear and the patch embedding, history patchers trained
    whole) starting from a diffusers-format random transformer, then merged."""
    root = tmp_path_factory.mktemp("merge_lora")
    init, workdir, merged = root / "init", root / "run", root / "merged"
    build_reference(seed=3).save_pretrained(init, safe_serialization=True)
    command = [sys.executable, "-m", "helios_jax", "train", "--config", "configs/train/stage1.py:tiny",
               "--workdir", str(workdir), f"--config.model.init={init}", f"--config.model.config={init}",
               f"--config.total_steps={STEPS}", f"--config.checkpoint_every={STEPS}", "--config.optimizer.lr=0.02",
               "--config.optimizer.warmup_steps=0"]
    result = subprocess.run(command, env=command_env(root / "cache"), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["merge-lora", "--workdir", str(workdir), "--out", str(merged)]) == 0
    return init, workdir, merged


def fused_reference(init: Path, merged: Path) -> TorchHelios:
    """The reference's release conversion of the run: the init transformer, the run's adapters
    loaded the diffusers way (metadata included), the whole-trained modules loaded, LoRA fused."""
    reference = TorchHelios.from_pretrained(init).eval()
    state, metadata = HeliosLoraLoaderMixin.lora_state_dict(str(merged), weight_name="pytorch_lora_weights.safetensors",
                                                             return_lora_metadata=True)
    reference.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    partial = {k: torch.from_numpy(v) for k, v in load_file(merged / "transformer_partial.safetensors").items()}
    assert sorted({k.split(".")[0] for k in partial}) == ["patch_long", "patch_mid", "patch_short"]
    missing, unexpected = reference.load_state_dict(partial, strict=False)
    assert not unexpected
    reference.fuse_lora()
    reference.unload_lora()
    return reference


def test_merged_weights_equal_the_reference_fusion(run, tmp_path):
    init, _, merged = run
    reference = fused_reference(init, merged).state_dict()
    base = TorchHelios.from_pretrained(init).state_dict()
    assert main(["export", str(merged), str(tmp_path / "diffusers")]) == 0
    exported = TorchHelios.from_pretrained(tmp_path / "diffusers")  # diffusers reads the exported folder
    ours = exported.state_dict()
    assert sorted(ours) == sorted(reference)
    moved = 0
    for key, expected in reference.items():
        np.testing.assert_allclose(ours[key].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
        moved += not torch.equal(expected, base[key])
    # Every adapted weight and the patchers moved: the LoRA of each linear, q/k/v/out and the FFNs
    # of both blocks, the patch embedding, the three history patchers.
    assert moved >= 30, moved


def test_merged_forward_equals_the_fused_reference(run):
    init, _, merged = run
    reference = fused_reference(init, merged)
    inputs = make_inputs(current=(3, 16, 16), short=(2, 16, 16), mid=(2, 16, 16), long=(16, 16, 16))
    expected = run_reference(reference, inputs)
    base = run_reference(TorchHelios.from_pretrained(init).eval(), inputs)
    assert relative_error(expected, base) > 1e-3  # training moved the model
    ours = run_ours(load(merged, dtype="float32"), inputs)
    assert relative_error(ours, expected) <= 1e-5


def test_folder_records_where_it_came_from(run):
    _, workdir, merged = run
    metadata = json.loads((merged / "conversion.json").read_text())
    assert metadata["merged_from"]["step"] == STEPS
    assert metadata["merged_from"]["weights"] == "trained"  # Stage 1 keeps no EMA
    assert metadata["merged_from"]["stage"] == "stage1"
    config = json.loads((merged / "config.json").read_text())
    assert config["_class_name"] == "HeliosTransformer3DModel" and config["text_dim"] == 16


def test_every_leaf_maps_back_to_its_diffusers_key(run):
    _, _, merged = run
    manifest = json.loads((merged / "params" / "manifest.json").read_text())
    for name, leaf in manifest.items():
        for layer, key in enumerate(leaf["torch_keys"]):
            target = transformer_keys.target_of(key)
            assert (target.path, target.layer) == (name, layer if leaf["stacked"] else None)


def test_generate_refuses_a_transformer_of_another_text_width(run):
    _, _, merged = run
    with pytest.raises(ValueError, match="text_dim 16 is not the tiny-random text encoder's 64"):
        HeliosPipeline.tiny_random("distilled", transformer=merged)


@pytest.mark.parametrize("case", ["no_workdir", "no_ema", "bad_step", "exists"])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, case):
    _, workdir, _ = run
    out = tmp_path / "out"
    args = {"no_workdir": ["--workdir", str(tmp_path / "missing")],
            "no_ema": ["--workdir", str(workdir), "--weights", "ema"],
            "bad_step": ["--workdir", str(workdir), "--step", "7"],
            "exists": ["--workdir", str(workdir)]}[case]
    if case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    capsys.readouterr()
    assert main(["merge-lora", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"no_workdir": "no config.json", "no_ema": "keeps no EMA", "bad_step": "--step 7",
                "exists": "already exists"}[case]
    assert len(err) == 1 and expected in err[0], err
    assert (out / "keep").exists() if case == "exists" else not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
