"""Issue 9's end-to-end check: the real toy videos, prepared with the tiny random VAE and text
encoder, train the tiny model through `helios-jax train` (LoRA + full history patchers, the
stage's loss, the grain loader): the Stage-1 and Stage-2 losses fall over a few hundred steps."""
import json
from pathlib import Path

import numpy as np
import pytest

from helios_jax.cli import main

TOY = Path("/work/shared/data/toy_data")
# 64x64 pixels -> 8x8 latents: the pyramid's lowest level (2x2) still makes one 2x2 patch.
SIZE = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "latents"
    # The api.md form: --videos names the clips' JSON, whose paths are relative to its folder.
    assert main(["prepare-data", "--videos", str(TOY / "toy_filter.json"),
                 "--model", "tiny-random", "--out", str(out), "--height", str(SIZE), "--width", str(SIZE),
                 "--min-frames", "33"]) == 0
    return out


def losses(workdir: Path) -> np.ndarray:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return np.array([r["loss"] for r in records if "loss" in r])


@pytest.mark.parametrize("config, steps", [("stage1", 240), ("stage2", 160)])  # stage_1_init, stage_2_init
def test_loss_falls_on_the_prepared_toy_videos(prepared, tmp_path, config, steps):
    workdir = tmp_path / config
    assert main(["train", "--config", f"configs/train/{config}.py:tiny", "--workdir", str(workdir),
                 f"--config.data_dir={prepared}", f"--config.total_steps={steps}",
                 "--config.checkpoint_every=100000", "--config.optimizer.lr=0.002"]) == 0
    loss = losses(workdir)
    assert len(loss) == steps and np.all(np.isfinite(loss))
    window = steps // 5
    first, last = loss[:window].mean(), loss[-window:].mean()
    assert last < 0.8 * first, f"{config}: mean loss {first:.3f} over the first {window} steps, {last:.3f} over the last"


def test_missing_or_corrupt_shards_are_one_line_and_touch_nothing(prepared, tmp_path, capsys):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(prepared, corrupt)
    shard = sorted(p for p in corrupt.rglob("*array_record*") if p.is_file())[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    for data, named in ((tmp_path / "absent", "absent"), (corrupt, shard.name)):
        workdir = tmp_path / f"run-{Path(data).name}"
        code = main(["train", "--config", "configs/train/stage1.py:tiny", "--workdir", str(workdir),
                     f"--config.data_dir={data}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and named in err[0], err
        assert not workdir.exists()


def test_every_preset_names_a_stage_of_the_table():
    """training/stages.py is the one place a stage picks its loop, loss and data; every preset trains one of them."""
    from helios_jax.config_flags import load_config
    from helios_jax.training import stages
    from helios_jax.training.presets import PRESET_ARGS

    for preset, args in PRESET_ARGS.items():
        for arg in ("",) + args:
            stage = stages.stage_of(load_config(f"{preset}:{arg}"))
            assert (stage.loop == "trainer") == (stage.loss is not None)
    assert set(stages.STAGE_LOSSES) | set(stages.DISTILL_STAGES) == set(stages.STAGES)
    with pytest.raises(ValueError, match="must be one of stage1, stage2, stage3_ode, stage3_dmd"):
        stages.stage_of(_with_stage("x"))


def _with_stage(name):
    from helios_jax.config_flags import load_config

    config = load_config("stage1:tiny")
    config.train.stage = name
    return config


def test_training_imports_no_command():
    """Imports run commands -> training: nothing under helios_jax/training/ imports a command module."""
    import ast

    root = Path(__file__).resolve().parent.parent / "helios_jax" / "training"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not (name.startswith("helios_jax.commands") or name.endswith("_command")
                            or name == "helios_jax.cli"), f"{path.name} imports {name}"
