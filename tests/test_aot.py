"""`helios-jax aot`: compile the tiny transformer for a small TPU slice on this CPU-only machine
(libtpu describes the slice) and read the memory / FLOPs report; bad flags give one line."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU topology to compile for")


def helios_aot(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "helios_jax", "aot", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_libtpu
def test_tiny_forward_compiles_for_v5e_2x2():
    result = helios_aot("--topology", "v5e:2x2", "--model", "tiny", "--task", "forward", "--mesh", "data=1,fsdp=4")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "4 x TPU v5 lite" in out and "fsdp=4" in out
    gib = {name: float(value) for name, value in re.findall(r"^\s+(\w+)\s+([\d.]+) GiB", out, re.M)}
    for field in ("arguments", "outputs", "temporaries", "peak"):
        assert field in gib, f"no {field} line in:\n{out}"
    assert gib["peak"] >= gib["arguments"] + gib["temporaries"] - 1e-3
    assert re.search(r"peak .*\(fits: 16 GiB HBM per chip\)", out)
    flops = re.search(r"^FLOPs:\s+([\d.e+]+) per device", out, re.M)
    assert flops and float(flops.group(1)) > 0
    assert re.search(r"^model FLOPs:\s+[\d.e+]+ per step", out, re.M)
    assert not result.stderr.strip(), result.stderr  # libtpu's warnings about a missing TPU VM are quieted


@pytest.mark.parametrize("args, flag", [
    (("--topology", "v5e"), "--topology"),
    (("--topology", "v5e:2x2", "--mesh", "fsdp=2,fsdp=2"), "--mesh"),
    (("--topology", "v5e:2x2", "--mesh", "pipeline=4"), "--mesh"),
    (("--topology", "v5e:2x2", "--mesh", "fsdp=four"), "--mesh"),
    (("--topology", "v5e:2x2", "--task", "sample"), "--task"),
])
def test_bad_flags_give_one_line(args, flag):
    result = helios_aot(*args, "--model", "tiny", timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr


@needs_libtpu
@pytest.mark.parametrize("args", [
    ("--topology", "v5e:3x7"),  # not a slice shape libtpu knows
    ("--topology", "v5e:2x2", "--mesh", "fsdp=8"),  # more devices than the slice has
    ("--topology", "v5e:2x2", "--mesh", "fsdp=2"),  # leaves devices unused
])
def test_topology_and_mesh_that_do_not_match_give_one_line(args):
    result = helios_aot(*args, "--model", "tiny", timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and args[-2] in lines[0], result.stderr
