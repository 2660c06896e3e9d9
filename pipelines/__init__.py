"""diffusers pipelines used by diffusion-trak."""

from .trajectory import Trajectory, TrajectoryOutput, TrajectoryPipeline

__all__ = ["Trajectory", "TrajectoryOutput", "TrajectoryPipeline"]
