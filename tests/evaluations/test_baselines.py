import numpy as np
import torch

from diffusion_trak.evaluations.baselines import (embedding_distance, embedding_similarity, gradient_similarity, pixel_similarity,
                                   random_scores, train_encoder)


def test_pixel_similarity_ranks_the_image_itself_first():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    q = train[[3, 7]] + 0.01
    for kind in ("neg_l2", "cosine"):
        assert pixel_similarity(q, train, kind).argmax(1).tolist() == [3, 7]


def test_gradient_similarity():
    rng = np.random.default_rng(0)
    phis = [rng.standard_normal((5, 4)) for _ in range(2)]
    psis = [rng.standard_normal((3, 4)) for _ in range(2)]
    np.testing.assert_allclose(gradient_similarity(phis, psis, "dot"), (psis[0] @ phis[0].T + psis[1] @ phis[1].T) / 2)
    cos = gradient_similarity(phis, psis, "cosine")
    assert cos.shape == (3, 5) and np.abs(cos).max() <= 1 + 1e-9


def test_random_scores_reproducible():
    np.testing.assert_array_equal(random_scores(2, 10, 1), random_scores(2, 10, 1))
    assert not np.array_equal(random_scores(2, 10, 1), random_scores(2, 10, 2))


def test_encoder_trains_saves_and_embeds(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    path = str(tmp_path / "enc.pt")
    enc = train_encoder(imgs, epochs=2, batch_size=16, dim=8, path=path)
    again = train_encoder(imgs, epochs=2, batch_size=16, dim=8, path=path)  # loaded, not retrained
    np.testing.assert_allclose(enc.embed(imgs), again.embed(imgs), rtol=1e-6)
    assert enc.embed(imgs).shape == (32, 8)
    s = embedding_similarity(enc, imgs[:4], imgs)
    assert s.shape == (4, 32) and s.argmax(1).tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(embedding_distance(enc, imgs[:3], imgs[:3]), 0, atol=1e-6)
