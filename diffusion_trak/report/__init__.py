"""Pictures of per-step attributions and the journey page of a run.

Inputs are plain tensors / arrays (images in ``[-1, 1]``), independent of the
rest of the pipeline.
"""
from .attribution import plot_from_scores
from .html import png_data_uri, write_page
from .journey import journey_data
from .plots import (
    check_attribution_inputs,
    format_score,
    image_grid_png,
    plot_attribution,
    plot_lines,
    to_uint8,
)

__all__ = [
    "plot_from_scores",
    "plot_attribution",
    "write_page",
    "journey_data",
    "image_grid_png",
    "plot_lines",
    "to_uint8",
    "format_score",
    "png_data_uri",
    "check_attribution_inputs",
]
