"""Command-line arguments of the benchmark runner, shared by ``python -m diffusion_trak.evaluations.run`` and
``diffusion-trak evaluate``. Free of heavy imports, so building the main CLI's parser stays fast."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="a benchmark config named in evaluations/configs.py (an unknown "
                                  "name lists them), or a config.json file")
    p.add_argument("--out", required=True, help="run folder (rerunning the same command resumes it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run of another config in --out")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the config's)")
    p.add_argument("--no-audit", action="store_true", help="skip the retrain-without-top-k audit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config setting, e.g. --set lds_mode=masked --set num_replicates=16 "
                        "--set train.epochs=20 (repeatable; the run folder records the result)")
    return p
