"""Real-size measurements (run by hand, not in CI): peak RSS and wall time of build, load and one
denoising step of SD 1.5 and SDXL merges, full and with compressed experts, next to
``segmoe-lab estimate`` and segmoe 0.0.4.

Models: the real configs of :mod:`segmoe_lab.sources.layouts` (UNet, text encoders, VAE) with seeded
random weights, bfloat16, written tensor by tensor (never a whole model in memory). Experts are
diffusers folders whose UNet is the base's with every weight of rank >= 2 moved by a delta

    D = c * (U diag(s) V^T + N),  s_i = 0.8^i (i < 16),  ||N||_F^2 = 0.1 * ||U diag(s) V^T||_F^2,
    ||D||_F = 0.05 * ||W_0||_F

(U, V: Gaussian with orthonormal-scale columns, N: Gaussian), a rank-16 signal plus noise holding
9 % of the delta's energy, on every weight of rank >= 2 of the UNet (the whole-UNet switch routes them
all). Gates are ``init: random`` (segmoe's hidden-state gates need a generation per expert, out of
reach on a CPU); the switch's prompt router is fitted on the random text encoders. Every measurement runs in a fresh process; a watchdog
kills one whose RSS passes ``--limit-gib`` (the machine is shared), and the row says so. The step is
the UNet alone (random text embeddings; no text encoders or VAE run), batch 1, at ``--latent``.

Usage::

    .venv/bin/python benchmarks/real_size.py --layouts sd15 sdxl --root /tmp/real_size
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import _common as C

ST = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.int64": "I64", "torch.float16": "F16"}
SWITCH = {"include_mid": True, "moe_extra": ["all"], "router": "prompt", "routing": "per_sample"}
# name -> (experts, top-k, moe_layers, other config keys); "switch" is the toy default's whole-UNet switch
CASES = {"2x1 attn": (2, 1, "attn", {}), "4x2 all": (4, 2, "all", {}), "4x1 switch": (4, 1, "all", SWITCH)}


# --- writing random models, tensor by tensor -----------------------------------------------------------
def stream_write(path: Path, shapes: dict, make) -> None:
    """A safetensors file whose tensor ``name`` is ``make(name, shape, dtype)``, made and written one at a time."""
    import torch

    header, offset = {}, 0
    for name, (shape, dtype) in sorted(shapes.items()):
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": ST[str(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in sorted(shapes.items()):
            f.write(make(name, shape, dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)


_POOL = {}


def _pool():
    """2^24 seeded Gaussian samples; every random tensor is a window of it at a name-seeded offset
    (drawing 2.6 B fresh samples per model would take most of an hour on this shared CPU)."""
    import torch

    if "x" not in _POOL:
        _POOL["x"] = torch.randn(2**24 + 2**16, generator=torch.Generator().manual_seed(0))
    return _POOL["x"]


def gaussian(shape, seed: str):
    import torch

    n, pool = int(torch.Size(shape).numel()), _pool()
    out = torch.empty(n)
    start, filled = zlib.crc32(seed.encode()) % 2**16, 0
    while filled < n:  # a window, wrapped around (each wrap shifts by a prime to avoid repeats)
        take = min(n - filled, 2**24)
        out[filled:filled + take] = pool[start:start + take]
        filled, start = filled + take, (start + 7919) % 2**16
    return out.view(shape)


def base_tensor(name: str, shape, dtype):
    """Seeded by name: norms 1, biases 0, position ids counted, weights Gaussian at 1/sqrt(fan-in)."""
    import torch

    if not dtype.is_floating_point:
        return torch.arange(shape[-1], dtype=dtype).expand(shape)
    if len(shape) < 2:
        return (torch.ones if name.endswith("weight") and "norm" in name else torch.zeros)(shape, dtype=dtype)
    fan_in = int(torch.Size(shape[1:]).numel())
    return (gaussian(shape, name) / fan_in ** 0.5).to(dtype)


def expert_tensor(i: int, base_file: Path):
    """Expert ``i``'s UNet tensor: the base's, plus the stated delta on every weight of rank >= 2."""
    from safetensors import safe_open

    f = safe_open(str(base_file), "pt")

    def make(name, shape, dtype):
        import torch

        w0 = f.get_tensor(name)
        if len(shape) < 2:
            return w0
        g = torch.Generator().manual_seed(zlib.crc32(f"{i}:{name}".encode()))
        out, inn = shape[0], int(torch.Size(shape[1:]).numel())
        r = min(16, out, inn)
        s = 0.8 ** torch.arange(r, dtype=torch.float32)
        signal = (torch.randn(out, r, generator=g) / out ** 0.5 * s) @ (torch.randn(r, inn, generator=g) / inn ** 0.5)
        noise = gaussian((out, inn), f"noise {i}:{name}")
        noise *= (0.1 ** 0.5) * signal.norm() / noise.norm()
        d = signal + noise
        d *= 0.05 * w0.float().norm() / d.norm()
        return (w0.float() + d.view(shape)).to(dtype)
    return make


def meta_shapes(module, dtype) -> dict:
    import torch

    return {k: (tuple(v.shape), dtype if v.is_floating_point() else torch.int64) for k, v in module.state_dict().items()}


def write_models(root: Path, layout: str, n_experts: int, distinct: int = 0) -> dict:
    """``root/base`` (whole pipeline) and ``root/expert_<i>`` (UNet + links to the base's other parts).

    ``distinct`` > 0: experts from ``distinct`` on link expert ``i % distinct``'s UNet file (a build
    reads and factors each expert as if distinct; this only saves writing 5 GB per SDXL expert)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from segmoe_lab.sources import layouts
    from segmoe_lab.sources.single_file import write_layout_config

    bf16 = torch.bfloat16
    base = root / "base"
    if not (base / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_layout_config(layout, base)
        with init_empty_weights():
            for name, cfg in layouts.text_encoder_configs(layout).items():
                cls = getattr(transformers, cfg["architectures"][0])
                stream_write(base / name / "model.safetensors", meta_shapes(cls(transformers.CLIPTextConfig(**cfg)), bf16), base_tensor)
            stream_write(base / "vae" / "diffusion_pytorch_model.safetensors",
                         meta_shapes(AutoencoderKL.from_config(layouts.vae_config(layout)), bf16), base_tensor)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(layouts.unet_config(layout))
        stream_write(base / "unet" / "diffusion_pytorch_model.safetensors", meta_shapes(unet, bf16), base_tensor)
    with init_empty_weights():
        shapes = meta_shapes(UNet2DConditionModel.from_config(layouts.unet_config(layout)), bf16)
    experts = []
    for i in range(n_experts):
        folder = root / f"expert_{i}"
        experts.append(folder)
        if (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for part in base.iterdir():
            if part.name != "unet" and not (folder / part.name).exists():
                os.symlink(part, folder / part.name)
        (folder / "unet").mkdir(exist_ok=True)
        shutil.copy(base / "unet" / "config.json", folder / "unet" / "config.json")
        if distinct and i >= distinct:
            os.symlink(experts[i % distinct] / "unet" / "diffusion_pytorch_model.safetensors",
                       folder / "unet" / "diffusion_pytorch_model.safetensors")
            continue
        stream_write(folder / "unet" / "diffusion_pytorch_model.safetensors", shapes,
                     expert_tensor(i, base / "unet" / "diffusion_pytorch_model.safetensors"))
    return {"base": base, "experts": experts}


# --- measured children ---------------------------------------------------------------------------------
def run_watched(python, code: str, limit: int, timeout: int = 3600) -> dict:
    """``_common.run_child``, with a watchdog that kills the child when its RSS passes ``limit`` bytes."""
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(python), "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=C.REPO)
    start, killed = time.time(), False
    while proc.poll() is None:
        try:
            rss = int(next(line for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS:")).split()[1]) * 1024
        except (OSError, StopIteration):
            rss = 0
        if rss > limit or time.time() - start > timeout:
            proc.kill()
            killed = True
        time.sleep(0.2)
    out, err = proc.communicate()
    for line in out.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if killed:
        return {"error": f"killed at the {limit / 2**30:.0f} GiB limit (or timeout)"}
    return {"error": f"failed (rc={proc.returncode}): {err.strip().splitlines()[-1][:200] if err.strip() else ''}"}


BUILD = C.MEMORY_PROBE + r'''
import torch
torch.set_num_threads(1)
from segmoe_lab.merge.build import build_merge
from segmoe_lab.merge.config import parse_config
from segmoe_lab.merge.pipeline import SegMoEPipeline
torch.manual_seed(0)
probe = Probe(); t = time.perf_counter()
pipe = build_merge(parse_config(json.loads(CONFIG)), torch_dtype=torch.bfloat16, progress=False)
m = probe.stop(); m["seconds"] = time.perf_counter() - t; m["hwm"] = _status("VmHWM:")
m["unet_bytes"] = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
if OUT:
    from segmoe_lab.merge.io import save_merge
    save_merge(pipe, OUT, pipe.segmoe_config)
print("RESULT " + json.dumps(m))
'''

LOAD_STEP = C.MEMORY_PROBE + r'''
import gc, torch
torch.set_num_threads(1)
torch.manual_seed(0)
probe = Probe(); t = time.perf_counter()
if SEGMOE:
    from segmoe import SegMoEPipeline
    pipe = SegMoEPipeline(FOLDER, device="cpu", torch_dtype=torch.bfloat16).pipe
else:
    from segmoe_lab.merge.pipeline import SegMoEPipeline
    pipe = SegMoEPipeline(FOLDER, device="cpu", torch_dtype=torch.bfloat16).pipe
unet = pipe.unet
load = probe.stop(); load["seconds"] = time.perf_counter() - t; load["hwm"] = _status("VmHWM:")
load["unet_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
# diffusers maps safetensors files: a weight becomes resident when first read. Read every weight of
# the pipeline once, so "RSS after" is the resident size of the whole loaded pipeline (what
# `estimate --resident` predicts), not of the pages touched so far.
with torch.no_grad():
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                p.float().sum()
gc.collect(); load["rss"] = _status("VmRSS:")
c = unet.config
x = {"sample": torch.randn(1, c.in_channels, LATENT, LATENT, dtype=torch.bfloat16), "timestep": torch.tensor(500),
     "encoder_hidden_states": torch.randn(1, 77, c.cross_attention_dim, dtype=torch.bfloat16)}
if c.addition_embed_type == "text_time":
    x["added_cond_kwargs"] = {"text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, dtype=torch.bfloat16),
                              "time_ids": torch.tensor([[8. * LATENT] * 2 + [0., 0.] + [8. * LATENT] * 2], dtype=torch.bfloat16)}
probe = Probe(); t = time.perf_counter()
with torch.no_grad():
    unet(**x)
step = probe.stop(); step["seconds"] = time.perf_counter() - t; step["hwm"] = _status("VmHWM:")
gc.collect(); step["rss"] = _status("VmRSS:")
print("RESULT " + json.dumps({"load": load, "step": step}))
'''

SEGMOE_BUILD = C.MEMORY_PROBE + r'''
import torch
torch.set_num_threads(1)
from segmoe import SegMoEPipeline
torch.manual_seed(0)
probe = Probe(); t = time.perf_counter()
pipe = SegMoEPipeline(CONFIG_PATH, device="cpu", torch_dtype=torch.bfloat16)
m = probe.stop(); m["seconds"] = time.perf_counter() - t; m["hwm"] = _status("VmHWM:")
print("RESULT " + json.dumps(m))
'''


def merge_config(models: dict, layout: str, n: int, k: int, layers: str, rank, extra: dict) -> dict:
    from segmoe_lab.sources.layouts import model_type

    cfg = {"base_model": str(models["base"]), "type": model_type(layout), "num_experts": n, "num_experts_per_tok": k,
           "moe_layers": layers, "init": "random", "dtype": "bfloat16",
           "experts": [{"source_model": str(e), "positive_prompt": f"expert {i}", "negative_prompt": "blurry"} for i, e in enumerate(models["experts"][:n])],
           **extra}
    if rank:
        cfg["compress"] = {"rank": rank}
    return cfg


def estimated(cfg: dict) -> dict:
    from segmoe_lab.merge.config import parse_config
    from segmoe_lab.merge.estimate import estimate

    e = estimate(parse_config(cfg), runtime=True)
    return {"unet": e.merge_unet * 2, "pipeline": (e.merge_unet + e.others) * 2,  # bfloat16: 2 bytes a parameter
            "resident": e.resident_bytes("bfloat16")}


def gib(b) -> float:
    return None if b is None else b / 2**30


def measure(layout: str, root: Path, args, py_segmoe) -> list[dict]:
    models = write_models(root / layout, layout, max(CASES[c][0] for c in args.cases), args.distinct)
    rows, limit = [], int(args.limit_gib * 2**30)
    for case in args.cases:
        n, k, layers, extra = CASES[case]
        for rank in (args.rank, None):
            cfg = merge_config(models, layout, n, k, layers, rank, extra)
            est = estimated(cfg)
            form = f"rank {rank}" if rank else "full"
            row = {"layout": layout, "case": case, "form": form, "est_unet_gib": gib(est["unet"]), "est_pipe_gib": gib(est["pipeline"]),
                   "est_res_gib": gib(est["resident"])}
            if est["pipeline"] + 2**30 > limit:  # build holds the merged pipeline, plus an expert's site tensors
                rows.append({**row, "what": "build", "note": f"not run: estimate {gib(est['pipeline']):.1f} GiB merged "
                             f"pipeline, over the {args.limit_gib:.0f} GiB cap on this shared machine"})
                continue
            out = root / "merges" / f"{layout}_{case.replace(' ', '_')}_{form.replace(' ', '')}"
            shutil.rmtree(out, ignore_errors=True)
            head = f"CONFIG = {json.dumps(json.dumps(cfg))}\nOUT = {str(out)!r}\n"
            b = run_watched(sys.executable, head + BUILD, limit)
            rows.append({**row, "what": "build", **_cols(b)})
            print(C.table(rows[-1:], COLUMNS), flush=True)
            if "error" in b:
                continue
            ls = run_watched(sys.executable, f"FOLDER = {str(out)!r}\nSEGMOE = False\nLATENT = {args.latent}\n" + LOAD_STEP, limit)
            for what in ("load", "step"):
                rows.append({**row, "what": what, **_cols(ls.get(what, ls))})
            if py_segmoe and not rank and not extra:  # segmoe has no extra layer kinds
                pred = est["unet"] * 3 + est["pipeline"]  # segmoe: fp32 UNet from config + its state dict + the pipeline
                if pred > limit:
                    rows.append({**row, "what": "segmoe load", "note": f"not run: segmoe builds the merged UNet in float32 "
                                 f"and reads the whole state dict (~{gib(pred):.0f} GiB predicted)"})
                else:
                    s = run_watched(py_segmoe, f"FOLDER = {str(out)!r}\nSEGMOE = True\nLATENT = {args.latent}\n" + LOAD_STEP, limit)
                    rows += [{**row, "what": f"segmoe {w}", **_cols(s.get(w, s))} for w in ("load", "step")]
                    import yaml
                    path = root / "merges" / f"segmoe_{layout}_{n}.yaml"
                    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("dtype", "compress", *SWITCH)}))
                    s = run_watched(py_segmoe, f"CONFIG_PATH = {str(path)!r}\n" + SEGMOE_BUILD, limit)
                    rows.append({**row, "what": "segmoe build", **_cols(s)})
            print(C.table(rows[-3:], COLUMNS), flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    return rows


def _cols(r: dict) -> dict:
    if "error" in r:
        return {"note": r["error"]}
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss across fork + exec, so a child's
    # ru_maxrss is at least this script's own peak (which writing the models raises)
    return {"seconds": r["seconds"], "peak_rss_gib": gib(r.get("hwm", r["peak_rss"])), "unet_gib": gib(r.get("unet_bytes")),
            "rss_gib": gib(r.get("rss"))}


COLUMNS = [("layout", "layout"), ("case", "merge"), ("form", "experts"), ("what", "what"), ("seconds", "wall s"),
           ("peak_rss_gib", "peak RSS GiB"), ("rss_gib", "RSS after GiB"), ("unet_gib", "UNet weights GiB"),
           ("est_unet_gib", "estimate UNet GiB"), ("est_pipe_gib", "estimate pipeline GiB"),
           ("est_res_gib", "estimate resident GiB"), ("note", "note")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/real_size"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--latent", type=int, default=8, help="latent side of the measured step (8: 64 px)")
    ap.add_argument("--limit-gib", type=float, default=12.0)
    ap.add_argument("--no-segmoe", action="store_true")
    ap.add_argument("--distinct", type=int, default=0, help="write this many distinct experts; the rest link to them")
    ap.add_argument("--keep", action="store_true", help="keep the models and merges written under --root")
    args = ap.parse_args()
    py, note = (None, "segmoe skipped") if args.no_segmoe else C.segmoe_python()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {note}; {C.machine_note()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        for layout in args.layouts:
            rows += measure(layout, args.root, args, py)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(C.table(rows, COLUMNS))
    problems = goal_misses(rows)
    print("goals (resident estimate within 5 %, build peak <= merged pipeline + 1 GB): "
          + ("all rows meet them" if not problems else "missed: " + "; ".join(problems)))
    sys.exit(1 if problems else 0)


def goal_misses(rows: list[dict]) -> list[str]:
    """The rows that miss the issue's goals: the resident size after loading (every weight read)
    within 5 % of ``estimate --resident``, and a build's peak within the merged pipeline's weights + 1 GB."""
    out = []
    for r in rows:
        name = f"{r['layout']} {r['case']} {r['form']} {r['what']}"
        if r.get("rss_gib") and r["what"] == "load" and abs(r["rss_gib"] / r["est_res_gib"] - 1) > 0.05:
            out.append(f"{name}: resident {r['rss_gib']:.2f} GiB vs estimate {r['est_res_gib']:.2f}")
        if r["what"] == "build" and r.get("peak_rss_gib") and r["peak_rss_gib"] > r["est_pipe_gib"] + 1e9 / 2**30:
            out.append(f"{name}: peak {r['peak_rss_gib']:.2f} GiB > {r['est_pipe_gib']:.2f} + 1 GB")
    return out


if __name__ == "__main__":
    main()
