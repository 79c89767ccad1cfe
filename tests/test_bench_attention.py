"""bench/attention.py runs on a CPU at the small shapes and prints its table (numbers unchecked)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "attention.py"


def test_attention_bench_prints_a_row_per_shape_with_time_rate_and_ratio():
    result = subprocess.run([sys.executable, str(BENCH), "--shapes", "small", "--impl", "xla", "--iters", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "backward 2.5x forward" in out and "ratio = xla time / impl time" in out, out
    for column in ("fwd ms", "fwd TF/s", "fwd ratio", "f+b ms", "f+b TF/s", "f+b ratio"):
        assert column in out, out
    number = r"\s+([0-9.]+)"
    for label in ("B1 self 200", "B1 cross 77x130"):
        row = re.search(rf"^{label}\s+xla" + number * 6, out, re.MULTILINE)
        assert row, (label, out)
        assert float(row.group(1)) > 0 and float(row.group(4)) > 0  # measured forward and forward+backward
        assert row.group(3) == row.group(6) == "1.00"  # the baseline against itself


def test_attention_bench_refuses_an_unknown_impl(capsys):
    spec = importlib.util.spec_from_file_location("attention_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--impl", "xla,flash9"])
    assert "--impl" in capsys.readouterr().err
