"""Shared helpers of the benchmark scripts: bench-sized fixtures, segmoe's throwaway env, timing, memory.

Not a test module and not part of the package: the scripts in this folder import it by path.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEGMOE_ENV = Path(os.environ.get("SEGMOE_REF_ENV", "/tmp/segref"))
SEGMOE_VERSION = "0.0.4"

# Block widths of the bench-sized UNets: the real block structure and depths (testing.tiny_unet_config)
# at widths where matmuls, not Python overhead, dominate a CPU step. Text encoders stay tiny.
WIDTHS = {
    "build": {"sdxl": ([24, 48, 96], [1, 2, 4]), "sd15": ([24, 48, 96, 96], 2), "vega": ([24, 48, 96], [1, 2, 4])},
    "medium": {"sdxl": ([64, 128, 256], [1, 2, 4]), "sd15": ([64, 128, 256, 256], 4), "vega": ([64, 128, 256], [1, 2, 4]),
               "ssd1b": ([64, 128, 256], [1, 2, 4])},
}


def setup_torch(threads: int = 1):
    import torch

    torch.set_num_threads(threads)
    return torch


# --- fixtures ------------------------------------------------------------------------------------
def bench_unet_config(layout: str, size: str = "medium") -> dict:
    """``testing.tiny_unet_config(layout)`` with the block widths of ``WIDTHS[size]`` (``"tiny"``: unchanged)."""
    from segmoe_lab.testing import tiny_unet_config

    from segmoe_lab.sources.layouts import unet_config

    cfg = tiny_unet_config(layout)
    if size != "tiny":
        chans, heads = WIDTHS[size][layout]
        cfg.update(block_out_channels=chans, attention_head_dim=heads, norm_num_groups=8 if chans[0] % 32 else 32)
    if size == "medium":  # text width in the real proportion to the block widths (SDXL 2048 : 320)
        real = unet_config(layout)
        cfg["cross_attention_dim"] = 8 * round(real["cross_attention_dim"] * chans[0] / real["block_out_channels"][0] / 8)
    return cfg


def bench_pipeline(layout: str, size: str = "medium", seed: int = 0):
    """``testing.make_pipeline(layout)`` whose UNet has the bench widths (same seed, fp32, CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    from segmoe_lab.testing import make_pipeline

    pipe = make_pipeline(layout, seed)
    if size != "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(bench_unet_config(layout, size)).eval()
        pipe.register_modules(unet=unet)
    return pipe


def write_bench_fixture(root: Path, layout: str, n_experts: int, size: str = "build", seed: int = 0) -> dict:
    """Write ``root/base`` and ``root/expert_<i>`` (perturbed UNets) like ``testing.write_fixture_set``,
    at bench widths. Returns ``{"base": path, "experts": [paths], "prompts": [...]}``."""
    from segmoe_lab.testing import expert_prompt, perturb_unet

    root.mkdir(parents=True, exist_ok=True)
    pipe = bench_pipeline(layout, size, seed)
    base = root / "base"
    shutil.rmtree(base, ignore_errors=True)
    pipe.save_pretrained(base)
    experts = []
    for i in range(n_experts):
        folder = root / f"expert_{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder, ignore=lambda d, names: ["unet"] if Path(d) == base else [])
        perturb_unet(copy.deepcopy(pipe.unet), seed=seed * 1000 + i + 1).save_pretrained(folder / "unet")
        experts.append(folder)
    return {"base": base, "experts": experts, "prompts": [expert_prompt(i) for i in range(n_experts)]}


def merge_dict(fixture: dict, n_experts: int, model_type: str, **overrides) -> dict:
    """A segmoe-schema config dict over the first ``n_experts`` experts of a bench fixture."""
    cfg = {"base_model": str(fixture["base"]), "num_experts": n_experts, "moe_layers": "attn",
           "num_experts_per_tok": 1, "type": model_type,
           "experts": [{"source_model": str(e), "positive_prompt": p, "negative_prompt": "blurry"}
                       for e, p in list(zip(fixture["experts"], fixture["prompts"]))[:n_experts]]}
    cfg.update(overrides)
    return cfg


# --- segmoe 0.0.4 in its own environment -----------------------------------------------------------
def segmoe_python() -> tuple[Optional[Path], str]:
    """``(python, note)`` of a throwaway venv with segmoe 0.0.4, created when missing.

    The venv shares this interpreter's packages (torch, diffusers, ...) through a ``.pth`` file
    and gets ``segmoe==0.0.4`` with ``--no-deps``, so segmoe never enters the project's venv.
    ``python`` is None (and ``note`` says why) when that fails, e.g. offline without a cache.
    """
    py = SEGMOE_ENV / "bin" / "python"
    check = [str(py), "-c", f"import importlib.metadata as m; assert m.version('segmoe') == '{SEGMOE_VERSION}'"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py, f"segmoe {SEGMOE_VERSION} in {SEGMOE_ENV}"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SEGMOE_ENV)], check=True, capture_output=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "_shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", f"segmoe=={SEGMOE_VERSION}"],
                       check=True, capture_output=True, text=True, timeout=300)
        subprocess.run(check, check=True, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return None, f"segmoe {SEGMOE_VERSION} could not be installed into {SEGMOE_ENV}: {str(detail).strip()[-300:]}"
    return py, f"segmoe {SEGMOE_VERSION} installed into {SEGMOE_ENV}"


def run_child(python, code: str, *, timeout: int = 900) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line starting with ``RESULT``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


# Prepended to child programs: peak memory of the process, sampled (anonymous RSS) and from the kernel
# (ru_maxrss: anonymous + file-backed pages, e.g. mmap'd safetensors files), and the CPU seconds it
# used (less sensitive than wall time to other processes on a shared machine).
MEMORY_PROBE = r'''
import json, resource, threading, time
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0
class Probe:
    def __init__(self):
        self.base_rss, self.base_anon = _status("VmRSS:"), _status("RssAnon:")
        self.peak_anon, self._stop = self.base_anon, False
        use = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0 = use.ru_utime + use.ru_stime
        self._t = threading.Thread(target=self._run, daemon=True); self._t.start()
    def _run(self):
        while not self._stop:
            self.peak_anon = max(self.peak_anon, _status("RssAnon:")); time.sleep(0.002)
    def stop(self):
        self._stop = True; self._t.join()
        self.peak_anon = max(self.peak_anon, _status("RssAnon:"))
        use = resource.getrusage(resource.RUSAGE_SELF)
        return {"peak_rss": use.ru_maxrss * 1024, "base_rss": self.base_rss, "peak_anon": self.peak_anon,
                "base_anon": self.base_anon, "cpu_s": use.ru_utime + use.ru_stime - self.cpu0}
'''


# --- timing and tables -------------------------------------------------------------------------------
def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, measured round-robin so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table; ``columns`` is ``[(key, header)]``; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mb(nbytes: float) -> float:
    return nbytes / 2**20


def machine_note() -> str:
    import torch

    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
            f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
