"""Training metrics: model FLOPs utilisation and the JSON-lines log in the workdir."""
from __future__ import annotations

import json

from etils import epath

from helios_jax.distributed import is_main_process, log

# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("v6", 918e12),       # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5", 459e12),
    ("v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops(device) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPU)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    return next((peak for key, peak in PEAK_FLOPS if key.lower() in kind.lower()), None)


class MetricsLog:
    """`metrics.jsonl` in the workdir, one record per logged step, written by process 0. On resume
    the records after the restored step are dropped, so the file reads as one uninterrupted run.
    A local file is appended to; a bucket object (gs://...), which cannot be appended to, is
    rewritten whole at each write (records are ~200 bytes, written every log_every steps)."""

    def __init__(self, workdir, resumed_step: int):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = "://" in str(workdir)
        self.lines = []
        if not is_main_process():
            return
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resumed_step:
                    self.lines.append(line)
        self.path.write_text("".join(line + "\n" for line in self.lines))

    def write(self, record: dict) -> None:
        if not is_main_process():
            return
        line = json.dumps(record)
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(line + "\n" for line in self.lines))
        else:
            with self.path.open("a") as file:
                file.write(line + "\n")
        shown = "  ".join(f"{k}={_short(v)}" for k, v in record.items())
        log(f"train: {shown}")


def _short(value):
    return f"{value:.5g}" if isinstance(value, float) else value
