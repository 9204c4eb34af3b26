"""Build benchmark: the same merge built by segmoe-lab and by segmoe 0.0.4, side by side.

For 2, 4 and 8 experts of one SDXL-layout fixture (real block structure and depths, bench widths;
see ``_common.WIDTHS["build"]``), each build runs in a fresh process that reports its wall and CPU
time and peak memory above its own post-import baseline: peak RSS (``ru_maxrss``: anonymous memory and
mapped weight files) and peak anonymous RSS (sampled every 2 ms). segmoe runs in a throwaway venv
(created by this script when missing; skipped with a message if that fails). segmoe-lab builds
twice: with segmoe's exact gate initialiser (a 25-step generation per expert) and with the cheap
one (``gate.method: fast``, 3 steps). Everything runs in float32 on CPU with one thread.

Usage::

    .venv/bin/python benchmarks/build.py                      # ~3.5 minutes on the shared 2-core machine
    .venv/bin/python benchmarks/build.py --experts 2 4 --moe-layers all
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common as C

OURS = C.MEMORY_PROBE + r'''
import torch, diffusers, transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection
torch.set_num_threads(1)
from segmoe_lab.merge.build import build_merge
from segmoe_lab.merge.config import parse_config
cfg = parse_config(json.loads(CONFIG))
torch.manual_seed(0)
probe = Probe(); t = time.perf_counter()
pipe = build_merge(cfg, progress=False)
seconds = time.perf_counter() - t
m = probe.stop()
m["seconds"] = seconds
m["model_bytes"] = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
print("RESULT " + json.dumps(m))
'''

SEGMOE = C.MEMORY_PROBE + r'''
import os, torch, diffusers, transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection
torch.set_num_threads(1)
from segmoe import SegMoEPipeline
torch.manual_seed(0)
probe = Probe(); t = time.perf_counter()
pipe = SegMoEPipeline(CONFIG_PATH, device="cpu", torch_dtype=torch.float32, variant=None)
seconds = time.perf_counter() - t
m = probe.stop()
m["seconds"] = seconds
print("RESULT " + json.dumps(m))
'''


def run_ours(cfg: dict) -> dict:
    return C.run_child(C.sys.executable, f"CONFIG = {json.dumps(json.dumps(cfg))}\n" + OURS)


def run_segmoe(py, cfg: dict, folder: Path) -> dict:
    import yaml

    path = folder / f"segmoe_{cfg['num_experts']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return C.run_child(py, f"CONFIG_PATH = {str(path)!r}\n" + SEGMOE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layout", default="sdxl", choices=["sdxl", "sd15", "vega"])
    ap.add_argument("--moe-layers", default="attn", choices=["attn", "ff", "all"])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--no-segmoe", action="store_true", help="skip segmoe 0.0.4")
    args = ap.parse_args()
    C.setup_torch(1)
    from segmoe_lab.sources.layouts import model_type

    py, note = (None, "segmoe skipped (--no-segmoe)") if args.no_segmoe else C.segmoe_python()
    print(note)
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        root = Path(tmp)
        fixture = C.write_bench_fixture(root / "fixture", args.layout, max(args.experts), size="build")
        rows = []
        for n in args.experts:
            base = C.merge_dict(fixture, n, model_type(args.layout), moe_layers=args.moe_layers, num_experts_per_tok=args.top_k)
            fast = run_ours({**base, "gate": {"method": "fast"}})
            exact = run_ours({**base, "gate": {"method": "exact", "steps": 25}})
            seg = run_segmoe(py, base, root) if py else None
            for name, r in (("ours fast", fast), ("ours exact", exact), ("segmoe", seg)):
                if r is None:
                    continue
                row = {"experts": n, "build": name, "seconds": r["seconds"], "cpu_s": r["cpu_s"],
                       "peak_rss_mb": C.mb(r["peak_rss"] - r["base_rss"]), "peak_anon_mb": C.mb(r["peak_anon"] - r["base_anon"]),
                       "merged_mb": C.mb(fast["model_bytes"])}
                if seg is not None:
                    row["time_x"] = seg["cpu_s"] / r["cpu_s"]
                    row["rss_ratio"] = (r["peak_rss"] - r["base_rss"]) / (seg["peak_rss"] - seg["base_rss"])
                    row["anon_ratio"] = (r["peak_anon"] - r["base_anon"]) / (seg["peak_anon"] - seg["base_anon"])
                rows.append(row)
    print(f"\nbuild: {args.layout} layout at bench widths {C.WIDTHS['build'][args.layout][0]}, moe_layers={args.moe_layers}, "
          f"top-{args.top_k}; float32, CPU; {C.machine_note()}")
    print("peaks are above each process's post-import baseline; *_ratio = ours / segmoe (lower is better); "
          "time_x = segmoe CPU seconds / ours (higher is better; CPU time, as other jobs share the machine)\n")
    print(C.table(rows, [("experts", "experts"), ("build", "build"), ("seconds", "wall s"), ("cpu_s", "CPU s"), ("time_x", "time_x"),
                         ("peak_rss_mb", "peak RSS MB"), ("rss_ratio", "RSS ratio"), ("peak_anon_mb", "peak anon MB"),
                         ("anon_ratio", "anon ratio"), ("merged_mb", "merged pipeline MB")]))


if __name__ == "__main__":
    main()
