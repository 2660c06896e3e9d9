"""Helpers of the report tests: a tiny run folder (made without training) and a headless browser.

The browser is Debian's ``chromium`` driven over the Chrome DevTools Protocol with
``websocket-client`` (a test extra): no browser download, no network.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import torch

HOSTILE = ['<script>window.__pwned = 1</script>', '"><img src=x onerror="window.__pwned = 2">']


def make_run(root, num_targets=3, num_steps=20, record=(0, 4, 9, 14, 19), n=60, k=8, class_names=None,
             scores_name="seed-0", seed=0):
    """A run folder with run.json (an .npz dataset), a trajectory and scores, all random: what
    ``diffusion-trak plot`` reads. Returns ``(dataset, trajectory, scores, scores_dir)``."""
    from diffusion_trak.api import Scores
    from diffusion_trak.data import DataArgs, ImageDataset, save_npz
    from diffusion_trak.pipelines import Trajectory

    g = torch.Generator().manual_seed(seed)
    os.makedirs(root, exist_ok=True)
    names = class_names or [f"digit {c}" for c in range(5)]
    ds = ImageDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % len(names),
                      torch.arange(n) * 3 + 7, names, "fake")  # stable indices differ from positions
    npz = save_npz(ds, os.path.join(root, "data.npz"))
    with open(os.path.join(root, "run.json"), "w") as f:
        json.dump({"data": DataArgs(name="npz", path=npz).to_dict()}, f)
    R, B = len(record), num_targets
    traj = Trajectory(timesteps=torch.arange(num_steps - 1, -1, -1) * 50, step_indices=torch.tensor(record),
                      x_t=torch.randn(R, B, 1, 8, 8, generator=g), x0_pred=torch.rand(R, B, 1, 8, 8, generator=g) * 2 - 1,
                      noises=torch.zeros(num_steps, B, 1, 8, 8), initial_noise=torch.randn(B, 1, 8, 8, generator=g),
                      final=torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, seed=seed, scheduler_class="DDPMScheduler",
                      class_labels=torch.arange(B) % len(names))
    os.makedirs(os.path.join(root, "trajectories"), exist_ok=True)
    traj.save(os.path.join(root, "trajectories", scores_name + ".safetensors"))
    values = np.asarray(torch.randn(R, B, n, generator=g), dtype=np.float32)
    sc = Scores(values, list(record), [int(traj.timesteps[s]) for s in record], ds.indices.numpy(), {})
    sdir = os.path.join(root, "scores", scores_name)
    sc.save(sdir, k)
    return ds, traj, Scores.load(sdir), sdir


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium page over the DevTools Protocol: open a file, run JavaScript, collect
    console errors and uncaught exceptions."""

    def __init__(self, binary):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="dt-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and len(open(port_file).read().split()) >= 2):  # port, then path
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + 10
        while True:
            pages = [t for t in json.load(opener.open(f"http://127.0.0.1:{port}/json/list"))
                     if t.get("type") == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.05)
        if not pages:
            self.close()
            raise RuntimeError("chromium started but opened no page")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self._id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method, timeout=30):
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def open(self, path):
        """Load a local file; returns the seconds from navigation to the load event."""
        self.events.clear()
        t0 = time.perf_counter()
        self.send("Page.navigate", url="file://" + os.path.abspath(path))
        self.wait_event("Page.loadEventFired")
        return time.perf_counter() - t0

    def js(self, expression):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self):
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        self.send("Runtime.evaluate", expression="0")  # drain pending events
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(("console", [a.get("value", a.get("description")) for a in p.get("args", [])]))
            elif m == "Runtime.exceptionThrown":
                out.append(("exception", p["exceptionDetails"].get("exception", {}).get("description")
                            or p["exceptionDetails"].get("text")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(("log", p["entry"].get("text")))
        return out

    def screenshot(self, path, width=1400, height=1000):
        import base64

        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
