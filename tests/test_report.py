import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_trak.report import (
    format_score,
    image_grid_png,
    plot_attribution,
    plot_lines,
    to_uint8,
)

S, K = 3, 4


@pytest.fixture
def attr():
    g = torch.Generator().manual_seed(0)
    return dict(
        query_images=torch.rand(S, 1, 8, 8, generator=g) * 2 - 1,
        step_labels=[f"step {10 * s} · t={999 - 300 * s}" for s in range(S)],
        top_images=torch.rand(S, K, 1, 8, 8, generator=g) * 2 - 1,
        top_scores=torch.rand(S, K, generator=g) * 0.02,
        top_indices=torch.arange(S * K).reshape(S, K) + 100,
        bottom_images=torch.rand(S, K, 1, 8, 8, generator=g) * 2 - 1,
        bottom_scores=-torch.rand(S, K, generator=g) * 0.01,
        bottom_indices=torch.arange(S * K).reshape(S, K) + 500,
    )


def _check_png(path, min_w=100, min_h=100):
    with Image.open(path) as im:
        assert im.format == "PNG"
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert a.shape[1] >= min_w and a.shape[0] >= min_h
    assert a.std() > 0
    return a


def test_to_uint8():
    x = torch.tensor([[[-1.0, 0.0], [1.0, 2.0]]])  # (1,2,2)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (2, 2, 1)
    assert u[..., 0].tolist() == [[0, 128], [255, 255]]
    b = to_uint8(np.zeros((5, 3, 4, 6), np.float32))
    assert b.shape == (5, 4, 6, 3)
    assert format_score(0.0123) == "+1.2e-02" and format_score(-3e-5) == "-3.0e-05"


def test_plot_attribution(tmp_path, attr):
    out = plot_attribution(tmp_path / "sub" / "a.png", **attr, title="demo")
    a = _check_png(out, 600, 300)
    only_top = {k: v for k, v in attr.items() if not k.startswith("bottom")}
    out2 = plot_attribution(tmp_path / "b.png", **only_top)
    b = _check_png(out2, 300, 300)
    assert b.shape[1] < a.shape[1]  # figure width scales with the number of columns
    # rgb inputs, single step
    rgb = dict(only_top)
    rgb["query_images"] = torch.rand(1, 3, 16, 16) * 2 - 1
    rgb["top_images"] = torch.rand(1, 2, 3, 16, 16) * 2 - 1
    rgb["top_scores"] = np.array([[0.5, -0.1]])
    rgb["top_indices"] = [[1, 2]]
    rgb["step_labels"] = ["t=0"]
    _check_png(plot_attribution(tmp_path / "c.png", **rgb), 100, 100)


def test_plot_attribution_shape_errors(tmp_path, attr):
    bad = dict(attr, step_labels=["only one"])
    with pytest.raises(ValueError):
        plot_attribution(tmp_path / "x.png", **bad)
    bad = dict(attr, top_scores=torch.zeros(S, K + 1))
    with pytest.raises(ValueError):
        plot_attribution(tmp_path / "x.png", **bad)


def test_image_grid(tmp_path):
    rows = [torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(5, 1, 8, 8) * 2 - 1]
    out = image_grid_png(tmp_path / "g.png", rows, ["regenerated", "original", "random"],
                         col_labels=[f"seed {i}" for i in range(5)], title="audit")
    _check_png(out, 400, 250)
    with pytest.raises(ValueError):
        image_grid_png(tmp_path / "g2.png", rows, ["one label"])


def test_plot_lines(tmp_path):
    x = np.arange(8)
    m = np.linspace(0.0, 0.5, 8)
    out = plot_lines(
        tmp_path / "l.png",
        x,
        {"journey-TRAK": (m, m - 0.1, m + 0.1), "baseline": (np.zeros(8), None, None), "raw": m / 2},
        xlabel="step",
        ylabel="LDS",
        title="LDS vs step",
    )
    _check_png(out, 300, 200)
