"""Retrain models on subsets of the training set: one after another, or many at once (stacked).

Every model is trained with the attributed model's recipe (the same :class:`TrainArgs`, only the
seed may differ) and saved in :func:`diffusion_trak.train.train_ddpm`'s run-folder format
(``ckpt-XXXX/{unet,scheduler,train_state.pt,done}`` + ``train_args.json``), so either trainer can
resume the other's runs and :func:`~diffusion_trak.train.load_checkpoint` loads both.

Three ways to train the ``M`` models of a harness (:func:`train_models`):

- ``sequential``: :func:`~diffusion_trak.train.train_ddpm` per model (CPU default);
- ``stacked``: :class:`StackedTrainer`: the parameters of up to ``stack_size`` models are stacked
  (``torch.func.stack_module_state``), one ``vmap``-ed ``functional_call`` runs every model on its
  own batch, and a single AdamW steps all of them (Adam is element-wise, so a stacked tensor is
  stepped exactly as its slices would be). Gradient clipping is done per model. On a GPU this is
  many times faster than one model at a time for small models (GPU default);
- on several processes (``accelerate launch``), process ``p`` of ``P`` trains the models
  ``m`` with ``m % P == p`` (stacked, because ``train_ddpm`` would wrap a single model in DDP).

Equality with sequential training: both trainers draw each epoch's shuffling, timesteps and noises
with :func:`diffusion_trak.train.epoch_batches`, the function ``train_ddpm`` draws with (generator seeded by
``(seed, epoch)``; permutation, then per step the timesteps and the noise), and both use the same
initialisation, learning-rate schedule, AdamW and clipping. The tests check that the two give the
same weights within float tolerance. (Only attention differs: under ``vmap`` the classic
attention processor replaces SDPA, equal up to float error.)
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import replace
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from diffusion_trak.config import TrainArgs
from diffusion_trak.featurize.gradients import use_vmap_friendly_attention
from diffusion_trak.outputs import output_value
from diffusion_trak.train import (build_scheduler, build_unet, check_run_meta, checkpoint_epochs, epoch_batches,
                                  list_checkpoints, load_train_state, lr_lambda, run_meta, train_ddpm)


METHODS = ("auto", "sequential", "stacked")


def _last_epoch(run_dir: str) -> int:
    done = list_checkpoints(run_dir)
    return int(os.path.basename(done[-1]).split("-")[1]) if done else 0


def is_finished(run_dir: str, args: TrainArgs) -> bool:
    return _last_epoch(run_dir) >= args.epochs


# ----------------------------------------------------------------------------------------------
# Stacked training
# ----------------------------------------------------------------------------------------------


class _Bound:
    def __init__(self, model, tensors):
        self.model, self.tensors = model, tensors

    def __call__(self, *a, **kw):
        return functional_call(self.model, self.tensors, a, kw)


class StackedTrainer:
    """Train several models with the same recipe and equal-sized training sets at once.

    Args:
        dataset: the full :class:`~diffusion_trak.data.ImageDataset`.
        positions: one array of dataset positions per model (all of the same length unless ``masked``).
        seeds: one training seed per model (``TrainArgs.seed`` of that model's run).
        args: the shared recipe (its ``seed`` is replaced per model).
        run_dirs: one ``train_ddpm``-format run folder per model.
        masked: instead of training on ``dataset.subset(positions)`` (reshuffled), replay the
            *full-dataset* run of that seed (same permutation, timesteps and noises, same number of
            steps) with the examples outside ``positions`` given weight 0: each batch's loss is the
            mean over its kept examples. With all positions kept this is ``train_ddpm`` on the full
            dataset. It is the "same training run minus these examples" counterfactual, which holds
            the training randomness fixed (used by the retrain-without-top-k audit).
    """

    def __init__(self, dataset, positions: Sequence[np.ndarray], seeds: Sequence[int], args: TrainArgs,
                 run_dirs: Sequence[str], device="cpu", masked: bool = False):
        if not (len(positions) == len(seeds) == len(run_dirs)) or not positions:
            raise ValueError("give one positions array, seed and run folder per model")
        sizes = {len(p) for p in positions}
        if len(sizes) != 1 and not masked:
            raise ValueError(f"stacked training needs equal-sized training sets, got sizes {sorted(sizes)}")
        self.masked = bool(masked)
        self.n = len(dataset) if masked else sizes.pop()
        self.weights = None
        if masked:
            w = torch.zeros(len(positions), len(dataset))
            for m, p in enumerate(positions):
                w[m, torch.as_tensor(np.asarray(p), dtype=torch.long)] = 1.0
            self.weights = w
        self.device = torch.device(device)
        self.args, self.run_dirs = args, list(run_dirs)
        self.seeds = [int(s) for s in seeds]
        self.subsets = [dataset] * len(positions) if masked else [dataset.subset(p) for p in positions]
        self.shape = dataset.image_shape
        self.num_classes = None
        if args.class_conditional:
            if dataset.labels is None:
                raise ValueError("class_conditional training needs a dataset with labels")
            self.num_classes = int(dataset.labels.max()) + 1
            # train_ddpm takes the class count from each subset's own labels; keep them consistent
            for s in ([] if masked else self.subsets):
                if int(s.labels.max()) + 1 != self.num_classes:
                    raise ValueError("a subset lacks the highest class label; use a larger alpha or stacked=False")
        self.M = len(self.subsets)

    def _model_args(self, m: int) -> TrainArgs:
        return replace(self.args, seed=self.seeds[m])

    def _meta(self, m: int) -> dict:
        kept = np.flatnonzero(self.weights[m].numpy()) if self.masked else None
        return model_meta(self.subsets[m], self._model_args(m), kept)

    def train(self, progress: bool = True) -> List[List[str]]:
        """Train (or resume) every model; return each model's checkpoint folders."""
        args = self.args
        for m in range(self.M):
            check_run_meta(self.run_dirs[m], self._meta(m))
        starts = {_last_epoch(d) for d in self.run_dirs}
        if len(starts) != 1:
            # models at different stages: resume each group separately
            out = [None] * self.M
            for e in sorted(starts):
                ms = [m for m in range(self.M) if _last_epoch(self.run_dirs[m]) == e]
                sub = StackedTrainer.__new__(StackedTrainer)
                sub.__dict__.update(self.__dict__)
                sub.subsets = [self.subsets[m] for m in ms]
                sub.seeds = [self.seeds[m] for m in ms]
                sub.run_dirs = [self.run_dirs[m] for m in ms]
                sub.weights = self.weights[ms] if self.masked else None
                sub.M = len(ms)
                for m, r in zip(ms, sub.train(progress)):
                    out[m] = r
            return out
        start_epoch = starts.pop()
        if start_epoch >= args.epochs:
            return [list_checkpoints(d) for d in self.run_dirs]

        models = []
        for m in range(self.M):
            torch.manual_seed(self._model_args(m).initial_seed())
            unet = build_unet(self._model_args(m), self.shape, self.num_classes)
            if start_epoch:
                from diffusers import UNet2DModel
                last = list_checkpoints(self.run_dirs[m])[-1]
                unet.load_state_dict(UNet2DModel.from_pretrained(os.path.join(last, "unet")).state_dict())
            models.append(unet.to(self.device))
        scheduler = build_scheduler(args)
        base = copy.deepcopy(models[0])
        use_vmap_friendly_attention(base)
        params, buffers = stack_module_state(models)
        names = list(params)
        plist = [params[n] for n in names]
        steps_per_epoch = math.ceil(self.n / args.batch_size)
        total = steps_per_epoch * args.epochs
        opt = torch.optim.AdamW(plist, lr=args.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total))
        if start_epoch:
            states = [load_train_state(os.path.join(list_checkpoints(d)[-1], "train_state.pt")) for d in self.run_dirs]
            opt.load_state_dict(_stack_optimizer_states([s["optimizer"] for s in states]))
            sched.load_state_dict(states[0]["lr_scheduler"])

        def loss_one(p, b, x0, t, noise, cond, w):
            per = output_value(_Bound(base, {**p, **b}), scheduler, x0, t, noise, "loss", cond)
            if w is None:
                return per.mean()
            return (per * w).sum() / w.sum().clamp(min=1.0)

        step_fn = vmap(loss_one, in_dims=(0, 0, 0, 0, 0, 0, 0 if self.masked else None))
        saves = checkpoint_epochs(args)
        T = args.num_train_timesteps
        bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=f"train {self.M} stacked",
                   disable=not progress)
        for epoch in range(start_epoch, args.epochs):
            its = [epoch_batches(self.seeds[m], epoch, self.n, args.batch_size, T, self.shape) for m in range(self.M)]
            for _ in range(steps_per_epoch):
                draws = [next(it) for it in its]
                x0 = torch.stack([s.images[d[0]] for s, d in zip(self.subsets, draws)]).to(self.device)
                t = torch.stack([d[1] for d in draws]).to(self.device)
                noise = torch.stack([d[2] for d in draws]).to(self.device)
                cond = ({"class_labels": torch.stack([s.labels[d[0]] for s, d in zip(self.subsets, draws)]).to(self.device)}
                        if self.num_classes else {})
                w = (torch.stack([self.weights[m][d[0]] for m, d in enumerate(draws)]).to(self.device)
                     if self.masked else None)
                losses = step_fn(params, buffers, x0, t, noise, cond, w)
                _stacked_step(losses, plist, opt)
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{losses.mean().item():.4f}", epoch=epoch + 1)
            if (epoch + 1) in saves:
                self._save(epoch + 1, models, names, params, opt, sched, scheduler)
        bar.close()
        return [list_checkpoints(d) for d in self.run_dirs]

    def _save(self, epoch, models, names, params, opt, sched, scheduler):
        state = opt.state_dict()
        for m, unet in enumerate(models):
            with torch.no_grad():
                for n, p in unet.named_parameters():
                    p.copy_(params[n][m])
            ck = os.path.join(self.run_dirs[m], f"ckpt-{epoch:04d}")
            unet.save_pretrained(os.path.join(ck, "unet"))
            scheduler.save_pretrained(os.path.join(ck, "scheduler"))
            torch.save({"optimizer": _unstack_optimizer_state(state, m), "lr_scheduler": sched.state_dict(),
                        "epoch": epoch}, os.path.join(ck, "train_state.pt"))
            open(os.path.join(ck, "done"), "w").close()


def model_meta(train_set, args: TrainArgs, masked_kept: Optional[np.ndarray] = None) -> dict:
    """``train_args.json`` of one retrained model: :func:`~diffusion_trak.train.run_meta` of the set it
    was trained on, plus, for masked training (``train_set`` is then the full dataset), the kept positions."""
    meta = run_meta(train_set, args)
    if masked_kept is not None:
        kept = np.asarray(masked_kept)
        meta["masked"] = {"num_kept": int(kept.size), "kept_sha": _sha(kept)}
    return meta


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(a, dtype="<i8").tobytes()).hexdigest()[:16]


def _stacked_step(losses: torch.Tensor, plist: Sequence[torch.Tensor], opt) -> None:
    """One optimiser step of every stacked model: backward of the summed per-model losses, clipping
    of each model's gradient norm at 1 (as ``train_ddpm``), one element-wise AdamW step for all."""
    grads = torch.autograd.grad(losses.sum(), plist)
    _clip_per_model_(grads, 1.0)
    for p, g in zip(plist, grads):
        p.grad = g
    opt.step()
    opt.zero_grad()


def _clip_per_model_(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each model's slice of the stacked gradients."""
    M = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(M, -1), 2, dim=1) for g in grads])  # (P, M)
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.reshape(M, *([1] * (g.dim() - 1))))


def _unstack_optimizer_state(state: dict, m: int) -> dict:
    out = {"state": {}, "param_groups": copy.deepcopy(state["param_groups"])}
    for i, s in state["state"].items():
        out["state"][i] = {k: (v.clone() if k == "step" else v[m].clone()) for k, v in s.items()}
    return out


def _stack_optimizer_states(states: Sequence[dict]) -> dict:
    out = {"state": {}, "param_groups": copy.deepcopy(states[0]["param_groups"])}
    for i in states[0]["state"]:
        out["state"][i] = {k: (v.clone() if k == "step" else torch.stack([s["state"][i][k] for s in states]))
                           for k, v in states[0]["state"][i].items()}
    return out


# ----------------------------------------------------------------------------------------------
# The harness: M models on masks
# ----------------------------------------------------------------------------------------------


def process_share(num_models: int, process_index: int = 0, num_processes: int = 1) -> List[int]:
    """The models one process trains: ``m % num_processes == process_index``."""
    return [m for m in range(num_models) if m % num_processes == process_index]


def train_models(dataset, args: TrainArgs, masks: np.ndarray, out_dir: str, seeds: Sequence[int],
                 method: str = "auto", stack_size: int = 16, device: Optional[str] = None,
                 progress: bool = True, names: Optional[Sequence[str]] = None,
                 models: Optional[Sequence[int]] = None, masked: bool = False) -> List[str]:
    """Train model ``m`` on ``dataset.subset(np.flatnonzero(masks[m]))`` with seed ``seeds[m]`` into
    ``out_dir/<names[m]>`` (default ``model-XXXX``), skipping finished models; returns every model's
    run folder. Under ``accelerate launch`` with several processes each process trains its share
    (:func:`process_share`) stacked on its own device, then waits for the others.

    ``method``: ``auto`` (stacked on CUDA or several processes, else sequential), ``sequential`` or
    ``stacked``. ``models`` restricts the work to some model numbers. ``masked``: replay the full-dataset
    run with the excluded examples weighted 0 (see :class:`StackedTrainer`; stacked only)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {METHODS}")
    from accelerate import PartialState

    state = PartialState(cpu=(device == "cpu"))
    dev = torch.device(device) if device is not None else state.device
    masks = np.asarray(masks, dtype=bool)
    M = masks.shape[0]
    names = list(names) if names is not None else [f"model-{m:04d}" for m in range(M)]
    run_dirs = [os.path.join(out_dir, nm) for nm in names]
    todo = list(range(M)) if models is None else [int(m) for m in models]
    todo = [m for m in todo if m in set(process_share(M, state.process_index, state.num_processes))]
    for m in todo:  # a finished model is reused only if it was trained on these examples with this recipe
        if is_finished(run_dirs[m], args):
            kept = np.flatnonzero(masks[m])
            check_run_meta(run_dirs[m], model_meta(dataset if masked else dataset.subset(kept),
                                                   replace(args, seed=int(seeds[m])), kept if masked else None),
                           fix="the scores or the subsets changed; delete that folder to retrain it")
    todo = [m for m in todo if not is_finished(run_dirs[m], args)]
    if method == "auto":
        method = "stacked" if (dev.type == "cuda" or state.num_processes > 1 or masked) else "sequential"
    if masked and method != "stacked":
        raise ValueError("masked training is done by the stacked trainer; use method='stacked' or 'auto'")
    if method == "sequential" and state.num_processes > 1:
        raise ValueError("sequential training cannot run under several processes; use method='stacked'")
    if todo:
        if method == "sequential":
            for i, m in enumerate(todo):
                if progress:
                    print(f"[retrain] model {m} ({i + 1}/{len(todo)}) on {int(masks[m].sum())} examples", flush=True)
                train_ddpm(dataset.subset(np.flatnonzero(masks[m])), replace(args, seed=int(seeds[m])),
                           run_dirs[m], progress=progress, device=str(dev) if dev.type == "cpu" else None)
        else:
            # stack models with equal subset sizes together, stack_size at a time
            by_size = {}
            for m in todo:
                by_size.setdefault(0 if masked else int(masks[m].sum()), []).append(m)
            for ms in by_size.values():
                for i in range(0, len(ms), stack_size):
                    grp = ms[i:i + stack_size]
                    if progress:
                        print(f"[retrain] models {grp[0]}..{grp[-1]} ({len(grp)} stacked) on {dev}", flush=True)
                    StackedTrainer(dataset, [np.flatnonzero(masks[m]) for m in grp], [seeds[m] for m in grp], args,
                                   [run_dirs[m] for m in grp], device=dev, masked=masked).train(progress)
    state.wait_for_everyone()
    return run_dirs


def final_checkpoint(run_dir: str, args: TrainArgs) -> str:
    """The checkpoint saved after the last epoch (error naming the fix if training is unfinished)."""
    ck = os.path.join(run_dir, f"ckpt-{args.epochs:04d}")
    if not os.path.exists(os.path.join(ck, "done")):
        raise FileNotFoundError(f"{run_dir} has not finished training; rerun the same command to resume it")
    return ck


# ----------------------------------------------------------------------------------------------
# Speed-up of stacked over one-at-a-time training
# ----------------------------------------------------------------------------------------------


def benchmark_stacked(dataset, args: TrainArgs, positions: Sequence[np.ndarray], seeds: Sequence[int],
                      steps: int = 5, device="cpu", warmup: int = 1) -> dict:
    """Time ``steps`` optimiser steps of (a) one model at a time, exactly as ``train_ddpm``'s inner loop
    does it (plain module, one batch), for every model, and (b) all models stacked; both in this call.

    Returns ``{"models", "sequential_s", "stacked_s", "speedup"}`` with per-step-of-all-models seconds."""
    dev = torch.device(device)
    M = len(positions)
    subsets = [dataset.subset(p) for p in positions]
    n = len(positions[0])
    shape = dataset.image_shape
    T = args.num_train_timesteps
    scheduler = build_scheduler(args)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # (a) one at a time
    seq = 0.0
    for m in range(M):
        torch.manual_seed(replace(args, seed=int(seeds[m])).initial_seed())
        unet = build_unet(args, shape).to(dev)
        opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
        it = epoch_batches(int(seeds[m]), 0, n, args.batch_size, T, shape)
        for s in range(warmup + steps):
            try:
                idx, t, noise, _ = next(it)
            except StopIteration:
                it = epoch_batches(int(seeds[m]), s, n, args.batch_size, T, shape)
                idx, t, noise, _ = next(it)
            sync()
            t0 = time.perf_counter()
            loss = output_value(unet, scheduler, subsets[m].images[idx].to(dev), t.to(dev), noise.to(dev)).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sync()
            if s >= warmup:
                seq += time.perf_counter() - t0
    # (b) stacked
    models = []
    for m in range(M):
        torch.manual_seed(replace(args, seed=int(seeds[m])).initial_seed())
        models.append(build_unet(args, shape).to(dev))
    base = copy.deepcopy(models[0])
    use_vmap_friendly_attention(base)
    params, buffers = stack_module_state(models)
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=args.learning_rate, weight_decay=0.0)

    def loss_one(p, b, x0, t, noise):
        return output_value(_Bound(base, {**p, **b}), scheduler, x0, t, noise).mean()

    step_fn = vmap(loss_one)
    its = [epoch_batches(int(seeds[m]), 0, n, args.batch_size, T, shape) for m in range(M)]
    stk = 0.0
    for s in range(warmup + steps):
        draws = []
        for m in range(M):
            try:
                draws.append(next(its[m]))
            except StopIteration:
                its[m] = epoch_batches(int(seeds[m]), s, n, args.batch_size, T, shape)
                draws.append(next(its[m]))
        x0 = torch.stack([sub.images[d[0]] for sub, d in zip(subsets, draws)]).to(dev)
        t = torch.stack([d[1] for d in draws]).to(dev)
        noise = torch.stack([d[2] for d in draws]).to(dev)
        sync()
        t0 = time.perf_counter()
        losses = step_fn(params, buffers, x0, t, noise)
        _stacked_step(losses, plist, opt)
        sync()
        if s >= warmup:
            stk += time.perf_counter() - t0
    seq /= steps
    stk /= steps
    return {"models": M, "device": str(dev), "sequential_s": seq, "stacked_s": stk, "speedup": seq / stk}
