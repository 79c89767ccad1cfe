"""GAN heads: the layer stack against torch layers built to the spec's recipe, the spec's
parameter counts at 14B size, and the losses' signs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helios_jax.training import stage3_gan_heads as gan_heads
from helios_jax.training.stage3_gan_heads import Discriminator3DHead, GanHeads


def torch_head(in_channels, dim):
    layers = []
    for kernel, stride, padding in gan_heads._LAYERS:
        layers += [torch.nn.Conv3d(in_channels, dim, kernel, stride, padding), torch.nn.GroupNorm(32, dim), torch.nn.SiLU()]
        in_channels = dim
    return torch.nn.Sequential(*layers), torch.nn.Linear(dim, 1)


def test_head_equals_the_torch_layer_stack():
    torch.manual_seed(0)
    convs, linear = torch_head(8, 64)
    for m in convs:
        if isinstance(m, torch.nn.GroupNorm):  # non-trivial affine
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    ours = Discriminator3DHead(8, 64, rngs=nnx.Rngs(0))
    torch_convs = [m for m in convs if isinstance(m, torch.nn.Conv3d)]
    torch_norms = [m for m in convs if isinstance(m, torch.nn.GroupNorm)]
    for conv, norm, tc, tn in zip(ours.convs, ours.norms, torch_convs, torch_norms):
        conv.kernel[...] = jnp.asarray(tc.weight.detach().numpy().transpose(2, 3, 4, 1, 0))
        conv.bias[...] = jnp.asarray(tc.bias.detach().numpy())
        norm.scale[...] = jnp.asarray(tn.weight.detach().numpy())
        norm.bias[...] = jnp.asarray(tn.bias.detach().numpy())
    ours.logit.kernel[...] = jnp.asarray(linear.weight.detach().numpy().T)
    ours.logit.bias[...] = jnp.asarray(linear.bias.detach().numpy())
    x = np.random.default_rng(0).standard_normal((2, 8, 9, 12, 20)).astype(np.float32)  # [B, C, T, H, W]
    with torch.no_grad():
        expected = linear(convs(torch.from_numpy(x)).mean(dim=(2, 3, 4))).numpy()
    got = np.asarray(nnx.jit(lambda head, x: head(x))(ours, jnp.asarray(x.transpose(0, 2, 3, 4, 1))))  # one compile
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_parameter_counts_at_14b_size():
    """spec §6.3: 218.8M per hooked-block head, 113.0M for the output head, 988.4M in all."""
    heads = nnx.eval_shape(lambda: GanHeads(5120, 16, rngs=nnx.Rngs(0)))
    count = lambda m: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert round(count(heads.blocks[0]) / 1e6, 1) == 218.8
    assert round(count(heads.final) / 1e6, 1) == 113.0
    assert round(count(heads) / 1e6, 1) == 988.4


def test_logits_losses_and_crops():
    heads = GanHeads(32, 16, 32, hooks=(0, 1), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    out = jnp.asarray(rng.standard_normal((2, 9, 8, 8, 16)), jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((2, 9, 4, 4, 32)), jnp.float32) for _ in range(2)]
    logits = nnx.jit(lambda heads, out, feats: heads(out, feats))(heads, out, feats)
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="2 feature maps"):
        heads(out, feats[:1])
    low, high = -5 * jnp.ones((4, 5)), 5 * jnp.ones((4, 5))
    # Low logit = real: a discriminator that scores real low and fake high has a small loss.
    assert gan_heads.discriminator_loss(high, low) < 0.01 * 0.1 < gan_heads.discriminator_loss(low, high)
    assert gan_heads.generator_loss(low) < gan_heads.generator_loss(high)
    assert gan_heads.approximate_r1(low, low) == 0.0 and gan_heads.approximate_r1(low, high) == 100.0 * 100
    x = jnp.arange(2 * 1 * 6 * 8 * 1, dtype=jnp.float32).reshape(2, 1, 6, 8, 1)
    crops = gan_heads.random_crop(jax.random.key(0), x, 3, 4)
    assert crops.shape == (2, 1, 3, 4, 1)
    for b in range(2):  # each crop is a contiguous window of its own sample
        y0, x0 = np.argwhere(np.asarray(x[b, 0, :, :, 0]) == float(crops[b, 0, 0, 0, 0]))[0]
        np.testing.assert_array_equal(crops[b, 0, :, :, 0], x[b, 0, y0:y0 + 3, x0:x0 + 4, 0])
