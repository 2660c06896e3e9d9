"""Scale-out and crash safety: a 2-process accelerate run equals a 1-process run; kill -9 then rerun
gives bit-identical results."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


@pytest.fixture
def ckpt(tmp_path, tiny_unet, scheduler):
    path = tmp_path / "ckpt"
    tiny_unet.save_pretrained(str(path / "unet"))
    scheduler.save_pretrained(str(path / "scheduler"))
    return str(path)


def featurize_cmd(ckpt, out, limit, T=2, bs=8):
    return ["-m", "diffusion_trak", "featurize", "--checkpoints", ckpt, "--data", "digits", "--limit", str(limit),
            "-T", str(T), "-k", "32", "--batch-size", str(bs), "--out", out, "--device", "cpu"]


def test_two_processes_equal_one(tmp_path, ckpt):
    subprocess.run([sys.executable, *featurize_cmd(ckpt, str(tmp_path / "one"), 40)], check=True, env=ENV,
                   capture_output=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                        *featurize_cmd(ckpt, str(tmp_path / "two"), 40)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("features:") == 1  # only the main process reports
    a = np.load(tmp_path / "one" / "features_00.npy")
    b = np.load(tmp_path / "two" / "features_00.npy")
    assert np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)
    assert np.load(tmp_path / "two" / "features_00.done.npy").all()
    # the default GGN kernel: its slots are shared out among the processes, and sum to the same bits
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "kernel_00.npy"), np.load(tmp_path / "two" / "kernel_00.npy"))
    assert np.load(tmp_path / "two" / "kernel_00.done.npy").all()


def test_two_processes_equal_one_latent_text_model(tmp_path):
    """A Stable-Diffusion-style folder (VAE + CLIP text encoder + UNet2DConditionModel), one caption drawn per
    timestep: the latents are encoded once (by the main process) and the features of 2 processes equal 1's."""
    from tiny_models import save_image_folder, save_sd_pipeline

    sd, imgs = save_sd_pipeline(str(tmp_path / "sd")), save_image_folder(str(tmp_path / "imgs"), n=24)
    cmd = lambda run: ["-m", "diffusion_trak", "featurize", "--pipeline", sd, "--data", "folder", "--data-path", imgs,
                       "--run", run, "-T", "2", "-k", "32", "--batch-size", "4", "--device", "cpu"]
    subprocess.run([sys.executable, *cmd(str(tmp_path / "one"))], check=True, env=ENV, capture_output=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29535",
                        *cmd(str(tmp_path / "two"))], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("features:") == 1
    a = np.load(tmp_path / "one" / "features" / "features_00.npy")
    b = np.load(tmp_path / "two" / "features" / "features_00.npy")
    assert a.shape == (24, 32) and np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)
    assert np.load(tmp_path / "two" / "features" / "features_00.done.npy").all()
    kernels = [np.load(tmp_path / run / "features" / "kernel_00.npy") for run in ("one", "two")]
    assert kernels[0].shape == (6, 32, 32) and np.abs(kernels[0]).sum() > 0  # 24 rows in blocks of 4: 6 slots
    np.testing.assert_array_equal(*kernels)
    import json
    settings = json.load(open(tmp_path / "two" / "features" / "manifest.json"))["settings"]
    assert settings["conditioning"]["kind"] == "text" and settings["conditioning"]["caption_mode"] == "random"
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "latents" / "latents.npy"),
                                  np.load(tmp_path / "two" / "latents" / "latents.npy"))


def _kill_when(proc, done_path, n):
    """kill -9 as soon as some but not all rows are flagged done."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(done_path):
            try:
                k = int(np.load(done_path, mmap_mode="r").sum())
            except (ValueError, OSError):
                k = 0
            if 0 < k < n:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return k
        time.sleep(0.02)
    proc.kill()
    pytest.skip("run finished before it could be interrupted")


def test_kill_and_resume_featurize_is_bit_identical(tmp_path, ckpt):
    n = 200
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run([sys.executable, *featurize_cmd(ckpt, ref, n, T=4, bs=4)], check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen([sys.executable, *featurize_cmd(ckpt, out, n, T=4, bs=4)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    k = _kill_when(proc, os.path.join(out, "features_00.done.npy"), n)
    assert 0 < k < n
    subprocess.run([sys.executable, *featurize_cmd(ckpt, out, n, T=4, bs=4)], check=True, env=ENV, capture_output=True)
    np.testing.assert_array_equal(np.load(os.path.join(ref, "features_00.npy")), np.load(os.path.join(out, "features_00.npy")))
    assert np.load(os.path.join(out, "features_00.done.npy")).all()


def test_kill_and_resume_score_is_bit_identical(tmp_path, ckpt):
    n = 64
    feats = str(tmp_path / "f")
    subprocess.run([sys.executable, *featurize_cmd(ckpt, feats, n)], check=True, env=ENV, capture_output=True)
    from diffusion_trak.data import load_dataset, save_npz

    targets = str(tmp_path / "targets.npz")
    save_npz(load_dataset(name="digits", split="test", limit=60), targets)
    cmd = ["-m", "diffusion_trak", "score", "--checkpoints", ckpt, "--data", "digits", "--limit", str(n), "--features",
           feats, "--images", targets, "--image-timesteps", "10", "200", "-R", "2", "--device", "cpu"]
    subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "ref")], check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen([sys.executable, *cmd, "--out", str(tmp_path / "s")], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(3.0)  # somewhere inside the run (target gradients or scoring)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "s")], check=True, env=ENV, capture_output=True)
    a = np.load(tmp_path / "ref" / "scores.npy")
    b = np.load(tmp_path / "s" / "scores.npy")
    assert a.shape == (2, 60, n)
    np.testing.assert_array_equal(a, b)


def test_two_process_scoring_equals_one(tmp_path, ckpt):
    n = 32
    feats = str(tmp_path / "f")
    subprocess.run([sys.executable, *featurize_cmd(ckpt, feats, n)], check=True, env=ENV, capture_output=True)
    from diffusion_trak.data import load_dataset, save_npz

    targets = str(tmp_path / "targets.npz")
    save_npz(load_dataset(name="digits", split="test", limit=6), targets)
    cmd = ["-m", "diffusion_trak", "score", "--checkpoints", ckpt, "--data", "digits", "--limit", str(n), "--features",
           feats, "--images", targets, "--image-timesteps", "10", "200", "-R", "2", "--device", "cpu"]
    subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "one")], check=True, env=ENV, capture_output=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534", *cmd,
                        "--out", str(tmp_path / "two")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = np.load(tmp_path / "one" / "scores.npy")
    b = np.load(tmp_path / "two" / "scores.npy")
    assert a.shape == (2, 6, n) and np.abs(a).sum() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cpu_contention_is_one_line_only_when_busy():
    from diffusion_trak.distributed import cpu_contention

    line = cpu_contention(threads=2, cores=2, load=1.9)
    assert line and "\n" not in line and "OMP_NUM_THREADS=1" in line and "load 1.9 on 2 cores" in line
    assert cpu_contention(threads=2, cores=2, load=0.3) is None  # a quiet machine
    assert cpu_contention(threads=1, cores=2, load=3.0) is None  # one thread waits on nobody
