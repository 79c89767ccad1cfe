"""`helios-jax generate --mesh`: on 8 CPU devices (a subprocess, tests/generate_mesh_worker.py) the
automatic mesh and explicit FSDP / tensor-parallel meshes write the single device's video; the
automatic choice compiles its candidates; bad device flags are one line before anything is built."""
import subprocess
import sys
from pathlib import Path

import pytest

from helios_jax.sampling import mesh_choice

WORKER = Path(__file__).with_name("generate_mesh_worker.py")


def test_generate_on_8_devices_with_each_mesh_writes_the_single_device_video(tmp_path):
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=1200,
                            cwd=WORKER.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for mesh in ("auto", "fsdp=8", "tensor=4,fsdp=2"):
        assert f"ok {mesh} max_diff=" in result.stdout, result.stdout
    # auto compiled every candidate and said which it took
    assert "mesh auto: fsdp=8: peak" in result.stdout and "mesh auto: chose" in result.stdout
    assert "all ok" in result.stdout


def run(*args):
    return subprocess.run([sys.executable, "-m", "helios_jax", "generate", "--model", "tiny-random", "--prompt", "a car",
                           *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,culprit", [
    (("--mesh", "fsdp=3"), "--mesh fsdp=3"),  # one CPU device here: 3 do not match it
    (("--mesh", "pipeline=2"), "--mesh must be auto or AXIS=SIZE"),
    (("--mesh", "fsdp=two"), "--mesh fsdp size must be an integer"),
    (("--quantize", "int8", "--dtype", "float32"), "--quantize int8"),
    (("--quantize", "int4"), "--quantize"),
    (("--attention", "flash9"), "--attention must be one of"),
    (("--attention", "cudnn"), "--attention cudnn is not supported on this backend (cpu)"),
])
def test_bad_device_flags_exit_2_with_one_line_before_anything_is_built(tmp_path, args, culprit):
    out = tmp_path / "out.mp4"
    result = run("--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert "compiling" not in result.stdout and "chunk 1" not in result.stdout
    assert not out.exists()


def test_candidates_respect_heads_and_batch():
    assert mesh_choice.candidate_sizes(8, heads=12, batch=1) == [{"fsdp": 8}, {"tensor": 2, "fsdp": 4},
                                                                 {"tensor": 4, "fsdp": 2}]
    assert {"data": 2, "fsdp": 4} in mesh_choice.candidate_sizes(8, heads=40, batch=2)
    assert mesh_choice.candidate_sizes(1, heads=40, batch=2) == [{"fsdp": 1}]


def test_auto_takes_the_fastest_that_fits_and_refuses_when_none_fits():
    import jax

    class Fake:
        def __init__(self, peak, flops):
            self.peak, self.flops = peak, flops

        def memory_analysis(self):
            return type("M", (), dict(argument_size_in_bytes=self.peak, output_size_in_bytes=0, alias_size_in_bytes=0,
                                      temp_size_in_bytes=0, generated_code_size_in_bytes=0))()

        def cost_analysis(self):
            return {"flops": self.flops, "bytes accessed": 0.0}

        def as_text(self):
            return ""

    devices = jax.devices()[:1] * 1
    # one device: every candidate is the same mesh, so fake the compiled programs by the call order
    programs = iter([Fake(10, 5.0), Fake(20, 1.0), Fake(5, 9.0)])
    sizes = [{"fsdp": 1}, {"fsdp": 1}, {"fsdp": 1}]
    original = mesh_choice.candidate_sizes
    mesh_choice.candidate_sizes = lambda *a, **k: sizes
    try:
        _, results = mesh_choice.choose_mesh(devices, heads=1, batch=1, compile_chunk=lambda mesh: next(programs),
                                             limit=15)
        assert [c.fits for c in results] == [True, False, True]
        assert min((c for c in results if c.fits), key=lambda c: c.seconds).peak_bytes == 10  # fastest that fits
        programs = iter([Fake(30, 1.0)] * 3)
        with pytest.raises(ValueError, match="no mesh over the 1 devices fits: the smallest peak"):
            mesh_choice.choose_mesh(devices, heads=1, batch=1, compile_chunk=lambda mesh: next(programs), limit=15)
    finally:
        mesh_choice.candidate_sizes = original


def test_collective_bytes_reads_result_shapes_of_collectives():
    hlo = ("%ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %p), dimensions={0}\n"
           "%ar = (f32[4]{0}, f32[2,2]{1,0}) all-reduce-start(%a, %b), to_apply=%sum\n"
           "%add = f32[1000]{0} add(%x, %y)\n")
    assert mesh_choice.collective_bytes(hlo) == 8 * 128 * 2 + 4 * 4 + 4 * 4
