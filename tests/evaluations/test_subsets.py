import numpy as np
import pytest

from diffusion_trak.evaluations.subsets import model_seed, subset_masks, subset_size


@pytest.mark.parametrize("n,alpha", [(10, 0.5), (11, 0.5), (100, 0.3), (7, 1.0)])
def test_mask_sizes(n, alpha):
    masks = subset_masks(n, 6, alpha, seed=0)
    assert masks.shape == (6, n) and masks.dtype == bool
    assert (masks.sum(1) == subset_size(n, alpha)).all()
    assert subset_size(n, alpha) == min(n, max(1, round(alpha * n)))


def test_masks_reproducible_and_extendable():
    a = subset_masks(50, 8, 0.5, seed=3)
    np.testing.assert_array_equal(a, subset_masks(50, 8, 0.5, seed=3))
    np.testing.assert_array_equal(a, subset_masks(50, 12, 0.5, seed=3)[:8])  # more models keep the first rows
    assert not np.array_equal(a, subset_masks(50, 8, 0.5, seed=4))
    assert len({r.tobytes() for r in a}) == 8  # rows differ


def test_bad_arguments():
    with pytest.raises(ValueError):
        subset_masks(10, 2, 0.0)
    with pytest.raises(ValueError):
        subset_masks(0, 2, 0.5)
    with pytest.raises(ValueError):
        subset_masks(10, 0, 0.5)


def test_model_seeds():
    assert model_seed(7, 0, "shared") == model_seed(7, 5, "shared") == 7
    seeds = [model_seed(7, m) for m in range(20)]
    assert len(set(seeds)) == 20 and seeds == [model_seed(7, m) for m in range(20)]
    with pytest.raises(ValueError):
        model_seed(0, 0, "other")
