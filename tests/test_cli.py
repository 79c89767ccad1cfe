"""The `helios-jax` command as a user runs it: exit codes and one-line errors."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "helios_jax", *args], capture_output=True, text=True, timeout=600)


def test_forward_on_tiny_random_model():
    result = run("forward", "--model", "tiny-random", "--latent-size", "3,8,8", "--config.num_layers=3")
    assert result.returncode == 0, result.stderr
    assert "layers=3" in result.stdout
    assert "output (velocity for the current chunk): (1, 4, 3, 8, 8)" in result.stdout


def test_bad_inputs_exit_non_zero_with_one_line_naming_the_culprit(tmp_path):
    cases = [
        (("forward", "--model", str(tmp_path / "absent")), "absent"),
        (("forward", "--model", "tiny-random", "--config.heads=3"), "--config.heads"),
        (("forward", "--model", "tiny-random", "--config", "nope.py"), "nope.py"),
    ]
    for args, culprit in cases:
        result = run(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], result.stderr


def test_help_and_version():
    assert run("--help").returncode == 0
    assert run("forward", "--help").returncode == 0
    assert "helios-jax" in run("--version").stdout
