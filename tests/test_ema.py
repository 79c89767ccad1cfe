"""The EMA against diffusers' EMAModel (the reference's EMA) over a run of updates."""
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.training_utils import EMAModel

from helios_jax.training.ema import ema_decay, ema_init, ema_update


def test_ema_matches_diffusers_ema_model_through_the_start_and_the_ramp():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5,)).astype(np.float32)]
    torch_params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    reference = EMAModel(torch_params, decay=0.99, update_after_step=3)
    ours = ema_init({"a": weights[0], "b": weights[1]})
    for step in range(40):
        new = [w + rng.standard_normal(w.shape).astype(np.float32) for w in weights]
        with torch.no_grad():
            for p, w in zip(torch_params, new):
                p.copy_(torch.from_numpy(w))
        reference.step(torch_params)
        ours = ema_update(ours, {"a": new[0], "b": new[1]}, decay=0.99, update_after_step=3)
        assert float(ema_decay(ours.updates, decay=0.99, update_after_step=3)) == np.float32(reference.cur_decay_value)
        for key, shadow in zip("ab", reference.shadow_params):
            np.testing.assert_allclose(np.asarray(ours.params[key]), shadow.numpy(), rtol=1e-6, atol=1e-6)
    assert int(ours.updates) == 40
    assert float(ema_decay(jnp.int32(4), decay=0.99, update_after_step=3)) == 0.0  # still a plain copy
    assert float(ema_decay(jnp.int32(10_000), decay=0.99, update_after_step=3)) == np.float32(0.99)
