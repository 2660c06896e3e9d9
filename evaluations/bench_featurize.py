"""Featurization benchmark: the reference recipe against the fast path, in one process.

    python -m diffusion_trak.evaluations.bench_featurize                      # ~1.1M UNet, 16×16, k=2048, T=10 and T=1
    python -m diffusion_trak.evaluations.bench_featurize --cifar              # + DDPM CIFAR-10 UNet (36M, 32×32), ratio only
    python -m diffusion_trak.evaluations.bench_featurize --ops --cifar        # only: torch ops per call at B and 4B examples
    python -m diffusion_trak.evaluations.bench_featurize --fidelity           # + Spearman vs exact-gradient TRAK scores
    python -m diffusion_trak.evaluations.bench_featurize --only-fidelity --checkpoint runs/x/ckpt-0003
    python -m diffusion_trak.evaluations.bench_featurize --lds runs/eval-digits   # LDS: exact vs dense JL vs fast, 3 seeds

Paths, all on the same model, rows, draws and k:

- ``plain``: one batched forward + backward of the summed DDPM loss over the B × T rows (parameter
  gradients, no per-sample work): the practical ceiling.
- ``reference``: :class:`~diffusion_trak.featurize.featurizer.Featurizer` with ``method="vmap"``: per-example
  ``vmap(grad)`` of the mean over T, a ``B × p`` buffer, then one dense Rademacher projection per example
  (fast_jl when usable — CUDA only —, otherwise the torch projector with its ``p × k`` matrix held
  in memory up to ``--cache-limit-gb``; over that limit, which the library refuses, the projection time is
  extrapolated from a slice of the matrix's rows, a lower bound that favours the reference).
- ``fast`` (printed ``default``): the same Featurizer with the library's defaults, ``method="fast"``
  (:mod:`diffusion_trak.featurize.fast`), only ``k`` and the batch given.

The whole flow (training featurization at T ∈ {10, 100}, attributing one trajectory, the demo's stages
with new and old defaults) is in :mod:`evaluations.bench_flow`, which uses the helpers here.

Throughput is in example-timesteps per second (B·T / seconds per batch), the median of ``--repeats``
timed batches after one warm-up batch (the fast path's one-time self-check and the reference matrix
generation happen in the warm-up). A path that runs out of memory (CUDA or CPU) is reported as "out of memory"
and the other paths go on. Peak memory is the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` before each path, freed heap returned with ``malloc_trim``) minus the
resident set before the path's objects were built; on CUDA it is ``torch.cuda.max_memory_allocated``.

Fidelity (``--fidelity``): a small UNet (280k parameters, 8×8 digits; trained here in a minute, or
``--checkpoint``) with ``--fid-train`` training rows and ``--fid-targets`` held-out rows as targets
(features with the same T draws). Exact TRAK scores come from the full per-example gradients in dual
form, ``S = K_qt (K_tt + λI)⁻¹`` with ``K = G Gᵀ`` (equal to the primal ``Ψ(ΦᵀΦ + λI)⁻¹Φᵀ`` by the
push-through identity) and ``λ = ridge·tr(K_tt)/k`` (the λ that the projected scores use, in
expectation). Dense JL (reference) and fast features go through the project's own ``TRAKScorer``.
Reported: Spearman correlation with exact, per target row averaged over targets (and over all pairs),
mean ± sd over ``--fid-seeds`` projection seeds.

LDS (``--lds RUN``): on a finished :mod:`evaluations.run` folder, the LDS of TRAK with exact gradients, with
the dense JL reference and with the fast path's CountSketch, for several projection seeds, on the run's own
targets, subset models and ground truth (see :func:`bench_lds`). The spread between dense seeds is the
yardstick for the difference between dense and fast.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall on busy cores

import argparse
import ctypes
import dataclasses
import gc
import json
import statistics
import sys
import time

import numpy as np
import torch

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs, from_dict
from diffusion_trak.featurize.featurizer import Featurizer, example_draws
from diffusion_trak.featurize.gradients import num_parameters
from diffusion_trak.featurize.projectors import ProjectorError, TorchProjector, make_projector
from diffusion_trak.outputs import output_value
from diffusion_trak.store import free_memory


# --------------------------------------------------------------------------------------------- memory
def _status(key: str) -> int:
    """A /proc/self/status field in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above the resident memory at ``start()``."""

    def __init__(self, device):
        self.device = torch.device(device)

    def start(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _status("VmRSS")
        return self

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


# --------------------------------------------------------------------------------------------- models
def small_unet(channels=1, size=16):
    """~1.1M parameters: block_out_channels (32, 64, 64), attention in the middle down and up blocks."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=None)


def cifar_unet():
    """The DDPM CIFAR-10 configuration (google/ddpm-cifar10-32): 35.7M parameters, 32×32×3."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                       attention_head_dim=None)


def rows_for(B, T, shape, seed=0):
    """Digits images (resized) when they match the shape, otherwise seeded random images; draws per example."""
    C, H, W = shape
    x0 = None
    if C == 1:
        try:
            from diffusion_trak.data import load_dataset

            x0 = load_dataset(name="digits", image_size=H, limit=B).images
        except Exception:  # noqa: BLE001 - any data problem: random images are as good for timing
            x0 = None
    if x0 is None:
        x0 = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    args = FeaturizeArgs(num_timesteps=T, seed=seed)
    draws = [example_draws(i, args, 1000, shape) for i in range(B)]
    return x0, torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])


# --------------------------------------------------------------------------------------------- timing
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def reference_featurizer(model, scheduler, k, device, cache_limit_gb):
    """Featurizer(method=vmap) with fast_jl on CUDA when usable, else the dense torch projector with its matrix
    in memory; ``None`` as the projector when that matrix is over ``cache_limit_gb`` (or 80% of free memory):
    the library refuses it, and the benchmark then times the projection on a slice of its rows."""
    from diffusion_trak.featurize.projectors import MatrixTooLargeError

    fz = Featurizer(model, scheduler, FeaturizeArgs(proj_dim=k, projector="countsketch", method="vmap", batch_size=10 ** 9),
                    device)
    if torch.device(device).type == "cuda":
        try:
            fz.projector = make_projector("fast_jl", fz.num_params, k, 0, device)
            return fz
        except ProjectorError:
            pass
    limit = int(min(cache_limit_gb * 2 ** 30, 0.8 * (free_memory(device) or 0)))
    try:
        fz.projector = TorchProjector(fz.num_params, k, 0, device=device, cache_bytes=limit)
    except MatrixTooLargeError:
        fz.projector = None
    return fz


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or CPU), which the benchmark reports for that path and survives."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _free_after_oom(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def count_ops(fn) -> int:
    """The torch ops ``fn()`` dispatches (every aten call, counted by a ``TorchDispatchMode``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as c:
        fn()
    return c.n


def bench_ops(model, shape, device, cases=((2, 8, 2), (4, 16, 1)), k=2048) -> dict:
    """Ops dispatched per default featurize call for a few examples and for 4× as many, at each ``(B_small, B_large,
    T)`` of ``cases``: on a GPU each op is at least one launch, so ops that grow with the examples leave the device
    waiting on the host."""
    from diffusers import DDPMScheduler

    fz = Featurizer(model, DDPMScheduler(num_train_timesteps=1000), FeaturizeArgs(proj_dim=k), device)
    assert fz.fast is not None, "the library's default must be the fast path"
    big = max(c[1] for c in cases)
    x0, ts, ns = rows_for(big, max(c[2] for c in cases), shape)
    x0, ts, ns = x0.to(device), ts.to(device), ns.to(device)
    fz.features(x0[:1], ts[:1, :1], ns[:1, :1])  # the one-time probe row and self-check
    out = {"p": num_parameters(model), "k": k, "cases": []}
    for small, large, T in cases:
        n = [count_ops(lambda B=B: fz.features(x0[:B], ts[:B, :T], ns[:B, :T])) for B in (small, large)]
        out["cases"].append({"T": T, "B": [small, large], "ops": n, "ops_per_pair": [n[0] / (small * T), n[1] / (large * T)],
                             "growth": n[1] / n[0]})
    return out


def print_ops(title, r):
    print(f"\n== {title}: torch ops per default featurize call (p = {r['p']:,}, k = {r['k']})")
    for c in r["cases"]:
        print(f"   T = {c['T']}: B = {c['B'][0]}: {c['ops'][0]:,} ops ({c['ops_per_pair'][0]:.0f} per pair); "
              f"B = {c['B'][1]}: {c['ops'][1]:,} ({c['ops_per_pair'][1]:.0f} per pair); growth {c['growth']:.2f}× for "
              f"{c['B'][1] // c['B'][0]}× the examples")


def bench_throughput(model, shape, B, T, k, device, repeats, cache_limit_gb, paths=("plain", "fast", "reference"),
                     proj_slice_rows=0, ref_batch=0):
    """Example-timesteps/s, peak memory and fractions of plain fwd+bwd for each path."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = model.to(device).eval()
    x0, ts, ns = rows_for(B, T, shape)
    x0, ts, ns = x0.to(device), ts.to(device), ns.to(device)
    res = {"B": B, "T": T, "k": k, "p": num_parameters(model)}
    fns, mems = {}, {}

    if "plain" in paths:
        xs = x0.unsqueeze(1).expand(B, T, *shape).reshape(B * T, *shape)

        def plain():
            model.zero_grad(set_to_none=True)
            (output_value(model, scheduler, xs, ts.reshape(-1), ns.reshape(B * T, *shape)).sum() / T).backward()
        fns["plain"] = plain

    failed = res.setdefault("failed", {})  # path -> why ("out of memory"): reported, and the other paths go on

    def drop(name):  # a path that ran out of memory, with the figures that depend on it
        group = {"fast": ("fast", "kernel", "kernel_plain", "kernel_floor"),
                 "reference": ("reference", "reference_grads", "reference_proj_slice")}
        owner = next((g for g, members in group.items() if name in members), name)
        failed[owner] = "out of memory"
        for member in group.get(owner, (name,)):
            fns.pop(member, None)

    def guarded(name, setup):
        try:
            setup()
        except Exception as err:  # noqa: BLE001 - only allocation failures are survived, the rest re-raised
            if not is_out_of_memory(err):
                raise
            drop(name)
            _free_after_oom(device)


    def fast_setup():
        mem = PeakMemory(device).start()
        fast = Featurizer(model, scheduler, FeaturizeArgs(proj_dim=k, batch_size=B), device)
        assert fast.args.method == "fast"
        fast.features(x0, ts, ns)  # warm-up + one-time self-check
        fns["fast"] = lambda: fast.features(x0, ts, ns)
        mems["fast_setup"] = mem.peak()
        if fast.args.kernel == "ggn":  # the default's second part: the GGN kernel of the same B examples
            from diffusion_trak.featurize.featurizer import kernel_args

            kf = fast.with_args(kernel_args(fast.args))
            Tk = kf.args.num_timesteps
            g = torch.Generator().manual_seed(1)
            kts = torch.randint(0, 1000, (B, Tk), generator=g).to(device)
            kns = torch.randn(B, Tk, 2 * shape[0], *shape[1:], generator=g).to(device)  # [ε, probe]
            kf.kernel_block(x0, kts, kns)  # the block that Featurizer.featurize_kernel sums
            fns["kernel"] = lambda: kf.kernel_block(x0, kts, kns)
            res["kernel_draws"] = Tk
            fns["kernel_plain"], fns["kernel_floor"] = _kernel_references(model, scheduler, x0, kts, kns)

    if "fast" in paths:  # the library's defaults (method fast), only k and the batch given
        guarded("fast", fast_setup)

    def reference_setup():
        nonlocal proj_slice_rows
        mem = PeakMemory(device).start()
        ref = reference_featurizer(model, scheduler, k, device, cache_limit_gb)
        if ref.projector is None:
            proj_slice_rows = proj_slice_rows or min(1 << 18, res["p"])
        else:
            res["reference_projector"] = f"{ref.projector.name} (matrix in memory)"
        if ref_batch and ref_batch < B:  # vmap's memory grows with B × T: fewer examples, same throughput measure
            rx0, rts, rns = x0[:ref_batch], ts[:ref_batch], ns[:ref_batch]
            res["reference_B"] = ref_batch
        else:
            rx0, rts, rns = x0, ts, ns
        if proj_slice_rows:
            # the p×k matrix cannot be cached: time vmap gradients, and a cached projection on a slice of
            # rows extrapolated linearly to p (a lower bound on the reference's time)
            res["reference_projector"] = f"vmap gradients measured + cached dense projection extrapolated from {proj_slice_rows} of {res['p']} rows"
            sl = TorchProjector(proj_slice_rows, k, 0, device=device, cache_bytes=proj_slice_rows * k * 4 + 1)
            holder = {}

            def ref_grads():
                holder["g"] = ref.gradients(rx0, rts, rns)

            def proj_slice():
                sl(holder["g"][:, :proj_slice_rows])
            ref_grads()
            proj_slice()
            fns["reference_grads"] = ref_grads
            fns["reference_proj_slice"] = proj_slice
        else:
            ref.features(rx0, rts, rns)  # warm-up: generates the projection matrix
            fns["reference"] = lambda: ref.features(rx0, rts, rns)
        mems["reference_setup"] = mem.peak()

    if "reference" in paths:
        guarded("reference", reference_setup)

    # peak memory of one call of each path (after its warm-up)
    for name in list(fns):
        if name not in fns:
            continue
        mem = PeakMemory(device).start()
        try:
            fns[name]()
        except Exception as err:  # noqa: BLE001 - see guarded
            if not is_out_of_memory(err):
                raise
            drop(name)
            _free_after_oom(device)
            continue
        mems[name] = mem.peak()
    # timing: alternate paths, median over repeats
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name in list(fns):
            if name not in fns:
                continue
            try:
                times[name].append(timed(fns[name], device))
            except Exception as err:  # noqa: BLE001 - see guarded
                if not is_out_of_memory(err):
                    raise
                drop(name)
                _free_after_oom(device)
    times = {name: v for name, v in times.items() if name in fns and v}
    med = {name: statistics.median(v) for name, v in times.items()}
    if "reference_grads" in med:
        med["reference"] = med.pop("reference_grads") + med.pop("reference_proj_slice") * res["p"] / proj_slice_rows
        mems["reference"] = mems.pop("reference_grads")
        mems.pop("reference_proj_slice", None)
        res["reference_matrix_mb_not_allocated"] = res["p"] * k * 4 / 2 ** 20
    for name, t in med.items():
        res[f"{name}_s_per_batch"] = t
        res[f"{name}_throughput"] = (res.get("reference_B", B) if name == "reference" else B) * T / t
        if name in mems:
            res[f"{name}_peak_mb"] = mems[name] / 2 ** 20
    if "kernel" in med:  # the default featurization: features + kernel, per example-timestep of the features
        med_both = med["fast"] + med["kernel"]
        res["fast_with_kernel_s_per_batch"] = med_both
        res["fast_with_kernel_throughput"] = B * T / med_both
        res["fast_with_kernel_peak_mb"] = max(mems["fast"], mems["kernel"]) / 2 ** 20
        # each kernel row against a plain fwd+bwd of the same pairs, and the least any kernel of these draws costs
        res["kernel_over_plain"] = med["kernel"] / med["kernel_plain"]
        res["kernel_floor_over_plain"] = med["kernel_floor"] / med["kernel_plain"]
        res["fast_with_kernel_floor_throughput"] = B * T / (med["fast"] + med["kernel_floor"])
    for name in ("fast", "reference"):
        if f"{name}_setup" in mems:
            res[f"{name}_peak_incl_setup_mb"] = max(mems[f"{name}_setup"], mems.get(name, 0)) / 2 ** 20
    if "fast" in med and "reference" in med:
        res["fast_over_reference"] = res["fast_throughput"] / res["reference_throughput"]
    if "plain" in med:
        for name in ("fast", "reference", "fast_with_kernel", "fast_with_kernel_floor"):
            if f"{name}_throughput" in res:
                res[f"{name}_fraction_of_plain"] = res[f"{name}_throughput"] / res["plain_throughput"]
    res["repeats"] = repeats
    return res


def _kernel_references(model, scheduler, x0, kts, kns):
    """Two references for the GGN kernel's B × Tk single-draw rows: a plain batched forward + backward of the same
    (example, timestep, noise) pairs, and the floor of any kernel of these draws: a forward + a backward through the
    activations only (weights frozen, no per-row gradient formed), which every single-draw row needs at least."""
    B, Tk = kts.shape
    C = kns.shape[2] // 2
    xs = x0.repeat_interleave(Tk, 0)
    ts, ns = kts.reshape(-1), kns.reshape(B * Tk, *kns.shape[2:])

    def plain():
        model.zero_grad(set_to_none=True)
        output_value(model, scheduler, xs, ts, ns[:, :C]).sum().backward()

    def floor():
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            output_value(model, scheduler, xs.clone().requires_grad_(), ts, ns, "probe").sum().backward()
        finally:
            for p in params:
                p.requires_grad_(True)
    return plain, floor


def print_throughput(title, r):
    print(f"\n== {title}: p = {r['p']:,}, B = {r['B']} examples × T = {r['T']}, k = {r['k']}")
    if "reference_projector" in r:
        print(f"   reference projector: {r['reference_projector']}")
    if "reference_B" in r:
        print(f"   reference batch: B = {r['reference_B']} (vmap memory grows with B × T); throughput per its own rows")
    print(f"   {'path':<10} {'ex-timesteps/s':>15} {'s/batch':>9} {'peak MB':>9} {'peak incl. setup':>17} {'of plain':>9}"
          "   (peak: one batch above resident; incl. setup: + matrix / sketch tables and first batch)")
    for name, why in r.get("failed", {}).items():
        print(f"   {name:<10} {why} (this path's figures are missing; the other paths went on)")
    for name in ("plain", "reference", "fast", "fast_with_kernel"):
        if f"{name}_throughput" not in r:
            continue
        frac = r.get(f"{name}_fraction_of_plain")
        setup = r.get(f"{name}_peak_incl_setup_mb")
        label = {"fast": "features", "fast_with_kernel": "+ kernel"}.get(name, name)
        print(f"   {label:<10} {r[f'{name}_throughput']:>15.1f} {r[f'{name}_s_per_batch']:>9.3f} "
              f"{r.get(f'{name}_peak_mb', float('nan')):>9.0f} {setup if setup is not None else float('nan'):>17.0f} "
              f"{(f'{100 * frac:.0f}%') if frac else '':>9}")
    if "reference_matrix_mb_not_allocated" in r:
        print(f"   (reference memory excludes its p×k matrix, {r['reference_matrix_mb_not_allocated'] / 1024:.0f} GB, "
              "which the library refuses over its limit; its projection time is extrapolated from a slice held in memory)")
    if "fast_with_kernel_throughput" in r:
        print(f"   (features: the default's training features alone; + kernel: with the GGN kernel's {r['kernel_draws']} "
              "single-draw rows per example, which the default featurization also computes; throughput counts the "
              "features' example-timesteps)")
    if "kernel_floor_over_plain" in r:
        print(f"   kernel rows: {r['kernel_over_plain']:.2f}× a plain fwd+bwd of the same pairs; the floor of any kernel of these "
              f"draws (a forward + a backward through the activations per row): {r['kernel_floor_over_plain']:.2f}×; features "
              f"+ kernel at that floor: {100 * r['fast_with_kernel_floor_fraction_of_plain']:.0f}% of plain")
    if "fast_over_reference" in r:
        print(f"   default features (fast) / reference throughput: {r['fast_over_reference']:.2f}×")


# --------------------------------------------------------------------------------------------- real size
#: Stable Diffusion 1.5's UNet2DConditionModel (random weights, no download), and a narrow model with the same layer
#: structure (the CI test's)
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_NARROW = dict(block_out_channels=(8, 16, 32, 32), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd_unet(config=SD15, size=16, lora_rank=0):
    """UNet2DConditionModel with SD 1.5's layer structure (``config``: :data:`SD15` or :data:`SD15_NARROW`), 4 latent
    channels at ``size``×``size``; with ``lora_rank`` a peft LoRA adapter on to_q/to_k/to_v/to_out.0 (the base frozen,
    as diffusers' LoRA training leaves it)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, layers_per_block=2, **config).eval()
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    return unet


def bench_sd(config=SD15, size=16, B=8, T=2, kernel_draws=2, k=2048, repeats=2, lora_rank=0, ops=True) -> dict:
    """One configuration of the real-size benchmark, on CPU in this process: peak memory (the process's, ``VmHWM``
    reset before each path; the model and inputs are resident in both) and seconds per (example, timestep) pair of
    plain forward + backward of the B × T rows (gradients of every parameter, or of the adapter's with ``lora_rank``),
    of the default featurize's features (all parameters or ``params=lora``; T draws per example) and of its GGN
    kernel rows (``kernel_draws`` single-draw rows per example); the featurizer's planned peak; ops per pass."""
    from diffusers import DDPMScheduler

    from diffusion_trak.featurize.featurizer import kernel_args

    _trim()
    rss0 = _status("VmRSS")
    unet = sd_unet(config, size, lora_rank)
    sched = DDPMScheduler(num_train_timesteps=1000)
    shape = (4, size, size)
    cross = config["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, *shape, generator=g)
    ts = torch.randint(0, 1000, (B, T), generator=g)
    ns = torch.randn(B, T, *shape, generator=g)
    ehs = torch.randn(B, 77, cross, generator=g)
    kts = torch.randint(0, 1000, (B, kernel_draws), generator=g)
    kns = torch.randn(B, kernel_draws, 2 * shape[0], size, size, generator=g)
    trained = [p for p in unet.parameters() if p.requires_grad]
    res = {"p_model": sum(p.numel() for p in unet.parameters()), "p": sum(p.numel() for p in trained), "B": B, "T": T,
           "kernel_draws": kernel_draws, "k": k, "size": size, "lora_rank": lora_rank,
           "model_mb": sum(p.numel() * p.element_size() for p in unet.parameters()) / 2 ** 20}
    xs = x0.unsqueeze(1).expand(B, T, *shape).reshape(B * T, *shape)
    cond = {"encoder_hidden_states": ehs.repeat_interleave(T, 0)}

    def plain():
        unet.zero_grad(set_to_none=True)
        (output_value(unet, sched, xs, ts.reshape(-1), ns.reshape(B * T, *shape), "loss", cond).sum() / T).backward()

    peaks, times = {}, {}

    def once(fn, name):
        """One timed call with the process's peak memory since its start."""
        mem = PeakMemory("cpu").start()
        times.setdefault(name, []).append(timed(fn, "cpu"))
        peaks.setdefault(name, []).append((_status("VmHWM") - rss0, mem.peak()))  # from before the model; above resident

    plain()  # warm-up
    once(plain, "plain")
    unet.zero_grad(set_to_none=True)
    _trim()

    args = FeaturizeArgs(num_timesteps=T, proj_dim=k, batch_size=B, kernel_draws=kernel_draws,
                         params="lora" if lora_rank else "all")
    setup = PeakMemory("cpu").start()
    fz = Featurizer(unet, sched, args, "cpu")
    assert fz.fast is not None and fz.model is unet, "the default featurizer must be the fast path, on the caller's model"
    feats = lambda: fz.features(x0, ts, ns, {"encoder_hidden_states": ehs})  # noqa: E731
    feats()  # warm-up: the one-time probe row and self-check
    res["featurize_setup_peak_mb"] = (_status("VmHWM") - rss0) / 2 ** 20
    res["featurize_setup_above_resident_mb"] = setup.peak() / 2 ** 20
    res["planned_peak_mb"] = fz.fast.plan(B, T)[2] / 2 ** 20
    res["state_mb"] = fz.fast.state_bytes / 2 ** 20
    res["largest_layer"] = fz.fast.layer_params
    res["rows_per_pass"] = int(fz.fast.plan(B, T)[0] * fz.fast.plan(B, T)[1])
    once(feats, "features")
    kf = fz.with_args(kernel_args(args))
    krow = lambda: kf.kernel_block(x0, kts, kns, {"encoder_hidden_states": ehs})  # noqa: E731
    krow()  # warm-up
    once(krow, "kernel")
    # the timed calls alternate between the paths, so load from other jobs falls on all of them alike
    for _ in range(repeats - 1):
        unet.zero_grad(set_to_none=True)
        _trim()
        once(plain, "plain")
        unet.zero_grad(set_to_none=True)
        _trim()
        once(feats, "features")
        once(krow, "kernel")
    unet.zero_grad(set_to_none=True)
    for name, rows in (("plain", B * T), ("features", B * T), ("kernel", B * kernel_draws)):
        res[f"{name}_s_per_pair"] = statistics.median(times[name]) / rows
        res[f"{name}_peak_mb"] = max(p for p, _ in peaks[name]) / 2 ** 20
        res[f"{name}_peak_above_resident_mb"] = max(a for _, a in peaks[name]) / 2 ** 20
    if ops:  # one more call, counted (not timed)
        res["ops_per_call"] = count_ops(feats)
        res["passes_per_call"] = -(-B // fz.fast.plan(B, T)[0]) * -(-T // fz.fast.plan(B, T)[1])
    res["planned_kernel_peak_mb"] = fz.fast.plan(B * kernel_draws, 1)[2] / 2 ** 20
    for name in ("features", "kernel"):
        res[f"{name}_time_over_plain"] = res[f"{name}_s_per_pair"] / res["plain_s_per_pair"]
    res["peak_over_plain"] = max(res["features_peak_mb"], res["kernel_peak_mb"], res["featurize_setup_peak_mb"]) / res["plain_peak_mb"]
    del fz, kf, unet
    _trim()
    return res


def print_sd(title, r):
    what = f"LoRA rank {r['lora_rank']} ({r['p']:,} parameters)" if r["lora_rank"] else f"all {r['p']:,} parameters"
    print(f"\n== {title}: {what}; model {r['model_mb']:.0f} MB; {r['size']}×{r['size']} latents, 77 text states; "
          f"B = {r['B']} × T = {r['T']} pairs, {r['kernel_draws']} kernel draws per example, k = {r['k']}")
    print(f"   peak memory (process, model and inputs included): plain fwd+bwd {r['plain_peak_mb']:.0f} MB; featurize: "
          f"first call (probe + self-check) {r['featurize_setup_peak_mb']:.0f} MB, features {r['features_peak_mb']:.0f} MB, "
          f"kernel rows {r['kernel_peak_mb']:.0f} MB: {r['peak_over_plain']:.2f}× plain")
    print(f"   planned peak {r['planned_peak_mb']:.0f} MB features, {r['planned_kernel_peak_mb']:.0f} MB kernel rows "
          f"(featurizer state {r['state_mb']:.0f} MB, {r['rows_per_pass']} rows per pass)")
    print(f"   time per pair: plain {r['plain_s_per_pair']:.3f} s; features {r['features_s_per_pair']:.3f} s "
          f"({r['features_time_over_plain']:.2f}×); kernel rows {r['kernel_s_per_pair']:.3f} s "
          f"({r['kernel_time_over_plain']:.2f}×)" + (f"; ops per features call {r['ops_per_call']:,} in "
                                                     f"{r['passes_per_call']} pass(es)" if "ops_per_call" in r else ""))


# --------------------------------------------------------------------------------------------- fidelity
def _spearman_rows(a, b):
    from scipy.stats import rankdata

    ra = np.apply_along_axis(rankdata, 1, a)
    rb = np.apply_along_axis(rankdata, 1, b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))))


def _spearman_all(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel())[0])


def fidelity_checkpoint(workdir, n_train, epochs, progress):
    from diffusion_trak.data import load_dataset
    from diffusion_trak.train import list_checkpoints, train_ddpm

    ds = load_dataset(name="digits", split="train", limit=n_train)
    args = TrainArgs(block_out_channels=(16, 32, 32), attention_levels=(1,), epochs=epochs, batch_size=64,
                     num_checkpoints=1, learning_rate=2e-3, seed=0)
    train_ddpm(ds, args, workdir, progress=progress)
    return list_checkpoints(workdir)[-1]


def exact_dual_scores(G_train, G_tgt, ridge, k):
    """Exact TRAK scores from full gradients in dual form, with λ = ridge·tr(GGᵀ)/k."""
    Gt = torch.as_tensor(G_train, dtype=torch.float64)
    Gq = torch.as_tensor(G_tgt, dtype=torch.float64)
    K = Gt @ Gt.T
    lam = ridge * float(torch.diagonal(K).sum()) / k
    K.diagonal().add_(lam)
    Kq = Gq @ Gt.T
    return torch.linalg.solve(K, Kq.T).T.numpy(), lam


def bench_fidelity(checkpoint, n_train, n_targets, k, T, seeds, ridge, progress=True):
    from diffusion_trak.data import load_dataset
    from diffusion_trak.score import TRAKScorer
    from diffusion_trak.train import load_checkpoint

    unet, sched = load_checkpoint(checkpoint)
    train = load_dataset(name="digits", split="train", limit=n_train)
    tgt = load_dataset(name="digits", split="test", limit=n_targets)
    shape = tuple(train.images.shape[1:])
    fargs = FeaturizeArgs(num_timesteps=T, proj_dim=k, seed=0)

    def draws(ds, offset):
        d = [example_draws(int(i) + offset, fargs, int(sched.config.num_train_timesteps), shape) for i in ds.indices]
        return torch.stack([x[0] for x in d]), torch.stack([x[1] for x in d])
    tr_t, tr_n = draws(train, 0)
    tg_t, tg_n = draws(tgt, 10 ** 6)
    ref = Featurizer(unet, sched, FeaturizeArgs(num_timesteps=T, proj_dim=k, method="vmap", batch_size=32), "cpu")
    t0 = time.perf_counter()
    G_train = torch.cat([ref.gradients(train.images[i:i + 32], tr_t[i:i + 32], tr_n[i:i + 32]) for i in range(0, n_train, 32)])
    G_tgt = torch.cat([ref.gradients(tgt.images[i:i + 32], tg_t[i:i + 32], tg_n[i:i + 32]) for i in range(0, n_targets, 32)])
    print(f"   exact per-example gradients: {tuple(G_train.shape)} + {tuple(G_tgt.shape)} in {time.perf_counter() - t0:.1f}s")
    exact, lam = exact_dual_scores(G_train, G_tgt, ridge, k)
    out = {"p": G_train.shape[1], "n_train": n_train, "n_targets": n_targets, "k": k, "T": T, "ridge": ridge,
           "lambda": lam, "seeds": list(seeds), "dense": [], "fast": [], "dense_all": [], "fast_all": []}
    for seed in seeds:
        P = TorchProjector(G_train.shape[1], k, seed)
        phi_d, psi_d = P(G_train).numpy(), P(G_tgt).numpy()
        fz = Featurizer(unet, sched, FeaturizeArgs(num_timesteps=T, proj_dim=k, seed=seed, batch_size=32), "cpu")  # defaults
        phi_f = fz.features(train.images, tr_t, tr_n).numpy()
        psi_f = fz.features(tgt.images, tg_t, tg_n).numpy()
        # the fast features are the CountSketch of the very same gradients
        cs = fz.projector(G_train).numpy()
        out.setdefault("fast_vs_sketch_of_exact_rel_err", []).append(float(np.linalg.norm(phi_f - cs) / np.linalg.norm(cs)))
        for name, (phi, psi) in (("dense", (phi_d, psi_d)), ("fast", (phi_f, psi_f))):
            s = TRAKScorer([phi], ridge).score([psi])
            out[name].append(_spearman_rows(s, exact))
            out[name + "_all"].append(_spearman_all(s, exact))
        print(f"   seed {seed}: Spearman vs exact (per target) dense JL {out['dense'][-1]:.3f}, fast {out['fast'][-1]:.3f}")
    for name in ("dense", "fast", "dense_all", "fast_all"):
        v = out[name]
        out[name + "_mean"] = float(np.mean(v))
        out[name + "_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    out["gap"] = out["dense_mean"] - out["fast_mean"]
    return out


def print_fidelity(r):
    print(f"\n== fidelity: trained UNet p = {r['p']:,}, {r['n_train']} training rows, {r['n_targets']} held-out targets, "
          f"T = {r['T']}, k = {r['k']}, ridge {r['ridge']} (λ = {r['lambda']:.3g}), {len(r['seeds'])} projection seeds")
    print("   Spearman with exact-gradient TRAK scores, per target (mean ± sd over seeds):")
    print(f"     dense JL (reference) {r['dense_mean']:.3f} ± {r['dense_sd']:.3f}   (all pairs {r['dense_all_mean']:.3f})")
    print(f"     default (fast)       {r['fast_mean']:.3f} ± {r['fast_sd']:.3f}   (all pairs {r['fast_all_mean']:.3f})")
    print(f"     dense − fast: {r['gap']:+.3f} (target: ≤ 0.01); fast features vs CountSketch of exact gradients: "
          f"rel. error {max(r['fast_vs_sketch_of_exact_rel_err']):.1e}")


# --------------------------------------------------------------------------------------------- LDS contract
def lds_inputs(run: str) -> dict:
    """What :func:`bench_lds` reads from a finished run (through :class:`~evaluations.folder.RunFolder`, so a
    masked run's masks and ground truth): ``cfg``, ``train``, ``heldout``, ``traj``, ``steps`` (the scored steps:
    LDS and audit), ``lds_pos`` (positions of the LDS steps in ``steps``), ``ckpts`` (checkpoint folders),
    ``masks`` (M, N) and ``gts`` (``{set: {kind: (M, S_lds, B)}}``)."""
    from .folder import SETS, RunFolder

    folder = RunFolder.open(run)
    cfg = folder.config
    train, heldout = folder.datasets()
    steps = sorted(set(cfg["lds_steps"]) | set(cfg.get("audit_steps", [])))
    return {"cfg": cfg, "train": train, "heldout": heldout, "traj": folder.load_trajectory(), "steps": steps,
            "lds_pos": [steps.index(s) for s in cfg["lds_steps"]], "ckpts": folder.checkpoints(),
            "masks": folder.masks(), "gts": {s: folder.ground_truth(s) for s in SETS}}


def bench_lds(run, seeds, progress=True):
    """LDS of TRAK on a finished ``python -m diffusion_trak.evaluations.run`` folder with exact gradients, dense JL (the
    reference projector, ``len(seeds)`` seeds) and the fast path's CountSketch (same seeds), all from the same
    per-example gradients and the run's own draws, targets, subset models and ground truth.

    The fast path's features equal the CountSketch of the exact gradients up to float rounding (checked by
    the tests and by ``--fidelity``), so projecting the exact gradients gives its scores without featurizing
    twice; seed 0 of ``dense`` reproduces the run's own TRAK LDS (same matrix, same draws)."""
    from diffusion_trak.featurize.sketch import CountSketchProjector
    from diffusion_trak.score import TRAKScorer
    from diffusion_trak.targets import all_target_features
    from diffusion_trak.train import load_checkpoint

    from .metrics import bootstrap_ci, lds
    from .run import _target_sets

    inp = lds_inputs(run)
    cfg, train, heldout, traj, steps, lds_pos = (inp[x] for x in ("cfg", "train", "heldout", "traj", "steps", "lds_pos"))
    ckpts, masks, gts = inp["ckpts"], inp["masks"], inp["gts"]
    fargs = from_dict(FeaturizeArgs, {**cfg["featurize"], "method": "vmap"})
    sargs = from_dict(ScoreArgs, cfg["score"])
    out_name = sargs.target_output or fargs.output
    k, ridge = fargs.proj_dim, sargs.ridge
    shape = tuple(train.images.shape[1:])

    class _Grads(Featurizer):  # "features" = exact mean-over-noise gradients, for the target helpers
        def features(self, x0, timesteps, noises, cond=None, output=None, cond_per_timestep=False):
            bs = self.args.batch_size
            return torch.cat([self.gradients(x0[i:i + bs], timesteps[i:i + bs], noises[i:i + bs], None, output)
                              for i in range(0, x0.shape[0], bs)])

    projected = {}
    exact = {"generated": [], "heldout": []}
    for c, ck in enumerate(ckpts):
        t0 = time.perf_counter()
        unet, sched = load_checkpoint(ck)
        g = _Grads(unet, sched, dataclasses.replace(fargs, projector="countsketch", proj_dim=1))
        d = [example_draws(int(i), fargs, int(sched.config.num_train_timesteps), shape) for i in train.indices]
        G = g.features(train.images, torch.stack([x[0] for x in d]), torch.stack([x[1] for x in d]))
        Q = {s: all_target_features(g, ts, sargs.num_noises, sargs.seed, out_name).steps
             for s, ts in _target_sets(traj, heldout, steps).items()}
        Q = {s: q.reshape(-1, q.shape[-1]) for s, q in Q.items()}
        Gd = G.double()
        K = Gd @ Gd.T
        lam = ridge * float(torch.trace(K)) / k  # the λ that the projected scores use, in expectation
        Kinv = torch.linalg.inv(K + lam * torch.eye(K.shape[0], dtype=torch.float64))
        for sname, q in Q.items():
            exact[sname].append(((q.double() @ Gd.T) @ Kinv).numpy())
        del Gd, K, Kinv
        for seed in seeds:
            for name, P in ((f"dense JL seed {seed}", TorchProjector(G.shape[1], k, seed)),
                            (f"fast seed {seed}", CountSketchProjector(G.shape[1], k, seed))):
                e = projected.setdefault(name, {"train": [], "generated": [], "heldout": []})
                e["train"].append(P(G).numpy())
                for sname, q in Q.items():
                    e[sname].append(P(q).numpy())
                del P
        print(f"   checkpoint {c + 1}/{len(ckpts)}: gradients {tuple(G.shape)}, projections done in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        del G, Q

    scores = {"exact": {s: np.mean(v, 0) for s, v in exact.items()}}
    for name, e in projected.items():
        sc = TRAKScorer(e["train"], ridge)
        scores[name] = {s: sc.score(e[s]) for s in ("generated", "heldout")}
    cells = {}
    for name, by in scores.items():
        for sname, sc in by.items():
            sc = sc.reshape(len(steps), -1, sc.shape[-1])
            for kind, y in gts[sname].items():
                for j, si in enumerate(lds_pos):
                    v = lds(sc[si], masks, y[:, j, :])
                    cells[(name, sname, kind, cfg["lds_steps"][j])] = bootstrap_ci(v, cfg.get("n_boot", 2000), seed=j)
    names = list(scores)
    keys = sorted({kk[1:] for kk in cells})
    res = {"run": run, "k": k, "ridge": ridge, "seeds": list(seeds), "methods": names,
           "cells": [{"method": kk[0], "set": kk[1], "gt": kk[2], "step": kk[3], "mean": v[0], "lo": v[1], "hi": v[2]}
                     for kk, v in cells.items()]}
    summary = {}
    for fam in ("dense JL", "fast"):
        ms = [n for n in names if n.startswith(fam)]
        summary[fam] = {"mean_lds": float(np.mean([cells[(n,) + kk][0] for n in ms for kk in keys])),
                        "mean_abs_diff_from_exact": float(np.mean([abs(cells[(n,) + kk][0] - cells[("exact",) + kk][0])
                                                                   for n in ms for kk in keys]))}
    summary["exact"] = {"mean_lds": float(np.mean([cells[("exact",) + kk][0] for kk in keys]))}

    def overlap(a, b):
        return sum(not (cells[(a,) + kk][2] < cells[(b,) + kk][1] or cells[(b,) + kk][2] < cells[(a,) + kk][1]) for kk in keys)
    summary["ci_overlap_fast_vs_dense_same_seed"] = [overlap(f"fast seed {s}", f"dense JL seed {s}") for s in seeds]
    summary["ci_overlap_dense_vs_dense_seed0"] = [overlap(f"dense JL seed {s}", f"dense JL seed {seeds[0]}") for s in seeds[1:]]
    summary["cells"] = len(keys)
    res["summary"] = summary
    return res


def print_lds(r):
    names = r["methods"]
    cells = {(c["method"], c["set"], c["gt"], c["step"]): c for c in r["cells"]}
    keys = sorted({kk[1:] for kk in cells})
    print(f"\n== LDS contract on {r['run']} (k = {r['k']}, ridge {r['ridge']}); mean LDS over targets [95% bootstrap CI]")
    print("   " + f"{'set / ground truth / step':<36}" + "".join(f"{n:>22}" for n in names))
    for kk in keys:
        row = "".join(f"{cells[(n,) + kk]['mean']:>+8.3f} [{cells[(n,) + kk]['lo']:+.2f},{cells[(n,) + kk]['hi']:+.2f}]"
                      for n in names)
        print(f"   {kk[0] + ' / ' + kk[1] + ' / ' + str(kk[2]):<36}{row}")
    s = r["summary"]
    print(f"   mean LDS over the {s['cells']} cells: exact {s['exact']['mean_lds']:.3f}, dense JL {s['dense JL']['mean_lds']:.3f}, "
          f"fast {s['fast']['mean_lds']:.3f} (projected: mean over seeds)")
    print(f"   mean |LDS − exact|: dense JL {s['dense JL']['mean_abs_diff_from_exact']:.3f}, fast {s['fast']['mean_abs_diff_from_exact']:.3f}")
    print(f"   cells whose CIs overlap: fast vs dense JL (same seed) {s['ci_overlap_fast_vs_dense_same_seed']}, "
          f"dense JL seed s vs seed {r['seeds'][0]} {s['ci_overlap_dense_vs_dense_seed0']} (of {s['cells']})")


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine, multi-threaded OpenMP stalls on busy cores)")
    ap.add_argument("--batch", type=int, default=16, help="examples per batch for the ~1M UNet")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[10, 1], help="T values to benchmark")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-limit-gb", type=float, default=16.0, help="largest reference matrix to cache in memory")
    ap.add_argument("--cifar", action="store_true", help="also the DDPM CIFAR-10 UNet (36M parameters)")
    ap.add_argument("--cifar-batch", type=int, default=0, help="examples per batch for CIFAR (default 4 on CPU, 16 on GPU)")
    ap.add_argument("--cifar-slice-rows", type=int, default=1 << 18,
                    help="CPU: rows of the p×k matrix to time the projection on (extrapolated to p)")
    ap.add_argument("--skip-small", action="store_true", help="skip the ~1M UNet throughput benchmark")
    ap.add_argument("--ops", action="store_true",
                    help="only count the torch ops per default featurize call at B and 4B examples (the ~1M UNet unless "
                         "--skip-small, and CIFAR with --cifar); no timing")
    ap.add_argument("--fidelity", action="store_true", help="also the fidelity check (trains a small UNet unless --checkpoint)")
    ap.add_argument("--only-fidelity", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder for the fidelity check")
    ap.add_argument("--workdir", default="runs/bench_featurize", help="where the fidelity UNet is trained (resumable)")
    ap.add_argument("--fid-train", type=int, default=448)
    ap.add_argument("--fid-targets", type=int, default=64)
    ap.add_argument("--fid-epochs", type=int, default=150)
    ap.add_argument("--fid-T", type=int, default=10)
    ap.add_argument("--fid-seeds", type=int, default=3)
    ap.add_argument("--ridge", type=float, default=ScoreArgs().ridge)
    ap.add_argument("--lds", default=None, metavar="RUN",
                    help="a finished `python -m diffusion_trak.evaluations.run` folder: LDS of exact / dense JL / fast TRAK on it")
    ap.add_argument("--lds-seeds", type=int, default=3, help="projection seeds for --lds")
    ap.add_argument("--sd15", action="store_true",
                    help="only the real-size benchmark: Stable Diffusion 1.5's UNet (random weights) at 16×16 latents, "
                         "all parameters and a rank-4 LoRA, against plain forward + backward (CPU, ~7-12 GB)")
    ap.add_argument("--sd-narrow", action="store_true", help="--sd15 on a narrow model of the same layer structure")
    ap.add_argument("--sd-batch", type=int, default=8, help="examples for --sd15 (T = 2 and 2 kernel draws each)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} (other jobs on the machine make figures noisy)")
    results = {"device": a.device, "threads": torch.get_num_threads()}
    only = a.only_fidelity or (a.lds and not (a.fidelity or a.cifar))
    if a.sd15 or a.sd_narrow:
        config, title = (SD15_NARROW, "narrow SD-1.5-structure UNet") if a.sd_narrow else (SD15, "SD 1.5 UNet")
        for rank in (0, 4):
            r = bench_sd(config, B=a.sd_batch, k=a.k, repeats=max(1, min(a.repeats, 2)), lora_rank=rank)
            if a.json:  # each configuration as soon as it is measured
                save_results(a.json, results | {f"sd_{'lora' if rank else 'all'}": r})
            print_sd(title, r)
            results[f"sd_{'lora' if rank else 'all'}"] = r
        only = True
    if a.ops:
        for name, title, make, shape in (("small", "~1M UNet 16×16", small_unet, (1, 16, 16)),
                                         ("cifar", "DDPM CIFAR-10 UNet 32×32", cifar_unet, (3, 32, 32))):
            if (name == "small" and a.skip_small) or (name == "cifar" and not a.cifar):
                continue
            r = bench_ops(make(), shape, a.device)
            print_ops(title, r)
            results[f"{name}_ops"] = r
        only = True
    if not (only or a.skip_small):
        for T in a.timesteps:
            r = bench_throughput(small_unet(), (1, 16, 16), a.batch, T, a.k, a.device, a.repeats, a.cache_limit_gb)
            print_throughput(f"~1M UNet 16×16, T = {T}", r)
            results[f"small_T{T}"] = r
            _trim()
    if a.cifar and not only:
        on_gpu = torch.device(a.device).type == "cuda"
        B = a.cifar_batch or (16 if on_gpu else 4)
        for T in a.timesteps:
            r = bench_throughput(cifar_unet(), (3, 32, 32), B, T, a.k, a.device, max(1, a.repeats - 1), a.cache_limit_gb,
                                 proj_slice_rows=0 if on_gpu else a.cifar_slice_rows)
            print_throughput(f"DDPM CIFAR-10 UNet 32×32, T = {T}", r)
            results[f"cifar_T{T}"] = r
            _trim()
    if a.fidelity or a.only_fidelity:
        ckpt = a.checkpoint or fidelity_checkpoint(a.workdir, a.fid_train, a.fid_epochs, progress=True)
        r = bench_fidelity(ckpt, a.fid_train, a.fid_targets, a.k, a.fid_T, range(a.fid_seeds), a.ridge)
        r["checkpoint"] = ckpt
        print_fidelity(r)
        results["fidelity"] = r
    if a.lds:
        r = bench_lds(a.lds, range(a.lds_seeds))
        print_lds(r)
        results["lds"] = r
    if a.json:
        save_results(a.json, results)
    return results


def save_results(path: str, results: dict) -> None:
    """The benchmark's figures as JSON at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
