import pytest
import torch

from diffusion_trak.featurize.gradients import num_parameters, per_sample_gradients, use_vmap_friendly_attention
from diffusion_trak.outputs import output_value


def _loop_gradients(model, scheduler, x0, timesteps, noises, output="loss", cond=None, cond_per_timestep=False):
    """Per-example gradients the slow, obvious way: one autograd.grad per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    B, T = timesteps.shape
    for i in range(B):
        xs = x0[i:i + 1].expand(T, *x0.shape[1:])
        c = {k: (v[i] if cond_per_timestep else v[i:i + 1].expand(T, *v.shape[1:])) for k, v in (cond or {}).items()}
        loss = output_value(model, scheduler, xs, timesteps[i], noises[i], output, c).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _draws(B, T, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, *shape, generator=g) * 2 - 1, torch.randint(0, 1000, (B, T), generator=g),
            torch.randn(B, T, *shape, generator=g))


@pytest.mark.parametrize("output", ["loss", "sqnorm"])
def test_vmap_gradients_equal_per_example_loop(tiny_unet, scheduler, output):
    model = tiny_unet.eval()
    use_vmap_friendly_attention(model)
    x0, ts, ns = _draws(3, 2, (1, 8, 8))
    got = per_sample_gradients(model, scheduler, x0, ts, ns, output)
    want = _loop_gradients(model, scheduler, x0, ts, ns, output)
    assert got.shape == (3, num_parameters(model))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # and they differ between examples (the test would pass trivially if they did not)
    assert (got[0] - got[1]).norm() > 0.1 * got[0].norm()


def test_vmap_gradients_with_class_labels(scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=3).eval()
    use_vmap_friendly_attention(model)
    x0, ts, ns = _draws(2, 3, (1, 8, 8), seed=1)
    cond = {"class_labels": torch.tensor([2, 0])}
    got = per_sample_gradients(model, scheduler, x0, ts, ns, "loss", cond)
    want = _loop_gradients(model, scheduler, x0, ts, ns, "loss", cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradient_is_of_the_mean_over_timesteps(tiny_unet, scheduler):
    """Two identical (t, noise) pairs give the same gradient as one: a mean, not a sum."""
    model = tiny_unet.eval()
    use_vmap_friendly_attention(model)
    x0, ts, ns = _draws(2, 1, (1, 8, 8), seed=2)
    one = per_sample_gradients(model, scheduler, x0, ts, ns)
    two = per_sample_gradients(model, scheduler, x0, ts.repeat(1, 2), ns.repeat(1, 2, 1, 1, 1))
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)
