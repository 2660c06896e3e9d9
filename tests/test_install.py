"""The install puts one top-level package into site-packages: ``pipelines/`` and ``evaluations/`` are
installed as ``diffusion_trak.pipelines`` and ``diffusion_trak.evaluations`` (issue 18)."""
import importlib.metadata
import subprocess
import sys


def test_one_top_level_package():
    top = importlib.metadata.distribution("diffusion-trak").read_text("top_level.txt")
    assert top.split() == ["diffusion_trak"]


def test_namespaced_subpackages_import_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, diffusion_trak.pipelines as p, diffusion_trak.evaluations.configs as c;"
            "print(u.find_spec('pipelines') is None, u.find_spec('evaluations') is None, hasattr(p, 'TrajectoryPipeline'),"
            " 'digits-quick' in c.CONFIGS)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True", "True"]
