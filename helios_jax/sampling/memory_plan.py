"""Where the pipeline's components live during a generate (device memory per chip is the limit).

- `resident`: transformer, VAE and text encoder all stay on the device (the fastest: nothing moves).
- `offload_text_encoder`: the text encoder waits in host memory and comes to the device only to
  encode prompts (once per video; the negative prompt is cached); the chunks run without it.
- `sequential`: as above, and while it encodes the transformer and VAE wait in host memory, so
  the text encoder is alone on the device (one 16 GiB chip: the 14B's weights, then the text
  encoder). Costs one host round trip of the transformer's weights per encode.
- `one_at_a_time`: each large component alone on the device: the text encoder while it encodes,
  the VAE while it encodes an I2V/V2V input, the transformer while it denoises every chunk, then
  the VAE while it decodes them all. The frames come after the last chunk is denoised, not chunk
  by chunk. Costs the same transformer round trip per video as `sequential` (one 16 GiB v5e chip
  with the int8 14B: the VAE decode's temporaries do not fit beside the transformer).

`auto` picks the first that fits by the parameters' bytes per device and, when known, the chunk
program's and VAE decode's compiled temporaries; where the device reports no limit (CPU) it stays
`resident`.
"""
from __future__ import annotations

import contextlib

PLANS = ("auto", "resident", "offload_text_encoder", "sequential", "one_at_a_time")
HEADROOM = 0.9  # of the device's limit: the allocator's fragmentation and small buffers


def check_plan(plan: str, flag: str = "--memory-plan") -> str:
    if plan not in PLANS:
        raise ValueError(f"{flag} must be one of {', '.join(PLANS)}; got {plan!r}")
    return plan


def choose_plan(limit: float | None, *, transformer_bytes: float, vae_bytes: float, text_bytes: float,
                chunk_temporaries: float = 0.0, decode_temporaries: float = 0.0) -> str:
    """The first plan whose largest phase fits `limit` bytes per device (None: no limit known)."""
    if limit is None:
        return "resident"
    budget = HEADROOM * limit
    beside = transformer_bytes + vae_bytes + max(chunk_temporaries, decode_temporaries)
    if beside + text_bytes <= budget:
        return "resident"
    if beside <= budget and transformer_bytes + vae_bytes + text_bytes <= budget:
        return "offload_text_encoder"
    if beside <= budget:
        return "sequential"
    return "one_at_a_time"


def alone_on_device(plan: str, module, others=()) -> None:
    """`one_at_a_time`: `module` on the device and `others` in host memory (other plans: nothing moves)."""
    from helios_jax import offload

    if plan != "one_at_a_time":
        return
    for other in others:
        offload.to_host(other)
    offload.to_device(module)


@contextlib.contextmanager
def encoding(plan: str, text_encoder, others=()):
    """The text encoder on the device for the body; before and after, where the plan keeps it.
    `sequential` / `one_at_a_time`: `others` wait in host memory meanwhile, then return to where they were."""
    from helios_jax import offload

    if plan == "resident":
        yield
        return
    moved = [m for m in others if not offload.on_host(m)] if plan in ("sequential", "one_at_a_time") else []
    for module in moved:
        offload.to_host(module)
    offload.to_device(text_encoder)
    try:
        yield
    finally:
        offload.to_host(text_encoder)
        for module in moved:
            offload.to_device(module)
