"""EK-FAC influence (kronfluence) as a method of the harness: the strongest influence-function opponent.

Influence functions with an eigenvalue-corrected Kronecker-factored (EK-FAC) approximation of the
Gauss-Newton Hessian (Grosse et al., 2023), computed by ``kronfluence`` with its own defaults (factor and
score arguments untouched; nothing tuned on the ground truth), on the attributed model (the final
checkpoint: influence functions explain the trained weights, not a trajectory of checkpoints).

What it differentiates is the same as TRAK's, so that only the estimator differs:

- a training example is its denoising loss at the featurizer's own ``(timestep, noise)`` draws
  (:func:`diffusion_trak.featurize.featurizer.example_draws`, a function of ``(seed, index)``), one row per
  draw; an example's score is the mean over its rows;
- a target at step ``s`` is the loss of ``x̂0_s`` re-noised to ``t_s`` with TRAK's ``R`` target noises
  (:func:`diffusion_trak.targets.target_noises`), and the destination the final image's loss over TRAK's
  destination draws (:func:`diffusion_trak.targets.destination_draws`); a target's score is the mean over
  its rows.

For the true Fisher (kronfluence's default) the training loss is evaluated with targets sampled from the
model's predictive distribution: the per-pixel mean squared error is the negative log-likelihood of a
Gaussian of variance ``d/2`` (``d`` values per image) around the prediction, so the sampled target is
``ε̂ + sqrt(d/2) ξ`` and the Fisher equals the loss's Gauss-Newton matrix.

Scores carry TRAK's sign: kronfluence's pairwise score is ``∇f_qᵀ (G + λI)⁻¹ ∇L_i``, positive when
up-weighting example ``i`` lowers the target's loss (a proponent). ``pip install "diffusion-trak[ekfac]"``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from diffusion_trak.errors import UserError


class EKFACMissing(UserError, ImportError):
    """kronfluence is not installed (one line naming the extra)."""


def _kronfluence():
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task
    except ImportError:
        raise EKFACMissing('the ekfac method needs kronfluence: pip install "diffusion-trak[ekfac]"') from None
    return Analyzer, prepare_model, Task


class _Rows(torch.utils.data.Dataset):
    """Rows ``(x0, t, noise)`` plus per-row conditioning tensors, as dicts for kronfluence's loaders."""

    def __init__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Optional[dict] = None):
        self.x0, self.t, self.noise = x0.float(), t.long(), noise.float()
        self.cond = {k: v for k, v in (cond or {}).items()}
        if not (len(self.x0) == len(self.t) == len(self.noise)):
            raise ValueError("rows of x0, timesteps and noises differ in number")

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> dict:
        row = {"x0": self.x0[i], "t": self.t[i], "noise": self.noise[i]}
        row.update({k: v[i] for k, v in self.cond.items()})
        return row


def _task(scheduler, seed: int):
    """The kronfluence ``Task`` of the denoising loss (``diffusion_trak.outputs``: one loss, one target rule)."""
    _, _, Task = _kronfluence()
    from diffusion_trak.outputs import add_noise, model_prediction, regression_target

    class DenoisingTask(Task):
        def __init__(self):
            self.g = None

        def _pred(self, batch, model):
            cond = {k: v for k, v in batch.items() if k not in ("x0", "t", "noise")}
            x_t = add_noise(scheduler, batch["x0"], batch["t"], batch["noise"])
            return model_prediction(model, x_t, batch["t"], cond or None), \
                regression_target(scheduler, batch["x0"], batch["t"], batch["noise"])

        def compute_train_loss(self, batch, model, sample: bool = False):
            pred, target = self._pred(batch, model)
            if sample:  # a draw of the Gaussian whose negative log-likelihood is the per-pixel mean squared error
                if self.g is None or self.g.device != pred.device:
                    self.g = torch.Generator(device=pred.device).manual_seed(seed)
                d = pred[0].numel()
                with torch.no_grad():
                    target = pred.detach() + (d / 2) ** 0.5 * torch.randn(pred.shape, generator=self.g,
                                                                          device=pred.device, dtype=pred.dtype)
            return ((pred - target) ** 2).reshape(len(pred), -1).mean(1).sum()

        def compute_measurement(self, batch, model):
            pred, target = self._pred(batch, model)
            return ((pred - target) ** 2).reshape(len(pred), -1).mean(1).sum()

    return DenoisingTask()


def train_rows(dataset, featurize_args, num_train_timesteps: int, cond_rows: Optional[dict] = None) -> _Rows:
    """The featurizer's ``T`` draws of every training example, one row each (example-major: row ``i·T + j``)."""
    from diffusion_trak.featurize.featurizer import example_draws

    x = dataset.images.float()
    T = featurize_args.num_timesteps
    ts, ns = zip(*(example_draws(int(i), featurize_args, num_train_timesteps, x.shape[1:])
                   for i in dataset.indices.tolist()))
    cond = {k: v.repeat_interleave(T, dim=0) for k, v in (cond_rows or {}).items()}
    return _Rows(x.repeat_interleave(T, dim=0), torch.cat(ts), torch.cat(ns), cond)


def step_rows(targets, R: int, seed: int, num_train_timesteps: int, cond: Optional[dict] = None) -> _Rows:
    """TRAK's per-step target rows of a :class:`~diffusion_trak.targets.TargetSet`: ``S·B·R`` rows (step-major,
    then target, then noise), the noises of :func:`~diffusion_trak.targets.target_noises`."""
    from diffusion_trak.targets import _step_rows

    S, B = targets.x0_by_step.shape[:2]
    x0, ts, noises, c = _step_rows(targets.x0_by_step, targets.timesteps, targets.keys, R, seed, cond,
                                   num_train_timesteps)
    rep = lambda v: v.repeat_interleave(R, dim=0)  # noqa: E731
    return _Rows(rep(x0), ts.reshape(-1), noises.reshape(S * B * R, *noises.shape[2:]),
                 {k: rep(v) for k, v in c.items()})


def destination_rows(images: torch.Tensor, D: int, seed: int, num_train_timesteps: int,
                     cond: Optional[dict] = None) -> _Rows:
    """TRAK's destination rows of final images ``(B, C, H, W)``: ``B·D`` rows (target-major)."""
    from diffusion_trak.targets import _destination_rows

    ts, noises = _destination_rows(images, D, seed, num_train_timesteps)
    rep = lambda v: v.repeat_interleave(D, dim=0)  # noqa: E731
    return _Rows(rep(images.float()), ts.reshape(-1), noises.reshape(-1, *noises.shape[2:]),
                 {k: rep(v) for k, v in (cond or {}).items()})


def ekfac_scores(unet, scheduler, train: _Rows, rows_per_example: int, queries: Dict[str, _Rows],
                 rows_per_query: Dict[str, int], out_dir: Optional[str] = None, batch_size: int = 64,
                 seed: int = 0, device="cpu", progress: bool = False) -> Dict[str, np.ndarray]:
    """``{name: (Q, N)}`` EK-FAC influence of each training example (``rows_per_example`` consecutive rows of
    ``train``) on each query (``rows_per_query[name]`` consecutive rows of ``queries[name]``), TRAK's sign.

    The factors are fitted once on ``train`` (kronfluence's defaults: EK-FAC, the true Fisher) and kept in
    ``out_dir`` (a temporary folder without one)."""
    Analyzer, prepare_model, _ = _kronfluence()
    import copy
    import logging

    for name in ("kronfluence", "accelerate"):  # their INFO lines would bury the harness's own
        logging.getLogger(name).setLevel(logging.WARNING)
    task = _task(scheduler, seed)
    model = prepare_model(copy.deepcopy(unet).to(device).eval(), task)  # kronfluence wraps modules in place
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory()
        out_dir = tmp.name
    try:
        analyzer = Analyzer(analysis_name="ekfac", model=model, task=task, output_dir=out_dir,
                            disable_tqdm=not progress, cpu=str(device) == "cpu", disable_model_save=True)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=batch_size,
                                 overwrite_output_dir=False)
        res = {}
        for name, q in queries.items():
            analyzer.compute_pairwise_scores(scores_name=f"scores_{name}", factors_name="ekfac", query_dataset=q,
                                             train_dataset=train, per_device_query_batch_size=batch_size,
                                             per_device_train_batch_size=batch_size, overwrite_output_dir=True)
            s = analyzer.load_pairwise_scores(f"scores_{name}")["all_modules"].float().cpu().numpy()
            r, k = rows_per_query[name], rows_per_example
            res[name] = s.reshape(s.shape[0] // r, r, s.shape[1] // k, k).mean(axis=(1, 3))
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


def harness_scores(unet, scheduler, train_set, featurize_args, score_args, target_sets: Dict[str, object],
                   destinations: Optional[Dict[str, torch.Tensor]], out_dir: str, device="cpu",
                   progress: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
    """The harness's EK-FAC scores: ``{"steps": {set: (S, B, N)}, "destination": {set: (1, B, N)}}`` for
    unconditional pixel models (``target_sets``: ``{set: TargetSet}``; ``destinations``: ``{set: final images}``
    or None)."""
    T = int(scheduler.config.num_train_timesteps)
    train = train_rows(train_set, featurize_args, T)
    R, D = score_args.num_noises, score_args.destination_draws
    queries, per = {}, {}
    for sname, ts in target_sets.items():
        queries[f"steps-{sname}"], per[f"steps-{sname}"] = step_rows(ts, R, score_args.seed, T), R
    for sname, images in (destinations or {}).items():
        queries[f"dest-{sname}"], per[f"dest-{sname}"] = destination_rows(images, D, score_args.seed, T), D
    s = ekfac_scores(unet, scheduler, train, featurize_args.num_timesteps, queries, per,
                     os.path.join(out_dir, "kronfluence"), seed=featurize_args.seed, device=device, progress=progress)
    steps = {sname: s[f"steps-{sname}"].reshape(len(ts.steps), ts.num_targets, -1)
             for sname, ts in target_sets.items()}
    dest = {sname: s[f"dest-{sname}"][None] for sname in (destinations or {})}
    return {"steps": steps, "destination": dest}
