"""The Python API: the same steps as the CLI, for models and data already in memory.

Flow: ``train`` → ``featurize`` → ``generate`` (trajectory) → ``score`` (per step) → ``plot``.
"""
from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import distributed
from .config import FeaturizeArgs, ScoreArgs, asdict, from_dict
from .errors import InputError, NonFiniteError
from .featurize.featurizer import Featurizer, held_slots, kernel_args, kernel_slots, model_fingerprint
from .featurize.projectors import CACHE_ENV, MatrixTooLargeError
from .models import Conditioning, adapter_of, as_checkpoints, check_compatible, unet_conditioning, unet_sample_size
from .score import TRAKScorer, top_k
from .store import Store, StoreError, check_resources, make_dirs, write_json_atomic
from .target_cache import target_features_of
from .targets import TargetSet

Checkpoint = Tuple[torch.nn.Module, object]  # (unet, scheduler)


def check_finite(images: torch.Tensor, what: str = "dataset", first_row: int = 0) -> None:
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images.reshape(images.shape[0], -1))).any(1).nonzero().reshape(-1)[:5] + first_row
        bad = bad.tolist()
        raise NonFiniteError(f"NaN/Inf in the {what} at rows {bad}; clean or drop those images")


def check_timesteps(ckpts, expected: Optional[int] = None, what: str = "the features") -> int:
    """All schedulers must share one ``num_train_timesteps`` (and match ``expected``)."""
    counts = sorted({int(s.config.num_train_timesteps) for _, s in ckpts})
    if len(counts) > 1:
        raise InputError(f"checkpoints disagree on num_train_timesteps {counts}; use schedulers with the same number")
    if expected is not None and counts[0] != expected:
        raise InputError(f"scheduler has num_train_timesteps={counts[0]} but {what} used {expected}; "
                         f"load the scheduler the model was trained with")
    return counts[0]


def check_dataset(features_settings: dict, dataset, where: str = "the features") -> None:
    """Refuse (one line) a dataset other than the one the features (settings of their store) were computed on
    (for a latent model: its latents, or the training images they are of)."""
    want = features_settings.get("dataset") or {}
    fp, n = dataset.fingerprint(), len(dataset)
    pixels = (features_settings.get("conditioning") or {}).get("pixels") or {}
    if any(w.get("fingerprint") == fp and w.get("size") == n for w in (want, pixels)):
        return
    name = getattr(dataset, "name", "") or "in memory"
    raise InputError(f"the dataset ({name}, {n} images, fingerprint {fp}) is not the one {where} were computed on "
                     f"({want.get('name') or '?'}, {want.get('size')} images, fingerprint {want.get('fingerprint')}); "
                     "pass the --data/--data-path/--classes/--limit used for featurize, or featurize this dataset")


@contextlib.contextmanager
def _closing_on_error(store: Store):
    """Close ``store`` (releasing its lock) if the block raises."""
    try:
        yield store
    except BaseException:
        store.close()
        raise


@dataclass
class FeatureSet:
    """Training features of every checkpoint: a store with one (N, k) array per checkpoint (``features_XX``) and,
    for ``kernel="ggn"``, the GGN kernel of each checkpoint (``kernel_XX``: (S, k, k), S partial sums)."""

    store: Store
    names: List[str]
    kernel_names: List[str] = field(default_factory=list)
    #: work that depends on these features and a checkpoint but not on the targets, kept for later calls of
    #: :func:`score`: the featurizers of the checkpoints and the TRAK kernel with its factorisation
    reuse: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def arrays(self):
        return [self.store.get(n).read() for n in self.names]

    @property
    def kernels(self):
        """The GGN kernel (k × k, float64) per checkpoint, or None (the kernel is then ``ΦᵀΦ``)."""
        def total(slots):  # slot by slot: never the S copies in float64 at once
            K = np.zeros(slots.shape[1:], dtype=np.float64)
            for s in range(slots.shape[0]):
                K += slots[s]
            return K

        return [total(self.store.get(n).read()) for n in self.kernel_names] or None

    def scorer(self, ridge: float, block_size: int) -> TRAKScorer:
        """The :class:`TRAKScorer` of these features (kernel and Cholesky factor per checkpoint), built once."""
        key = ("scorer", float(ridge), int(block_size))
        if key not in self.reuse:
            self.reuse[key] = TRAKScorer(self.arrays, ridge, block_size, kernels=self.kernels)
        return self.reuse[key]

    def featurizers(self, ckpts, device) -> List[Featurizer]:
        """Featurizers of ``ckpts`` (already checked to be the store's checkpoints) with the store's settings,
        built once per device."""
        key = ("featurizers", str(torch.device(device)))
        if key not in self.reuse:
            self.reuse[key] = _featurizers(ckpts, from_dict(FeaturizeArgs, self.store.settings["featurize"]), device)
        return self.reuse[key]

    @classmethod
    def open(cls, path: str) -> "FeatureSet":
        store = Store.open_existing(path)
        names = list(store.names())
        return cls(store, [n for n in names if not n.startswith("kernel_")], [n for n in names if n.startswith("kernel_")])


def featurize(checkpoints: Sequence, dataset, args: FeaturizeArgs = FeaturizeArgs(), out: str = "features",
              overwrite: bool = False, device="cpu", progress: bool = True,
              conditioning: Optional[Conditioning] = None, rows: Optional[Sequence[int]] = None) -> FeatureSet:
    """Featurize ``dataset`` with every checkpoint into the store at ``out`` (resumable).

    ``conditioning`` (a :class:`~diffusion_trak.models.Conditioning`) says what the model kind adds: a VAE
    (``dataset`` is encoded to latents unless it already is), a text model and captions; by default a pixel
    model, class-conditional on the dataset's labels when its unet has a class embedding.
    ``rows`` restricts the work to some dataset positions (a shard); the store stays shared."""
    distributed.state()  # under accelerate launch: this process's GPU is "cuda" before any module is placed
    ckpts = as_checkpoints(checkpoints, device)
    check_params(ckpts, args)
    args = resolve_params(ckpts, args)  # "auto" saved as what it means for these checkpoints
    if len(dataset) == 0:
        raise InputError("dataset is empty; check --classes/--limit")
    conditioning = conditioning or Conditioning()
    dataset = conditioning.encode(dataset)
    kinds = {unet_conditioning(u) for u, _ in ckpts}
    if len(kinds) != 1:
        raise InputError(f"checkpoints mix conditionings {sorted(kinds)}; featurize them separately")
    for unet, _ in ckpts:
        check_compatible(unet, dataset)
    for pos, x in dataset.batches():  # in batches: a disk-backed dataset is never read whole
        check_finite(x, first_row=int(pos[0]))
    check_timesteps(ckpts)
    n_t = int(ckpts[0][1].config.num_train_timesteps)
    if args.timestep_range is not None and args.timestep_range[1] >= n_t:
        raise InputError(f"timestep_range {tuple(args.timestep_range)} reaches past the model's {n_t} training "
                         f"timesteps; use HI <= {n_t - 1}")
    _check_featurize_size(args, dataset, len(ckpts), out, device)
    cond_fn, per_timestep = conditioning.training(ckpts[0][0], dataset, args.num_timesteps, args.seed)
    featurizers = [Featurizer(u, s, args, device) for u, s in ckpts]
    settings = {
        "featurize": asdict(args),
        "projector": featurizers[0].projector.name,
        "num_params": featurizers[0].num_params,
        "dataset": {"fingerprint": dataset.fingerprint(), "size": len(dataset), "name": getattr(dataset, "name", "")},
        "checkpoints": [model_fingerprint(u) for u, _ in ckpts],
        "num_train_timesteps": [int(s.config.num_train_timesteps) for _, s in ckpts],
        **conditioning.settings(ckpts[0][0], dataset),
    }
    if any(adapter_of(u) for u, _ in ckpts):  # LoRA from a file: the base model's and the adapter's fingerprints
        settings["lora"] = [adapter_of(u) for u, _ in ckpts]
    dist = distributed.state()
    names = [f"features_{c:02d}" for c in range(len(featurizers))]
    knames = [f"kernel_{c:02d}" for c in range(len(featurizers))] if args.kernel == "ggn" else []
    with distributed.main_process_first():  # the main process creates (or replaces) the store, the others open it
        try:
            store = Store(out, settings, overwrite=overwrite and dist.is_main_process)
        except StoreError as e:
            raise StoreError(str(e) + _method_fix(out, args)) from None
        with _closing_on_error(store):
            arrays = [store.array(name, (len(dataset), args.proj_dim)) for name in names]
            n_slots = kernel_slots(len(dataset), args.batch_size, args.proj_dim)
            karrays = [store.array(name, (n_slots, args.proj_dim, args.proj_dim)) for name in knames]
    with store:  # the writer's lock is held until the rows are written
        mine = distributed.shard_rows(len(dataset), args.batch_size)
        if rows is not None:
            mine = np.intersect1d(mine, np.asarray(rows))
        if knames:  # the GGN kernel: the same projection, draws of their own; slots shared out like rows
            kargs = kernel_args(args)
            kcond_fn, kper = conditioning.training(ckpts[0][0], dataset, kargs.num_timesteps, args.seed)
            my_slots = distributed.shard_rows(n_slots, 1) if rows is None else held_slots(len(dataset), args.batch_size,
                                                                                          n_slots, mine)
        clock = _state_plan(featurizers, dataset, cond_fn, per_timestep, args, arrays, mine, karrays,
                            my_slots if knames else [], n_slots, progress and dist.is_main_process)
        for c, (f, arr) in enumerate(zip(featurizers, arrays)):
            f.featurize_dataset(dataset, arr, cond_fn=cond_fn, progress=progress and dist.is_main_process, rows=mine,
                                desc=f"featurize ckpt {c + 1}/{len(featurizers)}", cond_per_timestep=per_timestep,
                                clock=clock)
            if knames:
                f.with_args(kargs).featurize_kernel(dataset, karrays[c], cond_fn=kcond_fn, slots=my_slots,
                                                    progress=progress and dist.is_main_process,
                                                    desc=f"GGN kernel ckpt {c + 1}/{len(featurizers)}", cond_per_timestep=kper,
                                                    clock=clock)
        dist.wait_for_everyone()
        if rows is None:
            missing = [n for n, a in zip(names + knames, arrays + karrays) if not a.complete()]
            if missing:
                raise StoreError(f"{out}: rows missing in {missing} after featurization; rerun the same command to finish them")
    return FeatureSet(store, names, knames)


def _state_plan(featurizers, dataset, cond_fn, per_timestep, args, arrays, mine, karrays, my_slots, n_slots, say):
    """Before anything is computed: the run's pairs, kernel rows, their cost and planned peak memory
    (:class:`~diffusion_trak.featurize.featurizer.Estimate`), printed when ``say``; the :class:`RunClock` of the
    progress bars' whole-run ETA."""
    from .featurize.featurizer import RunClock, estimate_run, slot_rows

    todo = sum(len(a.pending(mine)) for a in arrays)
    ranges = slot_rows(len(dataset), args.batch_size, n_slots) if karrays else []
    krows = sum(ranges[s][1] - ranges[s][0] for a in karrays for s in a.pending(my_slots))
    pairs, kernel = todo * args.num_timesteps, krows * (args.kernel_draws if karrays else 0)
    if say and featurizers[0].fast is not None and pairs + kernel:
        examples = len(set().union(*(a.pending(mine).tolist() for a in arrays)))  # each once, however many checkpoints
        est = estimate_run(featurizers, dataset, cond_fn, per_timestep, examples, pairs, kernel,
                           args.kernel_draws if karrays else 0)
        print(str(est), flush=True)
    return RunClock(pairs, kernel)


def estimate(checkpoints: Sequence, dataset, args: FeaturizeArgs = FeaturizeArgs(), device="cpu",
             conditioning: Optional[Conditioning] = None):
    """What :func:`featurize` of the whole ``dataset`` would compute and the memory it plans for (an
    :class:`~diffusion_trak.featurize.featurizer.Estimate`), computing nothing but one forward of one example (its
    activation bytes) and writing nothing. Fast methods only."""
    from .featurize.featurizer import estimate_run

    ckpts = as_checkpoints(checkpoints, device)
    check_params(ckpts, args)
    args = resolve_params(ckpts, args)
    if len(dataset) == 0:
        raise InputError("dataset is empty; check --classes/--limit")
    if not args.method.startswith("fast"):
        raise InputError(f"an estimate needs a fast method; method={args.method} is not one (use --method fast)")
    conditioning = conditioning or Conditioning()
    probe = conditioning.encode(dataset.subset([0]))  # one example, in memory
    cond_fn, per_timestep = conditioning.training(ckpts[0][0], probe, args.num_timesteps, args.seed)
    featurizers = [Featurizer(u, s, args, device) for u, s in ckpts]
    n = len(dataset)
    kernel = n * args.kernel_draws * len(ckpts) if args.kernel == "ggn" else 0
    return estimate_run(featurizers, probe, cond_fn, per_timestep, n, n * args.num_timesteps * len(ckpts), kernel,
                        args.kernel_draws if kernel else 0)


def _check_featurize_size(args: FeaturizeArgs, dataset, num_ckpts: int, out: str, device) -> None:
    """Refuse (one line) settings whose store would not fit the disk or whose draws would not fit memory, before
    anything is allocated or written: the features and GGN kernel slots on disk; a batch's (timestep, noise) draws
    (``batch_size`` × max(T, kernel draws) noisy images, with their noise and output) and the k × k kernel in memory."""
    n, k, pixels = len(dataset), int(args.proj_dim), int(np.prod(dataset.image_shape))
    ggn = args.kernel == "ggn"
    slots = kernel_slots(n, args.batch_size, k) if ggn else 0
    disk = num_ckpts * (n * (4 * k + 5) + slots * (4 * k * k + 5))
    draws = max(int(args.num_timesteps), int(args.kernel_draws) if ggn else 0)
    memory = int(args.batch_size) * draws * pixels * 4 * 3 + (2 * k * k * 8 if ggn else 0) + int(args.batch_size) * k * 4
    check_resources(f"featurize ({n} images, k = {k}, T = {args.num_timesteps}"
                    + (f", {args.kernel_draws} kernel draws" if ggn else "") + f", batch size {args.batch_size})",
                    "use a smaller -k/--proj-dim, -T/--num-timesteps, --kernel-draws or --batch-size "
                    "(FeaturizeArgs), or free space", memory, disk, out, device)


NO_ADAPTER = ("--params lora (FeaturizeArgs(params='lora')) needs a LoRA adapter and this model has none; pass "
              "--lora PATH (lora= in Python): the folder or pytorch_lora_weights.safetensors that diffusers' LoRA "
              "training writes, or use --params all")


def check_params(ckpts, args: FeaturizeArgs) -> None:
    """Refuse (one line, the CLI's advice) ``params="lora"`` for checkpoints without an active LoRA adapter."""
    from .featurize.gradients import lora_parameter_names

    if args.params == "lora" and not all(lora_parameter_names(u) for u, _ in ckpts):
        raise InputError(NO_ADAPTER)


def resolve_params(ckpts, args: FeaturizeArgs) -> FeaturizeArgs:
    """``args`` with ``params="auto"`` resolved for these checkpoints: ``lora`` when every one carries an active
    LoRA adapter, else ``all`` (what feature stores record; stores made before ``auto`` said ``all`` or ``lora``)."""
    from .featurize.gradients import lora_parameter_names

    if args.params != "auto":
        return args
    lora = all(lora_parameter_names(u) for u, _ in as_checkpoints(ckpts))
    return replace(args, params="lora" if lora else "all")


def attributed_parameters(ckpts, args: FeaturizeArgs) -> Tuple[str, int, int]:
    """``(params, count, total)``: the selection ``args.params`` resolves to for the last checkpoint, how many
    parameters it covers and how many the UNet has (what the start-of-run line and the journey page state)."""
    from .featurize.gradients import lora_parameter_names

    unet = as_checkpoints(ckpts)[-1][0]
    params = resolve_params(ckpts, args).params
    named = dict(unet.named_parameters())
    total = sum(p.numel() for p in named.values())
    if params == "lora":
        return params, sum(named[n].numel() for n in lora_parameter_names(unet)), total
    if params == "trainable":
        return params, sum(p.numel() for p in named.values() if p.requires_grad), total
    return params, total, total


def describe_parameters(params: str, count: int, total: Optional[int] = None) -> str:
    """Which parameters are attributed, in words: "the LoRA adapter's 5,504 parameters (of 208,708 ...)"."""
    if params == "lora":
        return f"the LoRA adapter's {count:,} parameters" + (f" (of {total:,} in the UNet with it)" if total else "")
    if params == "trainable":
        return f"the UNet's {count:,} trainable parameters" + (f" (of {total:,})" if total else "")
    return f"all {count:,} UNet parameters"


def _method_fix(out: str, args: FeaturizeArgs) -> str:
    """The way back to a store's featurization method or parameters when they differ from ``args`` (e.g. a store
    made with ``vmap`` when that was the default), as a clause to append to a one-line error; "" otherwise."""
    try:
        saved = Store.open_existing(out).settings.get("featurize", {})
    except (StoreError, OSError, ValueError, AttributeError):
        return ""
    old, fix = saved.get("method"), ""
    if old is not None and old != args.method:
        fix = f"; or pass --method {old} (FeaturizeArgs(method={old!r})) to resume it with the method it was made with"
    params = saved.get("params", "all")  # stores made when "all" was the default leave it out
    if params != args.params:  # e.g. made over every parameter before an adapter became the default with --lora
        fix += (f"; or pass --params {params} (FeaturizeArgs(params={params!r})) to resume it with the parameters it "
                "was made with")
    return fix


def _check_adapters(stored, given) -> None:
    """One line naming what differs when the LoRA adapters (or their base models) are not those of the features."""
    stored = stored or [None] * len(given)
    for old, new in zip(stored, given):
        if old == new:
            continue
        if old is None or new is None:
            raise StoreError("the features were computed " + ("without" if old is None else "with") + " a LoRA adapter "
                             "(--lora); pass the same --lora (lora=) as for featurize, or featurize again")
        what = "base model" if old["base"] != new["base"] else "LoRA adapter"
        raise StoreError(f"this {what} (fingerprint {new['base' if what == 'base model' else 'adapter']}) is not the one "
                         f"the features were computed with ({old['base' if what == 'base model' else 'adapter']}); pass "
                         "the same --pipeline and --lora as for featurize, or featurize again")


def _featurizers(ckpts, fargs: FeaturizeArgs, device) -> List[Featurizer]:
    """One featurizer per checkpoint for the settings a feature store was made with."""
    try:
        return [Featurizer(u, s, fargs, device) for u, s in ckpts]
    except MatrixTooLargeError as e:
        raise MatrixTooLargeError(f"these features were made with method={fargs.method} and a dense projector whose "
                                  f"matrix is over the memory limit ({str(e).split(';')[0]}); raise {CACHE_ENV} to score "
                                  "them, or featurize again with the default method (fast)") from None


@dataclass
class TopK:
    """The top-k of :meth:`Scores.top`: ``indices``/``scores`` the k highest-scored training images (proponents),
    ``bottom_indices``/``bottom_scores`` the k lowest-scored, each ``(..., k)``, highest first and lowest first.
    A low score is an opponent only where it is negative (:attr:`opponents`); all of them may be positive.
    ``sources``/``captions`` (and ``bottom_``…) name each image (:meth:`~diffusion_trak.data.ImageDataset.describe`:
    its file relative to the image folder or its dataset row, and its caption or class name) when the scores know
    their training set, else None. Unpacks as the 4-tuple ``(indices, scores, bottom_indices, bottom_scores)``."""

    indices: np.ndarray
    scores: np.ndarray
    bottom_indices: np.ndarray
    bottom_scores: np.ndarray
    sources: Optional[np.ndarray] = None
    captions: Optional[np.ndarray] = None
    bottom_sources: Optional[np.ndarray] = None
    bottom_captions: Optional[np.ndarray] = None

    def __iter__(self):
        return iter((self.indices, self.scores, self.bottom_indices, self.bottom_scores))

    def __getitem__(self, i):
        return tuple(self)[i]

    def __len__(self) -> int:
        return 4

    def __repr__(self) -> str:
        shape = np.shape(self.indices)
        lead, k = shape[:-1], shape[-1]
        first = (0,) * len(lead)

        def row(idx, val, src):
            shown = []
            for j in range(min(3, k)):
                name = f" {src[first + (j,)]}" if src is not None else ""
                at = first + (j,)
                shown.append(f"#{int(np.asarray(idx)[at])}{name} ({float(np.asarray(val)[at]):+.3g})")
            return ", ".join(shown) + (f", ... ({k})" if k > 3 else "")

        where = f"{' × '.join(str(d) for d in lead)} rows" if lead else "one row"
        at = f" [{', '.join('0' for _ in lead)}]" if lead else ""
        return (f"TopK(k={k} for each of {where}; row{at}:\n"
                f"  highest: {row(self.indices, self.scores, self.sources)}\n"
                f"  lowest:  {row(self.bottom_indices, self.bottom_scores, self.bottom_sources)}\n"
                "  proponents are the highest with a score > 0, opponents the lowest with a score < 0; "
                "arrays: .indices, .scores, .sources, .captions, .bottom_*)")

    @property
    def opponents(self) -> np.ndarray:
        """``bottom_indices`` where the score is negative, -1 elsewhere (a positive low score opposes nothing)."""
        return np.where(np.asarray(self.bottom_scores) < 0, self.bottom_indices, -1)

    @classmethod
    def of(cls, ti, tv, bi, bv, dataset=None) -> "TopK":
        if dataset is None or not hasattr(dataset, "describe"):
            return cls(ti, tv, bi, bv)

        def names(idx):
            idx = np.asarray(idx)
            found = [dataset.describe(int(p)) for p in dataset.positions_of(idx.reshape(-1)).tolist()]
            src = np.array([d["source"] for d in found], dtype=object).reshape(idx.shape)
            cap = np.array([d["caption"] for d in found], dtype=object).reshape(idx.shape)
            return src, cap

        return cls(ti, tv, bi, bv, *names(ti), *names(bi))

    def entries(self, *at) -> dict:
        """``{"proponents", "lowest", "opponents"}`` at position ``at`` (e.g. step, target) for ``scores.json``:
        lists of ``{"index", "score"[, "source", "caption"]}``; ``opponents`` holds the negative lowest only."""
        def rows(idx, val, src, cap):
            out = []
            for j, (i, v) in enumerate(zip(idx[at], val[at])):
                e = {"index": int(i), "score": float(v)}
                if src is not None:
                    e.update(source=src[at][j], caption=cap[at][j])
                out.append(e)
            return out

        low = rows(self.bottom_indices, self.bottom_scores, self.bottom_sources, self.bottom_captions)
        return {"proponents": rows(self.indices, self.scores, self.sources, self.captions), "lowest": low,
                "opponents": [e for e in low if e["score"] < 0]}


def _summary_checksum(summary: dict) -> int:
    """The crc32 of a ``scores.json`` summary (everything in it but this checksum), as canonical JSON: what
    :meth:`Scores.save` records under ``checksums["scores.json"]`` and :meth:`Scores.load` checks."""
    rest = dict(summary, checksums={k: v for k, v in summary["checksums"].items() if k != "scores.json"})
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


@dataclass
class Scores:
    """Scores of every training example for every (step, target).

    ``values[s, b, i]``: score of training row ``i`` (stable index ``train_indices[i]``) for target
    ``b`` at step ``steps[s]`` (scheduler timestep ``timesteps[s]``): the journey.
    ``destination[b, i]`` (or None): the same for the final image, its target averaged over the whole
    range of timesteps (:func:`~diffusion_trak.targets.destination_target_features`)."""

    values: np.ndarray
    steps: List[int]
    timesteps: List[int]
    train_indices: np.ndarray
    meta: dict = field(default_factory=dict)
    destination: Optional[np.ndarray] = None
    #: the training set (pixels) the scores are of, when known: names each image in :meth:`top` and ``scores.json``
    dataset: Optional[object] = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        S, B, n = np.shape(self.values)
        best = self.top(1)
        steps = ", ".join(f"step {s}: #{int(best.indices[j, 0, 0])}"
                          + (f" {best.sources[j, 0, 0]}" if best.sources is not None else "")
                          + f" ({float(best.scores[j, 0, 0]):+.3g})" for j, s in enumerate(self.steps[:4]))
        more = ", ..." if S > 4 else ""
        dest = self.top_destination(1)
        final = "no destination row" if dest is None else (
            f"destination (final image): #{int(dest.indices[0, 0])}"
            + (f" {dest.sources[0, 0]}" if dest.sources is not None else "") + f" ({float(dest.scores[0, 0]):+.3g})")
        return (f"Scores({S} steps × {B} targets × {n} training images; steps {list(self.steps)[:8]}"
                f"{' ...' if S > 8 else ''}, timesteps {list(self.timesteps)[:8]}{' ...' if S > 8 else ''}\n"
                f"  highest-scored training image of target 0: {steps}{more}\n"
                f"  {final}\n"
                "  .values (steps × targets × training images), .destination, .top(k), .top_destination(k), "
                ".save(dir))")

    def top(self, k: int = 8) -> TopK:
        """The k highest and k lowest scores per (step, target) as a :class:`TopK` of stable dataset indices, each
        (S, B, k), with each image's source and caption when :attr:`dataset` is known."""
        ti, tv, bi, bv = top_k(self.values, k)
        return TopK.of(self.train_indices[ti], tv, self.train_indices[bi], bv, self.dataset)

    def top_destination(self, k: int = 8) -> Optional[TopK]:
        """The same for the destination row, each (B, k); None without a destination."""
        if self.destination is None:
            return None
        ti, tv, bi, bv = top_k(np.asarray(self.destination), k)
        return TopK.of(self.train_indices[ti], tv, self.train_indices[bi], bv, self.dataset)

    #: the files of a saved result; ``scores.json`` (written last) records the checksums of the others
    FILES = ("scores.npy", "destination.npy", "scores.json")

    def save(self, out: str, k: int = 8, overwrite: bool = False) -> str:
        """Save into ``out`` as one unit: every file is written whole under a temporary name first, then the arrays
        are renamed into place and ``scores.json``, which records their checksums, last; a failure before that
        (a full disk) leaves the previous result there unchanged. Only the files of :attr:`FILES` are written.
        A folder that is not a scores folder of ours is refused (:func:`~diffusion_trak.store.claim`); other scores
        already there are replaced only with ``overwrite``."""
        from .store import claim, is_staged, staged

        values = np.ascontiguousarray(self.values, dtype=np.float32)
        if claim(out, "scores") and not overwrite and os.path.isfile(os.path.join(out, "scores.json")):
            with open(os.path.join(out, "scores.json")) as f:
                old = json.load(f)
            same = old["checksums"].get("scores.npy") == zlib.crc32(values) and old.get("steps") == list(self.steps) \
                and old.get("shape") == list(self.values.shape)
            if not same:
                raise StoreError(f"{out} already holds other scores; nothing was changed: rerun with --overwrite "
                                 "(overwrite=True) to replace them, or choose another --out")
        make_dirs(out)
        for name in os.listdir(out):  # left by an interrupted save: exactly our temporary names
            if is_staged(name, self.FILES):
                os.remove(os.path.join(out, name))
        arrays = {"scores.npy": values}
        if self.destination is not None:
            arrays["destination.npy"] = np.ascontiguousarray(self.destination, dtype=np.float32)
        top = self.top(k)
        summary = {"steps": self.steps, "timesteps": self.timesteps, "train_indices": self.train_indices.tolist(),
                   "meta": self.meta, "shape": list(self.values.shape),
                   "checksums": {name: zlib.crc32(a) for name, a in arrays.items()},
                   "top": [[top.entries(s, b) for b in range(self.values.shape[1])] for s in range(len(self.steps))]}
        if self.destination is not None:
            dest = self.top_destination(k)
            summary["destination"] = [dest.entries(b) for b in range(dest.indices.shape[0])]
        summary = json.loads(json.dumps(summary))  # as it will read back
        summary["checksums"]["scores.json"] = _summary_checksum(summary)
        tmps = {}
        try:
            for name, a in arrays.items():
                tmps[name] = staged(os.path.join(out, name), lambda f, a=a: np.save(f, a))
            tmps["scores.json"] = staged(os.path.join(out, "scores.json"),
                                         lambda f: json.dump(summary, f, indent=2, sort_keys=True), "w")
        except OSError as e:
            for tmp in tmps.values():
                os.remove(tmp)
            raise StoreError(f"cannot save the scores in {out} ({e.strerror or e}); nothing there was changed: free "
                             "space or choose another --out, then rerun the same command") from None
        for name, tmp in tmps.items():  # scores.json last: it commits the arrays it names
            os.replace(tmp, os.path.join(out, name))
        if "destination.npy" not in arrays and os.path.isfile(os.path.join(out, "destination.npy")):
            os.remove(os.path.join(out, "destination.npy"))  # an earlier result's, which scores.json no longer names
        return out

    @classmethod
    def load(cls, out: str) -> "Scores":
        """Scores saved by :meth:`save` (read-only); one-line :class:`StoreError` if missing or damaged."""
        jpath, npath = os.path.join(out, "scores.json"), os.path.join(out, "scores.npy")
        if not os.path.exists(jpath) or not os.path.exists(npath):
            raise StoreError(f"no scores in {out}; run `diffusion-trak score` first or pass --scores")
        fix = f"rerun `diffusion-trak score` with --overwrite to rewrite {out}"
        try:
            with open(jpath) as f:
                s = json.load(f)
            values = np.load(npath, mmap_mode="r", allow_pickle=False)
            steps, timesteps, idx = list(s["steps"]), list(s["timesteps"]), np.asarray(s["train_indices"])
            meta = s.get("meta", {})
            dpath = os.path.join(out, "destination.npy")
            destination = np.load(dpath, allow_pickle=False) if "destination" in s else None
            checksums = s.get("checksums")
        except (ValueError, OSError, KeyError, TypeError, EOFError, AttributeError) as e:
            raise StoreError(f"{out} holds damaged scores ({type(e).__name__}); {fix}") from None
        if not isinstance(checksums, dict) or "scores.json" not in checksums:
            raise StoreError(f"{out} holds scores saved by an older diffusion-trak, without checksums; {fix}")
        if checksums["scores.json"] != _summary_checksum(s):
            raise StoreError(f"{out}/scores.json does not match its own checksum (edited by hand or damaged on disk: "
                             f"its settings and top-k can no longer be trusted); {fix}")
        for name, a in (("scores.npy", values), ("destination.npy", destination)):
            if a is not None and checksums.get(name) != zlib.crc32(np.ascontiguousarray(a)):
                raise StoreError(f"{out}/{name} does not match the checksum scores.json records (changed or damaged "
                                 f"on disk, or left by another save); {fix}")
        if values.ndim != 3 or values.shape[0] != len(steps) or values.shape[2] != len(idx) or not isinstance(meta, dict):
            raise StoreError(f"{out}: scores.npy {list(values.shape)} does not match scores.json; {fix}")
        if destination is not None and destination.shape != (values.shape[1], values.shape[2]):
            raise StoreError(f"{out}: destination.npy {list(destination.shape)} does not match scores.json; {fix}")
        return cls(values, steps, timesteps, idx, meta, destination)

    def check_trajectory(self, trajectory, where: str = "these scores") -> None:
        """Refuse (one line) a trajectory whose final images are not the target these scores were computed on
        (``meta["target"]``, the digest :func:`score` records; scores without it are not checked)."""
        from .targets import digest

        want = self.meta.get("target")
        got = digest(torch.as_tensor(trajectory.final).float())
        if want is not None and got != want:
            raise InputError(f"the trajectory (final images {got}) is not the one {where} were computed on (final "
                             f"images {want}); pass the trajectory the scores were computed for, or score this one")

    def check_target(self, target: int) -> int:
        """``target``, refused in one line unless it is one of the scored images."""
        B = self.values.shape[1]
        if not (isinstance(target, (int, np.integer)) and 0 <= target < B):
            raise InputError(f"target must be between 0 and {B - 1} (the scores are of {B} images), got {target!r}")
        return int(target)


def check_generator(trajectory, fingerprints: Sequence[str]) -> None:
    """Refuse (one line) a trajectory generated by a model (base and adapter) that is not among the scored
    checkpoints (their :func:`model_fingerprint` s, ``fingerprints``; an ensemble scores the trajectory of one of its members). Trajectories that do not
    record their model (made by hand, or by an older diffusion-trak) are not checked."""
    want = (getattr(trajectory, "generator", None) or {}).get("model")
    if want is None:
        return
    have = list(fingerprints)
    if want not in have:
        raise InputError(f"the trajectory was generated by another model (fingerprint {want}) than the checkpoints "
                         f"being scored ({', '.join(have[:4])}{', ...' if len(have) > 4 else ''}); score it with "
                         "the checkpoints (and --lora) that generated it, or generate one with these")


def score(features: FeatureSet, checkpoints: Sequence, train_indices, args: ScoreArgs = ScoreArgs(),
          trajectory=None, steps: Optional[Sequence[int]] = None, images: Optional[torch.Tensor] = None,
          image_timesteps: Sequence[int] = (10,), out: Optional[str] = None, overwrite: bool = False,
          device="cpu", progress: bool = True, cond: Optional[dict] = None, dataset=None) -> Scores:
    """TRAK scores for every step of a trajectory (``trajectory`` + ``steps``), or for real ``images``
    at the given timesteps. With ``out`` the (steps × targets) rows are streamed into a resumable store.

    ``cond``: the unet's keyword arguments for the targets (``class_labels``, ``encoder_hidden_states``); for a
    trajectory it defaults to the generation's own (:meth:`~diffusion_trak.models.Conditioning.of_trajectory`).
    With ``dataset`` (the training set), it must be the one the features were computed on.
    With ``args.destination_draws > 0`` the result also holds the destination row (``Scores.destination``):
    the final images (the trajectory's samples, or ``images``) scored with their target averaged over that
    many timesteps spread over the whole range."""
    if out is not None:  # a folder that is not ours is refused before any work
        from .store import MANIFEST, claim

        claim(out, "scores")
        if not overwrite and os.path.isfile(os.path.join(out, "scores.json")) \
                and not os.path.isfile(os.path.join(out, "store", MANIFEST)):
            raise StoreError(f"{out} holds scores without their store (store/ was removed), so they cannot be checked "
                             "against these settings; rerun with --overwrite to replace them, or choose another --out")
    ckpts = as_checkpoints(checkpoints, device)
    fset = features.store.settings
    fps = [model_fingerprint(u) for u, _ in ckpts]
    if dataset is not None:
        check_dataset(fset, dataset, f"the features in {features.store.root}")
    size = (fset.get("dataset") or {}).get("size")
    if size is not None and len(train_indices) != size:
        raise InputError(f"{len(train_indices)} training indices given, but the features in {features.store.root} "
                         f"have {size} rows; pass the training set the features were computed on")
    if fps != fset["checkpoints"]:
        _check_adapters(fset.get("lora"), [adapter_of(u) for u, _ in ckpts])
        raise StoreError("these checkpoints are not the ones the features were computed with; "
                         "featurize them again (diffusion-trak featurize) or pass the same --checkpoints")
    if trajectory is not None:
        check_generator(trajectory, fps)
    check_timesteps(ckpts, fset["num_train_timesteps"][0], "the features")
    fargs = from_dict(FeaturizeArgs, fset["featurize"])
    output = args.target_output or fargs.output
    if trajectory is not None:
        steps = [int(s) for s in (trajectory.step_indices if steps is None else steps)]
        check_timesteps(ckpts, int(trajectory.scheduler_config.get("num_train_timesteps", fset["num_train_timesteps"][0])),
                        "the trajectory's scheduler")
        for s in steps:
            try:
                trajectory.step_of(s)
            except ValueError as e:  # names the recorded steps and the fix
                raise InputError(str(e)) from None
        timesteps = [int(trajectory.timesteps[s]) for s in steps]
        if cond is None:
            cond = Conditioning.of_trajectory(trajectory)
        targets = TargetSet.from_trajectory(trajectory, steps)
    elif images is not None:
        cfg = ckpts[0][0].config  # images in the unet's space (pixels, or a latent model's latents)
        size = unet_sample_size(ckpts[0][0])
        shape = tuple(getattr(images, "shape", ()))
        if not isinstance(images, torch.Tensor) or len(shape) != 4 or not shape[0] or shape[1] != cfg.in_channels \
                or (size and shape[2:] != (size, size)):
            raise InputError(f"images must be a non-empty (B, {cfg.in_channels}, {size}, {size}) tensor, what the unet "
                             f"takes, got {type(images).__name__} {list(shape)}; Attributor.attribute() converts "
                             "and checks images of any source")
        check_finite(images, "target images")
        n_t = int(fset["num_train_timesteps"][0])
        bad = [int(t) for t in image_timesteps if not 0 <= int(t) < n_t]
        if bad or not len(image_timesteps):
            raise InputError(f"image timesteps {bad or list(image_timesteps)} are not in 0..{n_t - 1} "
                             f"(the scheduler's training timesteps); pass --image-timesteps between 0 and {n_t - 1}")
        steps, timesteps = list(range(len(image_timesteps))), [int(t) for t in image_timesteps]
        targets = TargetSet.from_images(images, steps, timesteps)
    else:
        raise ValueError("give a trajectory or images to score")
    key = targets.final_digest()  # the final images: what a score store records as its target
    S_, B_, n_ = len(steps), targets.num_targets, len(train_indices)
    k_, C_ = int(fargs.proj_dim), len(fset["checkpoints"])
    rows = S_ * B_ * int(args.num_noises) + B_ * int(args.destination_draws)  # (image, timestep, noise) rows of targets
    check_resources(f"score ({S_} steps × {B_} targets, R = {args.num_noises}, {args.destination_draws} destination "
                    f"draws, {n_} training images)", "use a smaller -R/--num-noises or --destination-draws (ScoreArgs), "
                    "fewer steps or targets, or free space",
                    memory=rows * int(targets.final[0].numel()) * 4 * 3 + C_ * k_ * k_ * 8 * 2,
                    disk=(S_ * B_ * (8 * n_ + 5) + B_ * 4 * n_) if out is not None else 0, folder=out, device=device)
    per_ckpt, dest_feats = target_features_of(features, ckpts, targets, args.num_noises, args.seed, output, cond,
                                              args.destination_draws, device)  # each (S, B, k); (B, k)
    S, B, k = per_ckpt[0].shape
    flat = [p.reshape(S * B, k) for p in per_ckpt]
    scorer = features.scorer(args.ridge, args.block_size)
    scorer.check(flat)  # a degenerate ridge is refused before anything is written
    n = scorer.n
    meta = {"score": asdict(args), "features": fset, "target": key, "lambdas": scorer.lambdas}
    # the final images, their target over the whole range of timesteps
    destination = scorer.score(dest_feats) if dest_feats is not None else None
    named = dataset if getattr(dataset, "pixels", None) is None else dataset.pixels  # names the training images
    if out is not None:
        dist = distributed.state()
        with distributed.main_process_first():
            where = {"score": asdict(args), "features": fset, "target": key, "steps": steps, "timesteps": timesteps}
            if images is not None and cond:  # the prompts / labels of real images: another one is another target
                from .targets import digest

                where["cond"] = digest(*[cond[k] for k in sorted(cond)])
            store = Store(os.path.join(out, "store"), where, overwrite=overwrite and dist.is_main_process)
            with _closing_on_error(store):
                arr = store.array("scores", (S * B, n))
        with store:
            scorer.score_into(flat, arr, progress=progress and dist.is_main_process,
                              rows=distributed.shard_rows(S * B, 1) if dist.num_processes > 1 else None)
            dist.wait_for_everyone()
            values = np.asarray(arr.read()).reshape(S, B, n)
            result = Scores(values, steps, timesteps, np.asarray(train_indices), meta, destination, named)
            if dist.is_main_process:
                result.save(out, args.top_k, overwrite=overwrite)
        return result
    else:
        values = scorer.score(flat).reshape(S, B, n)
    return Scores(values, steps, timesteps, np.asarray(train_indices), meta, destination, named)


@dataclass
class SelfAttribution:
    """What :func:`self_attribution_rate` found: ``rate``, the share of the ``positions`` (training images scored
    as targets at ``timestep``, each with its own label or caption) whose own index ranks first among all
    ``num_train`` training images; ``chance`` = 1 / ``num_train``. Unpacks as the 2-tuple ``(rate, positions)``."""

    rate: float
    positions: np.ndarray
    num_train: int
    timestep: int

    def __iter__(self):
        return iter((self.rate, self.positions))

    def __getitem__(self, i):
        return tuple(self)[i]

    def __len__(self) -> int:
        return 2

    @property
    def chance(self) -> float:
        return 1.0 / max(1, self.num_train)

    @property
    def near_chance(self) -> bool:
        """At most twice chance, or under a quarter: the features hardly tell the training images apart."""
        return self.rate <= max(2 * self.chance, 0.25)

    def __str__(self) -> str:
        hits = int(round(self.rate * len(self.positions)))
        return (f"{hits} of {len(self.positions)} training images ({self.rate:.0%}) rank themselves first among all "
                f"{self.num_train} at timestep {self.timestep} (chance: {self.chance:.0%})")

    def __repr__(self) -> str:
        return f"SelfAttribution({self})"


#: training images scored together by :func:`self_attribution_rate` (one step of its progress bar)
SELF_ATTRIBUTION_CHUNK = 8


def self_attribution_rate(features: FeatureSet, checkpoints: Sequence, dataset, num: int = 50, timestep: int = 10,
                          args: ScoreArgs = ScoreArgs(), device="cpu", seed: int = 0,
                          conditioning: Optional[Conditioning] = None, progress: bool = False) -> SelfAttribution:
    """Score ``num`` training images as targets at a low-noise ``timestep``, each with its own conditioning
    (label, or first caption); return how often each image's own index ranks first among all training
    examples, and the positions used, as a :class:`SelfAttribution` (unpacks as ``(rate, positions)``).
    ``dataset`` is in the unet's space (latents for a latent model). The images are scored
    :data:`SELF_ATTRIBUTION_CHUNK` at a time (each chunk draws its target noises as one scoring call does), with a
    progress bar when ``progress``."""
    from tqdm.auto import tqdm

    g = np.random.default_rng(seed)
    pos = np.sort(g.choice(len(dataset), size=min(num, len(dataset)), replace=False))
    checkpoints = as_checkpoints(checkpoints, device)
    cond = (conditioning or Conditioning()).examples(checkpoints[0][0], dataset, pos)
    best = []
    with tqdm(total=len(pos), desc="self-attribution", unit="img", disable=not progress) as bar:
        for a in range(0, len(pos), SELF_ATTRIBUTION_CHUNK):
            part = pos[a:a + SELF_ATTRIBUTION_CHUNK]
            sc = score(features, checkpoints, dataset.indices.numpy(), replace(args, destination_draws=0),
                       images=dataset.read(part), image_timesteps=[timestep], device=device, progress=False,
                       cond={k: v[a:a + SELF_ATTRIBUTION_CHUNK] for k, v in (cond or {}).items()} or None,
                       dataset=dataset)
            best.append(sc.values[0].argmax(axis=1))
            bar.update(len(part))
    return SelfAttribution(float((np.concatenate(best) == pos).mean()), pos, len(dataset), int(timestep))
