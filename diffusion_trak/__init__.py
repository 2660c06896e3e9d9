"""diffusion-trak: per-step training-data attribution (journey-TRAK) for diffusers models."""
import os as _os

# OpenMP threads that spin while waiting make torch 20-50× slower on CPU as soon as another process
# competes for the cores (measured: 8.4 s vs 0.21 s per training step of the demo UNet on 2 busy cores).
# Passive waiting costs nothing measurable when the machine is idle. Set before torch is imported;
# an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# pipelines/ and evaluations/ are top-level folders of the repository, installed as diffusion_trak.pipelines
# and diffusion_trak.evaluations (pyproject's package-dir). In a source checkout that is not the installed one
# (a second git worktree, or PYTHONPATH=. without an install), find them beside this package.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(_root, "pipelines", "__init__.py")):
    __path__.append(_root)  # noqa: F821 (the package's own search path)
del _root


def __getattr__(name):  # the one object, imported on first use (torch is imported after the setting above)
    if name == "Attributor":
        from .attributor import Attributor
        return Attributor
    if name == "Conditioning":
        from .models import Conditioning
        return Conditioning
    raise AttributeError(f"module 'diffusion_trak' has no attribute {name!r}")
