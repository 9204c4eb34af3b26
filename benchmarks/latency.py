"""Latency table in the style of Segmind's Vega comparison: seconds per image for the SD 1.5,
SDXL and Segmind Vega layout fixtures and their 4x2 ``all`` merges, eager, eager with the
cross-attention K/V cache, and ``torch.compile``d.

The fixtures are ``segmoe_lab.testing``'s tiny pipelines (real block structure and depths, tiny
widths, 64x64 images), so absolute times are dominated by per-module overhead, not arithmetic;
the ratios between columns are what this table shows. Compilation is regional
(``unet.compile_repeated_blocks(fullgraph=True)``: every transformer block, MoE layers included,
compiled without graph breaks; identical blocks share code), and its one-off cost is listed apart
(it is much lower once Inductor's on-disk cache holds the kernels from an earlier run).
float32, CPU, one thread; medians of interleaved runs.

Usage::

    .venv/bin/python benchmarks/latency.py                   # ~2 minutes
    .venv/bin/python benchmarks/latency.py --layouts sd15 --steps 25 --no-compile
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import _common as C

torch = C.setup_torch(1)

from segmoe_lab.merge.build import build_merge  # noqa: E402
from segmoe_lab.merge.kvcache import cache_cross_kv  # noqa: E402
from segmoe_lab.testing import make_pipeline, write_fixture_set  # noqa: E402


def generate(pipe, steps: int, cache: bool = False):
    def run():
        kw = dict(num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0))
        if cache:
            with cache_cross_kv(pipe):
                return pipe("a photo of a red cat", **kw).images
        return pipe("a photo of a red cat", **kw).images
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["sd15", "sdxl", "vega"], choices=["sd15", "sdxl", "vega", "ssd1b"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64  # one entry per distinct block shape
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        for layout in args.layouts:
            fs = write_fixture_set(f"{tmp}/{layout}", layout, n_experts=args.experts)
            base = make_pipeline(layout)
            merge = build_merge(fs.config(moe_layers="all", num_experts_per_tok=args.top_k, init="random"), progress=False)
            merge.scheduler = copy.deepcopy(base.scheduler)  # same sampler for both
            merge.set_progress_bar_config(disable=True)
            name = f"{args.experts}x{args.top_k} all merge"
            fns = {}
            for label, pipe in (("base", base), (name, merge)):
                fns[(label, "eager")] = generate(pipe, args.steps)
                fns[(label, "kv")] = generate(pipe, args.steps, cache=True)
            times = C.interleaved_times(fns, repeats=args.repeats)
            compiled, compile_s = {}, {}
            if not args.no_compile:
                for label, pipe in (("base", base), (name, merge)):
                    torch._dynamo.reset()
                    t = time.perf_counter()
                    try:
                        pipe.unet.compile_repeated_blocks(fullgraph=True)
                        generate(pipe, args.steps)()
                        compile_s[label] = time.perf_counter() - t
                        compiled[label] = C.median_time(generate(pipe, args.steps), repeats=args.repeats)
                    except Exception as err:  # no C++ compiler, unsupported op, ...
                        print(f"{layout} {label}: torch.compile failed: {type(err).__name__}: {str(err)[:200]}")
            for label, pipe in (("base", base), (name, merge)):
                eager = times[(label, "eager")]
                rows.append({"layout": layout, "model": label,
                             "params": f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M",
                             "eager": eager, "kv": times[(label, "kv")], "kv_x": eager / times[(label, "kv")],
                             "compiled": compiled.get(label), "compile_x": eager / compiled[label] if label in compiled else None,
                             "compile_s": compile_s.get(label),
                             "vs_base": eager / times[("base", "eager")]})
            del base, merge
    print(f"\nlatency: seconds per 64x64 image, {args.steps} steps, guidance on (batch 2), tiny fixtures; {C.machine_note()}")
    print("kv_x / compile_x = eager seconds / that column's (higher is better); vs_base = eager merge / eager base\n")
    print(C.table(rows, [("layout", "layout"), ("model", "model"), ("params", "UNet params"), ("eager", "eager s"),
                         ("vs_base", "vs base"), ("kv", "kv-cache s"), ("kv_x", "kv_x"), ("compiled", "compiled s"),
                         ("compile_x", "compile_x"), ("compile_s", "compile once s")]))


if __name__ == "__main__":
    main()
