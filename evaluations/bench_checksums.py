"""Checksum overhead (issue 27; ``python evaluations/bench_checksums.py [N K]``): featurize + score on the tiny
test UNet, with the store's checksums and the per-block score checks, and with them stubbed out (in-process A/B, alternating, min of repeats)."""
import os, shutil, sys, tempfile, time
os.environ["TQDM_DISABLE"] = "1"
import numpy as np, torch
torch.set_num_threads(1)
from diffusers import UNet2DModel, DDPMScheduler
from diffusion_trak import api, store, score as score_mod
from diffusion_trak.config import FeaturizeArgs, ScoreArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.pipelines import TrajectoryPipeline

torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=4, attention_head_dim=None)
sched = DDPMScheduler()
n, k = int(sys.argv[1]) if len(sys.argv) > 1 else 128, int(sys.argv[2]) if len(sys.argv) > 2 else 256
data = load_dataset(name="digits", limit=n)
fargs = FeaturizeArgs(num_timesteps=4, proj_dim=k, batch_size=16, kernel_draws=4)
sargs = ScoreArgs(num_noises=2, destination_draws=4)
traj = TrajectoryPipeline(unet=unet, scheduler=sched)(seed=0, num_inference_steps=4, record_steps=[0, 3], batch_size=2,
                                                      show_progress=False).trajectory
real = (store.row_checksums, store.StoredArray.damaged_rows, score_mod.TRAKScorer._scores)


def plain_scores(self, W, i):
    return self._block(W, i).numpy().astype(np.float32)


def stub(on):
    if on:
        store.row_checksums, store.StoredArray.damaged_rows, score_mod.TRAKScorer._scores = real
    else:
        store.row_checksums = lambda rows: np.zeros(len(rows), np.uint32)
        store.StoredArray.damaged_rows = lambda self, block=1024: np.zeros(0, dtype=int)
        score_mod.TRAKScorer._scores = plain_scores


def once(checks):
    stub(checks)
    root = tempfile.mkdtemp()
    t = time.perf_counter()
    fs = api.featurize([(unet, sched)], data, fargs, os.path.join(root, "f"), progress=False)
    fs = api.FeatureSet.open(os.path.join(root, "f"))
    api.score(fs, [(unet, sched)], data.indices.numpy(), sargs, trajectory=traj, out=os.path.join(root, "s"), progress=False)
    dt = time.perf_counter() - t
    shutil.rmtree(root)
    return dt


once(True); once(False)  # warm up
times = {True: [], False: []}
for r in range(int(os.environ.get("REPEATS", "5"))):
    for checks in (True, False):
        times[checks].append(once(checks))
on, off = min(times[True]), min(times[False])
print(f"n={n} k={k}: with checksums {on:.3f}s, without {off:.3f}s, ratio {on / off:.3f} "
      f"(medians {np.median(times[True]):.3f} / {np.median(times[False]):.3f} = {np.median(times[True]) / np.median(times[False]):.3f})")

# the time spent in the checks themselves, during runs with checks (less noisy than the A/B above)
spent = [0.0]
def timed(f):
    def g(*a, **kw):
        t = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t
    return g
stub(True)
store.row_checksums = timed(real[0])
store.StoredArray.damaged_rows = timed(real[1])
def checked(self, W, i):  # TRAKScorer._scores, timing only its check beyond the float32 conversion
    acc = self._block(W, i)
    block = acc.numpy().astype(np.float32)
    t = time.perf_counter()
    if not block.any() and (acc.any() or any(w.any() for w in W)):
        self._underflow(0)
    spent[0] += time.perf_counter() - t
    return block


score_mod.TRAKScorer._scores = checked
totals = []
for r in range(3):
    spent[0] = 0.0
    root = tempfile.mkdtemp(); t0 = time.perf_counter()
    api.featurize([(unet, sched)], data, fargs, os.path.join(root, "f"), progress=False)
    fs = api.FeatureSet.open(os.path.join(root, "f"))
    api.score(fs, [(unet, sched)], data.indices.numpy(), sargs, trajectory=traj, out=os.path.join(root, "s"), progress=False)
    totals.append((spent[0], time.perf_counter() - t0)); shutil.rmtree(root)
print("time in checksums and checks / total:", ", ".join(f"{s*1000:.1f} ms / {T:.3f} s = {100*s/T:.2f}%" for s, T in totals))
