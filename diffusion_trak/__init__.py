"""diffusion-trak: per-step training-data attribution (journey-TRAK) for diffusers models."""
import os as _os

# OpenMP threads that spin while waiting make torch 20-50× slower on CPU as soon as another process
# competes for the cores (measured: 8.4 s vs 0.21 s per training step of the demo UNet on 2 busy cores).
# Passive waiting costs nothing measurable when the machine is idle. Set before torch is imported;
# an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
