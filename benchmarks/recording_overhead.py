"""Recording overhead: a 25-step generation with and without :func:`segmoe_lab.observe.recording.record_gates`.

One process, side by side: the same merge generates the same prompt with the same seed (a
classifier-free-guidance batch of 2) without recording, with recording (reductions only) and with
``spatial=True`` (per-token routing kept too). Time is the median of interleaved runs, so
background load falls on every mode alike. Memory comes from separate runs of each mode: the
peak of Python-tracked allocations during the run (``tracemalloc``, which sees numpy arrays but
not torch's CPU allocator), the peak anonymous RSS above the run's starting point (sampled every
2 ms), and the bytes the recording keeps.

Building the table afterwards (``rec.frame()``) is timed on its own. The merge is the toy world's
when :mod:`segmoe_lab.toy` is installed, else a bench-sized SD 1.5 fixture (real block structure,
``_common.WIDTHS["build"]`` widths, 4 experts, ``moe_layers: all``). float32, CPU, one thread.

Usage::

    .venv/bin/python benchmarks/recording_overhead.py                 # ~2 minutes
    .venv/bin/python benchmarks/recording_overhead.py --world fixture --steps 25 --repeats 5
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import _common as C

torch = C.setup_torch(1)

from segmoe_lab.merge.build import build_merge  # noqa: E402
from segmoe_lab.merge.moe import iter_moe_layers  # noqa: E402
from segmoe_lab.observe.recording import record_gates  # noqa: E402

PROMPT = "a photo of a red cat"


def toy_available() -> bool:
    try:
        from segmoe_lab import toy  # noqa: F401
    except ImportError:
        return False
    return True


def open_merge(world: str, root: Path):
    """``(pipe, description)`` of the merge to generate with."""
    if world == "toy":
        from segmoe_lab import toy

        cfg = toy.merge_config(moe_layers="all")
        pipe = build_merge(cfg, progress=False)
        return pipe, f"toy world merge ({cfg.num_experts} experts, moe_layers=all, top-{cfg.num_experts_per_tok})"
    fixture = C.write_bench_fixture(root, "sd15", 4, size="build")
    cfg = C.merge_dict(fixture, 4, "sd", moe_layers="all", init="random")
    pipe = build_merge(cfg, progress=False)
    return pipe, "bench-sized SD 1.5 fixture merge (4 experts, moe_layers=all, top-1)"


def modes(pipe, steps: int) -> dict:
    """name -> run(): one generation, recorded or not; returns the recording (or None)."""
    def generate():
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")

    def recorded(spatial: bool):
        def run():
            with record_gates(pipe, spatial=spatial) as rec:
                generate()
            return rec
        return run

    return {"off": generate, "recording": recorded(False), "recording + spatial": recorded(True)}


class RssPeak:
    """Peak anonymous RSS above the starting point, sampled every 2 ms in a thread."""

    def __init__(self):
        self.base = self.peak = self._anon()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._anon())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return max(self.peak, self._anon()) - self.base


def memory(run) -> dict:
    gc.collect()
    probe = RssPeak()
    tracemalloc.start()
    rec = run()
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"traced_peak": traced, "rss_peak": probe.stop()}  # generation (and recording) only, no frame
    if rec is not None:
        out["kept"] = rec.nbytes
        out["frame_rows"] = len(rec.frame())
        out["frame_bytes"] = int(rec.frame().memory_usage(deep=True).sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", choices=["auto", "toy", "fixture"], default="auto")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    world = ("toy" if toy_available() else "fixture") if args.world == "auto" else args.world
    with tempfile.TemporaryDirectory() as tmp:
        pipe, what = open_merge(world, Path(tmp))
        pipe.set_progress_bar_config(disable=True)
        runs = modes(pipe, args.steps)
        times = C.interleaved_times(runs, repeats=args.repeats, warmup=1)
        mems = {name: memory(run) for name, run in runs.items()}
        rec = runs["recording"]()
        frame_seconds = C.median_time(rec.frame, repeats=args.repeats)
    sites = len(list(iter_moe_layers(pipe.unet)))
    rows = []
    for name in runs:
        m = mems[name]
        rows.append({"mode": name, "seconds": times[name], "time_ratio": times[name] / times["off"],
                     "traced_mb": C.mb(m["traced_peak"]), "traced_ratio": m["traced_peak"] / mems["off"]["traced_peak"],
                     "rss_mb": C.mb(m["rss_peak"]), "kept_kb": m.get("kept", 0) / 1024, "frame_rows": m.get("frame_rows"),
                     "frame_mb": C.mb(m.get("frame_bytes", 0))})
    print(f"{args.steps}-step generation, guidance batch of 2, {what}, {sites} MoE sites")
    print(C.machine_note())
    print(C.table(rows, [("mode", "mode"), ("seconds", "seconds"), ("time_ratio", "x off"),
                         ("traced_mb", "traced peak MB"), ("traced_ratio", "x off"), ("rss_mb", "RSS peak +MB"),
                         ("kept_kb", "kept KB"), ("frame_rows", "frame rows"), ("frame_mb", "frame MB")]))
    print(f"rec.frame() afterwards: {frame_seconds:.3f} s")


if __name__ == "__main__":
    main()
