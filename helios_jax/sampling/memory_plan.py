"""Where the pipeline's components live during a generate (device memory per chip is the limit).

- `resident`: transformer, VAE and text encoder all stay on the device (the fastest: nothing moves).
- `offload_text_encoder`: the text encoder waits in host memory and comes to the device only to
  encode prompts (once per video; the negative prompt is cached); the chunks run without it.
- `sequential`: as above, and while it encodes the transformer and VAE wait in host memory, so
  only one large component is on the device at a time (one 16 GiB chip: the int8 14B, then the
  text encoder). Costs one host round trip of the transformer's weights per encode.

`auto` picks the first that fits by the parameters' bytes per device and, when known, the chunk
program's compiled peak; where the device reports no limit (CPU) it stays `resident`.
"""
from __future__ import annotations

import contextlib

PLANS = ("auto", "resident", "offload_text_encoder", "sequential")
HEADROOM = 0.9  # of the device's limit: the allocator's fragmentation and small buffers


def check_plan(plan: str, flag: str = "--memory-plan") -> str:
    if plan not in PLANS:
        raise ValueError(f"{flag} must be one of {', '.join(PLANS)}; got {plan!r}")
    return plan


def choose_plan(limit: float | None, *, transformer_bytes: float, vae_bytes: float, text_bytes: float,
                chunk_temporaries: float = 0.0) -> str:
    """The first plan whose largest phase fits `limit` bytes per device (None: no limit known)."""
    if limit is None:
        return "resident"
    budget = HEADROOM * limit
    if transformer_bytes + vae_bytes + text_bytes + chunk_temporaries <= budget:
        return "resident"
    if transformer_bytes + vae_bytes + text_bytes <= budget:
        return "offload_text_encoder"
    return "sequential"


@contextlib.contextmanager
def encoding(plan: str, text_encoder, others=()):
    """The text encoder on the device for the body; before and after, where the plan keeps it."""
    from helios_jax import offload

    if plan == "resident":
        yield
        return
    if plan == "sequential":
        for module in others:
            offload.to_host(module)
    offload.to_device(text_encoder)
    try:
        yield
    finally:
        offload.to_host(text_encoder)
        if plan == "sequential":
            for module in others:
                offload.to_device(module)
