"""Inference benchmark: time per denoising step of a merge against its base UNet, next to the
multiply-adds the mixture adds; against segmoe 0.0.4's own pipeline on the same merge folder; the
cross-attention K/V cache; and expert offload (slowdown on a simulated accelerator, and resident
bytes of SegMoE's 4x2 SDXL ``all`` merge at real size by meta-device accounting).

The UNets have the real block structure and depths of the layout at bench widths
(``_common.WIDTHS["medium"]``), a classifier-free-guidance batch of 2, float32, CPU, one thread.
Step times are medians of interleaved runs, so background load falls on base and merge alike.
MACs: the base's are counted by ``torch.utils.flop_counter`` (FLOPs / 2); the mixture's
arithmetic adds ``(k - 1)`` x the MACs of every MoE site (counted by hooks on the base) plus the
gates'; "executed" counts what this kit's merge actually runs (``per_token`` runs Linear sites densely).

Usage::

    .venv/bin/python benchmarks/inference.py                 # ~3.5 minutes on the shared 2-core machine
    .venv/bin/python benchmarks/inference.py --layout sd15 --experts 4 --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import _common as C

torch = C.setup_torch(1)
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from segmoe_lab.merge.discovery import Site, find_sites, get_module, set_module  # noqa: E402
from segmoe_lab.merge.kvcache import cache_cross_kv  # noqa: E402
from segmoe_lab.merge.config import parse_config  # noqa: E402
from segmoe_lab.merge.moe import MoELayer, iter_moe_layers, moe_layer, set_routing  # noqa: E402
from segmoe_lab.merge.routing import ROUTINGS  # noqa: E402
from segmoe_lab.testing import unet_inputs  # noqa: E402



SWITCH = {"include_mid": True, "moe_extra": ["all"], "routing": "per_sample"}  # the toy default's whole-UNet switch


def add_router(unet: nn.Module, n_experts: int, seed: int = 0) -> None:
    """A random prompt router over ``unet``'s text rows: every site follows one decision per sample,
    as in the toy default's switch (with identical text rows, both halves of a guidance batch agree)."""
    from segmoe_lab.merge.prompt_router import PromptRouter, route_unet

    g = torch.Generator().manual_seed(seed)
    route_unet(unet, PromptRouter(torch.randn(n_experts, unet.config.cross_attention_dim, generator=g),
                                  torch.zeros(n_experts), pool="mean"))


def merge_in_memory(base: nn.Module, moe_layers: str, n_experts: int, top_k: int = 1, seed: int = 0,
                    **extra) -> nn.Module:
    """A merged copy of ``base``: each site's experts are seeded perturbations of it; random unit gate
    rows. ``extra``: more config keys (``**SWITCH``: every layer, extra kinds included, per sample)."""
    from segmoe_lab.merge.kinds import extra_layer, find_extra_sites

    merged = copy.deepcopy(base)
    cfg = parse_config({"base_model": "bench", "type": "sd", "moe_layers": moe_layers, "num_experts_per_tok": top_k,
                        "experts": [{"source_model": f"expert_{i}"} for i in range(n_experts)], **extra})
    g = torch.Generator().manual_seed(seed)
    sites = [*find_sites(merged, moe_layers, cfg.include_mid), *find_extra_sites(merged, cfg.moe_extra)]
    with torch.no_grad():
        for s in sites:
            site = get_module(merged, s.path)
            experts = []
            for _ in range(n_experts):
                e = copy.deepcopy(site)
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.pow(2).mean().sqrt())
                experts.append(e)
            gate = nn.Linear(s.in_features, n_experts, bias=False)
            gate.weight.copy_(nn.functional.normalize(torch.randn(n_experts, s.in_features, generator=g), dim=-1))
            factory = moe_layer if isinstance(s, Site) else extra_layer  # segmoe's sites, or an extra kind
            set_module(merged, s.path, factory(experts, cfg, gate))
    return merged.eval()


def guided(inputs: dict) -> dict:
    """``inputs`` as a guidance batch of one prompt: both rows share the text (so the router makes
    one decision for the batch, as diffusers' [negative; prompt] pair does under the kit's router)."""
    text = inputs["encoder_hidden_states"]
    return {**inputs, "encoder_hidden_states": text[:1].expand_as(text).contiguous()}


def count_macs(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


def site_macs(base: nn.Module, inputs: dict, moe_layers: str, n_experts: int) -> tuple[int, int]:
    """``(MACs of one pass through every site, MACs of their gates)``, counted by hooks on the base."""
    totals = [0, 0]

    def hook(module, args, output):
        x = args[0]
        width = x.shape[-1]
        tokens = x.numel() // width
        totals[0] += tokens * sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        totals[1] += tokens * width * n_experts

    handles = [get_module(base, s.path).register_forward_hook(hook) for s in find_sites(base, moe_layers)]
    with torch.no_grad():
        base(**inputs)
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def step_fn(unet, inputs):
    def run():
        with torch.no_grad():
            unet(**inputs)
    return run


def routing_table(base, inputs, args) -> list[dict]:
    base_macs = count_macs(step_fn(base, inputs))
    rows = []
    for moe_layers in args.moe_layers:
        merged = merge_in_memory(base, moe_layers, args.experts)
        sites, gates = site_macs(base, inputs, moe_layers, args.experts)
        configs = [(r, k) for k in args.top_k for r in ROUTINGS if k <= args.experts]
        configs += [(BEFORE, k) for k in args.top_k if k <= args.experts]

        def setting(routing, k):
            def run():
                set_routing(merged, routing.split()[0], k)
                if routing != BEFORE:
                    return step_fn(merged, inputs)()
                # a hook on each gate makes MoELayer run the gate on every token, as before issue 18
                hooks = [layer.gate.register_forward_hook(lambda *a: None) for _, layer in iter_moe_layers(merged)]
                try:
                    step_fn(merged, inputs)()
                finally:
                    for h in hooks:
                        h.remove()
            return run

        fns = {"base": step_fn(base, inputs), **{f"{r} k{k}": setting(r, k) for r, k in configs}}
        times = C.interleaved_times(fns, repeats=args.repeats)
        for routing, k in configs:
            set_routing(merged, routing.split()[0], k)
            executed = count_macs(step_fn(merged, inputs))
            predicted = (base_macs + (k - 1) * sites + gates) / base_macs
            ratio = times[f"{routing} k{k}"] / times["base"]
            rows.append({"moe_layers": moe_layers, "k": k, "routing": routing, "base_ms": 1e3 * times["base"],
                         "merge_ms": 1e3 * times[f"{routing} k{k}"], "time_ratio": ratio, "mac_ratio": predicted,
                         "executed_mac_ratio": executed / base_macs, "vs_macs": ratio / predicted})
        del merged
    return rows


BEFORE = "segmoe (gate on every token, as before)"


def compressed_table(base, inputs, args) -> list[dict]:
    """Step time of ``all`` merges whose experts are compressed (base + rank-r deltas), next to the
    multiply-adds they execute (base projections once, plus the chosen experts' low-rank terms)."""
    from segmoe_lab.merge.lowrank import compress_unet

    base_macs = count_macs(step_fn(base, inputs))
    base_tensors = {k: v.detach() for k, v in base.state_dict().items()}
    rows = []
    for k in [*args.top_k, "switch"]:
        extra = SWITCH if k == "switch" else {}
        top_k = 1 if k == "switch" else k
        full = merge_in_memory(base, "all", args.experts, top_k=top_k, **extra)
        if k == "switch":
            add_router(full, args.experts)
        cfg = parse_config({"base_model": "bench", "type": "sd", "moe_layers": "all", "num_experts_per_tok": top_k,
                            "experts": [{"source_model": f"expert_{i}"} for i in range(args.experts)], **extra})
        merges = {"full experts": full}
        for rank in args.ranks:
            merges[f"rank {rank}"] = copy.deepcopy(full)
            compress_unet(merges[f"rank {rank}"], cfg.updated(compress={"rank": rank}), base_tensors)
        x = inputs if k != "switch" else guided(inputs)
        times = C.interleaved_times({"base": step_fn(base, x), **{n: step_fn(u, x) for n, u in merges.items()}},
                                    repeats=args.repeats)
        for name, unet in merges.items():
            macs = count_macs(step_fn(unet, x)) / count_macs(step_fn(base, x))
            ratio = times[name] / times["base"]
            rows.append({"k": k, "experts": name, "base_ms": 1e3 * times["base"], "merge_ms": 1e3 * times[name],
                         "time_ratio": ratio, "mac_ratio": macs, "vs_macs": ratio / macs})
        del merges, full
    return rows


def kv_cache_table(base, inputs, args) -> list[dict]:
    merged = merge_in_memory(base, "all", args.experts, top_k=min(2, args.experts))
    rows = []
    for name, unet in ((f"{args.experts}x{min(2, args.experts)} all", merged),):  # the base: see the real-size K/V share
        cached = {"hits": 0}

        def with_cache(unet=unet):
            with cache_cross_kv(unet) as c:  # one "generation" of 3 steps: the first computes, 2 reuse
                for _ in range(3):
                    step_fn(unet, inputs)()
                cached["hits"] = c.hits

        def without(unet=unet):
            for _ in range(3):
                step_fn(unet, inputs)()

        t = C.interleaved_times({"plain": without, "cached": with_cache}, repeats=2)
        saved = 1 - count_macs(with_cache) / count_macs(without)
        rows.append({"unet": name, "plain_ms": 1e3 * t["plain"] / 3, "cached_ms": 1e3 * t["cached"] / 3, "macs_saved": saved,
                     "speedup": t["plain"] / t["cached"], "hits": cached["hits"]})
    return rows


def offload_table(base, inputs, args) -> list[dict]:
    from segmoe_lab.merge.offload import enable_expert_offload, resident_bytes_plan

    k = min(2, args.experts)
    merged = merge_in_memory(base, "all", args.experts, top_k=k)
    plan = resident_bytes_plan(merged)
    budget = plan["slots"] // 4
    with torch.no_grad():
        ref = merged(**inputs).sample
    rows = [{"mode": "all experts resident", "slowdown": 1.0, "resident_mb": C.mb(plan["static"] + plan["all_experts"]),
             "moved_mb_per_step": 0.0}]
    for name, kw in ((f"offload, {k} slots/site", {}), (f"offload, slots <= {C.mb(budget):.0f} MB, prefetch", {"max_bytes": budget})):
        twin = copy.deepcopy(merged)
        with enable_expert_offload(twin, "cpu", **kw) as off:
            step_fn(twin, inputs)()  # the first step fills the slots
            before, calls = off.stats().transferred_bytes, [0]

            def offloaded():
                calls[0] += 1
                step_fn(twin, inputs)()

            t = C.interleaved_times({"resident": step_fn(merged, inputs), "offload": offloaded}, repeats=args.repeats)
            st = off.stats()
            with torch.no_grad():
                same = torch.equal(twin(**inputs).sample, ref)
        rows.append({"mode": name, "resident_ms": 1e3 * t["resident"], "step_ms": 1e3 * t["offload"],
                     "slowdown": t["offload"] / t["resident"], "resident_mb": C.mb(st.peak_bytes),
                     "moved_mb_per_step": C.mb(st.transferred_bytes - before) / calls[0], "same_output": same})
        del twin
    return rows


def real_size_offload() -> list[dict]:
    """SegMoE's 4x2 SDXL ``all`` merge at real size, float16, on the meta device: resident bytes."""
    from segmoe_lab.sources import layouts
    from segmoe_lab.merge.config import load_config
    from segmoe_lab.merge.estimate import meta_merge
    from segmoe_lab.merge.offload import ExpertOffload, resident_bytes_plan

    cfg = load_config(C.REPO / "experiments" / "segmoe_4x2.yaml")
    _, unet, _ = meta_merge(layouts.unet_config("sdxl"), cfg)
    unet.half()
    plan = resident_bytes_plan(unet)
    off = ExpertOffload(unet, "meta", storage="meta")
    g = torch.Generator().manual_seed(0)
    off.warm({p: torch.randperm(s.layer.num_experts, generator=g)[: s.layer.top_k].tolist() for p, s in off.sites.items()})
    st = off.stats()
    gib = 2**30
    return [{"what": "merged UNet, all experts resident", "gib": (plan["static"] + plan["all_experts"]) / gib},
            {"what": "merged UNet, expert offload (2 slots/site), by accounting", "gib": st.peak_bytes / gib},
            {"what": "  of which the UNet outside the experts (incl. gates)", "gib": st.static_bytes / gib},
            {"what": "  of which expert slots", "gib": st.slot_bytes / gib}]


def real_size_macs() -> list[dict]:
    """Per-step multiply-adds of SegMoE's published merges at real size (meta device: shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from segmoe_lab.sources import layouts
    from segmoe_lab.merge.config import load_config
    from segmoe_lab.merge.kvcache import cross_kv_projections

    rows = []
    for name, layout, px in (("segmoe_2x1", "sdxl", 1024), ("segmoe_4x2", "sdxl", 1024), ("segmoe_sd_4x2", "sd15", 512)):
        cfg = load_config(C.REPO / "experiments" / f"{name}.yaml")
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(layouts.unet_config(layout))
        ucfg = unet.config
        meta = {"device": "meta"}
        inputs = {"sample": torch.empty(2, 4, px // 8, px // 8, **meta), "timestep": torch.tensor(500.0, **meta),
                  "encoder_hidden_states": torch.empty(2, 77, ucfg.cross_attention_dim, **meta)}
        if ucfg.addition_embed_type == "text_time":
            text_dim = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(2, text_dim, **meta), "time_ids": torch.empty(2, 6, **meta)}
        base = count_macs(step_fn(unet, inputs))
        sites, gates = site_macs(unet, inputs, cfg.moe_layers, cfg.num_experts)
        kv = [0]
        hooks = [m.register_forward_hook(lambda m, a, o: kv.__setitem__(0, kv[0] + a[0].numel() // m.in_features * m.in_features * m.out_features))
                 for _, m in cross_kv_projections(unet)]
        step_fn(unet, inputs)()
        for h in hooks:
            h.remove()
        k = cfg.num_experts_per_tok
        rows.append({"merge": f"{name} ({cfg.num_experts}x{k} {layout} {cfg.moe_layers}, {px}px, CFG)",
                     "base_tmac": base / 1e12, "mac_ratio": (base + (k - 1) * sites + gates) / base,
                     "kv_fraction": kv[0] / base})
    return rows


# --- against segmoe 0.0.4's pipeline on the same folder ------------------------------------------------
# Both UNets in one process of segmoe's env (which also sees segmoe_lab), stepped in turn.
SIDE_BY_SIDE = r"""
import json, statistics, time, torch
from safetensors.torch import load_file
torch.set_num_threads(1)
from segmoe import SegMoEPipeline
from segmoe_lab.merge.io import load_merged_unet
inputs = load_file(INPUTS)
kwargs = {"sample": inputs["sample"], "timestep": inputs["timestep"], "encoder_hidden_states": inputs["encoder_hidden_states"]}
if "text_embeds" in inputs:
    kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
from segmoe_lab.merge.kvcache import cache_cross_kv
unets = {"segmoe-lab": load_merged_unet(FOLDER, torch.float32)[0],
         "segmoe-lab + K/V cache": load_merged_unet(FOLDER, torch.float32)[0],
         "segmoe": SegMoEPipeline(FOLDER, device="cpu", torch_dtype=torch.float32).pipe.unet}
times = {k: [] for k in unets}
with torch.no_grad(), cache_cross_kv(unets["segmoe-lab + K/V cache"]):  # one generation: same text embedding
    outs = {k: u(**kwargs).sample for k, u in unets.items()}
    for _ in range(REPEATS):
        for k, u in unets.items():
            t = time.perf_counter(); u(**kwargs); times[k].append(time.perf_counter() - t)
diff = max((outs[k] - outs["segmoe"]).abs().max().item() for k in outs)
print("RESULT " + json.dumps({"step_s": {k: statistics.median(v) for k, v in times.items()}, "diff": diff}))
"""


def segmoe_table(base, inputs, args, layout: str) -> list[dict]:
    from safetensors.torch import save_file

    from segmoe_lab.merge.config import parse_config
    from segmoe_lab.merge.io import save_merge

    py, note = C.segmoe_python()
    print(note)
    if py is None:
        return []
    k = min(2, args.experts)
    merged = merge_in_memory(base, "all", args.experts, top_k=k)
    pipe = C.bench_pipeline(layout, "medium")
    pipe.register_modules(unet=merged)
    cfg = parse_config({"base_model": "bench-base", "type": "sd" if layout == "sd15" else "sdxl", "moe_layers": "all",
                        "num_experts_per_tok": k, "experts": [{"source_model": f"bench-expert-{i}"} for i in range(args.experts)]})
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        folder = save_merge(pipe, Path(tmp) / "merge", cfg)
        flat = {"sample": inputs["sample"], "timestep": inputs["timestep"].reshape(1),
                "encoder_hidden_states": inputs["encoder_hidden_states"]}
        flat.update(inputs.get("added_cond_kwargs", {}))
        save_file({n: t.contiguous() for n, t in flat.items()}, f"{tmp}/inputs.safetensors")
        head = f"INPUTS = {tmp + '/inputs.safetensors'!r}\nFOLDER = {str(folder)!r}\nREPEATS = {args.repeats + 2}\n"
        r = C.run_child(py, head + SIDE_BY_SIDE)
    seg = r["step_s"]["segmoe"]
    names = {"segmoe-lab": "segmoe-lab (load_merged_unet)", "segmoe-lab + K/V cache": "segmoe-lab + cache_cross_kv",
             "segmoe": "segmoe 0.0.4 (SegMoEPipeline)"}
    return [{"pipeline": label, "step_ms": 1e3 * r["step_s"][key], "vs_segmoe": r["step_s"][key] / seg, "max_abs_diff": r["diff"]}
            for key, label in names.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", default="sdxl", choices=["sdxl", "sd15", "vega", "ssd1b"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--moe-layers", nargs="+", default=["attn", "ff", "all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-segmoe", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="ranks of the compressed-experts table")
    ap.add_argument("--only-moe", action="store_true", help="only the step-time tables (routing, compressed experts)")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(C.bench_unet_config(args.layout, "medium")).eval()
    inputs = unet_inputs(base, batch=2)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"inference: {args.layout} layout at widths {C.WIDTHS['medium'][args.layout][0]} ({n_params / 1e6:.1f} M params), "
          f"latent {base.config.sample_size}x{base.config.sample_size}, batch 2, {args.experts} experts; {C.machine_note()}\n")

    print("step time of the merge / its base UNet, next to the multiply-add ratio of the mixture "
          "(vs_macs = time ratio / MAC ratio; goal <= 1.2)")
    print(C.table(routing_table(base, inputs, args),
                  [("moe_layers", "moe_layers"), ("k", "k"), ("routing", "routing"), ("base_ms", "base ms"),
                   ("merge_ms", "merge ms"), ("time_ratio", "time ratio"), ("mac_ratio", "MAC ratio"),
                   ("vs_macs", "vs_macs"), ("executed_mac_ratio", "executed MACs")]))
    print(f"\n{args.experts}x{{1,2}} all with compressed experts (segmoe routing), and the whole-UNet switch "
          f"({args.experts}x1, every layer kind, per-sample routing): step time next to the multiply-adds they execute "
          "(vs_macs goal <= 1.2)")
    print(C.table(compressed_table(base, inputs, args),
                  [("k", "k"), ("experts", "experts"), ("base_ms", "base ms"), ("merge_ms", "merge ms"),
                   ("time_ratio", "time ratio"), ("mac_ratio", "executed MAC ratio"), ("vs_macs", "vs_macs")]))
    if args.only_moe:
        return
    print("\ncross-attention K/V cache (cache_cross_kv), 3-step generations, ms per step")
    print(C.table(kv_cache_table(base, inputs, args), [("unet", "UNet"), ("plain_ms", "plain ms"), ("cached_ms", "cached ms"),
                                                       ("speedup", "speedup"), ("macs_saved", "MACs saved"),
                                                       ("hits", "cache hits")]))
    print(f"\nexpert offload ({args.experts}x2 all, segmoe routing) on a simulated accelerator ('cpu'; copies are real memcpy, "
          "not PCIe): step time and resident bytes")
    print(C.table(offload_table(base, inputs, args), [("mode", "mode"), ("resident_ms", "resident ms"), ("step_ms", "offload ms"), ("slowdown", "slowdown"),
                                                      ("resident_mb", "resident MB"), ("moved_mb_per_step", "moved MB/step"),
                                                      ("same_output", "same output")]))
    print("\nSegMoE 4x2 SDXL (moe_layers: all) at real size, float16, meta-device accounting (goal <= 12 GB with offload)")
    print(C.table(real_size_offload(), [("what", "what"), ("gib", "GiB")]))
    print("\nreal-size arithmetic of SegMoE's published merges (meta device): base TMACs per step, the MAC ratio "
          "the mixture implies, and the share of cross-attention K/V projections (what cache_cross_kv saves)")
    print(C.table(real_size_macs(), [("merge", "merge"), ("base_tmac", "base TMAC/step"), ("mac_ratio", "MAC ratio"),
                                     ("kv_fraction", "K/V share")]))
    if not args.no_segmoe:
        print(f"\nagainst segmoe 0.0.4 on the same merge folder ({args.experts}x{min(2, args.experts)} all, segmoe routing), "
              f"UNet step, both in one process of segmoe's env, stepped in turn, median of {args.repeats + 2}")
        rows = segmoe_table(base, inputs, args, args.layout)
        if rows:
            print(C.table(rows, [("pipeline", "pipeline"), ("step_ms", "step ms"), ("vs_segmoe", "time / segmoe"),
                                 ("max_abs_diff", "max |out diff|")]))


if __name__ == "__main__":
    main()
