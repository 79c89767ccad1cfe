"""The benchmark scripts run end to end on a CPU (their numbers are not checked: speed is for bench/)."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_transformer_bench_prints_rate_and_ratios():
    result = subprocess.run(
        [sys.executable, str(BENCH / "transformer.py"), "--config", "tiny", "--latent-size", "3,8,8",
         "--iters", "1", "--attention", "xla", "--torch-baseline"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for expected in ("TFLOP/s", "fraction of matmul rate", "ratio jax[xla]", "speed-up jax[xla] over torch"):
        assert expected in result.stdout, result.stdout


def test_vae_bench_prints_time_memory_and_speed_up():
    result = subprocess.run(
        [sys.executable, str(BENCH / "vae.py"), "--config", "tiny", "--resolution", "32x48", "--latent-frames", "3",
         "--iters", "1", "--torch-baseline"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for expected in ("ms/chunk", "frames/s", "peak memory", "speed-up jax over torch"):
        assert expected in result.stdout, result.stdout


def test_convert_bench_prints_rss_and_throughput(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "convert.py"), "--small", "--blocks", "1", "2", "--workdir", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for expected in ("peak RSS GiB", "convert MB/s", "read MB/s"):
        assert expected in result.stdout, result.stdout


def test_generate_bench_prints_fps_split_and_speed_up():
    result = subprocess.run(
        [sys.executable, str(BENCH / "generate.py"), "--num-frames", "33", "--steps", "1,1,1", "--torch-baseline"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for expected in ("frames/s end to end", "text", "transformer", "VAE decode", "TFLOP/s", "speed-up jax over torch"):
        assert expected in result.stdout, result.stdout


def test_fusion_report_names_the_passes_and_the_code_in_them():
    result = subprocess.run(
        [sys.executable, str(BENCH / "fusions.py"), "--model", "tiny", "--topology", "v5e:1x1", "--top", "60"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "memory-bound passes move" in result.stdout and "q/k RMSNorm + RoPE:" in result.stdout, result.stdout
    # The HLO's stack frames map passes back to the model's functions.
    for function in ("apply_rope", "rms_norm", "layer_norm"):
        assert function in result.stdout, result.stdout
