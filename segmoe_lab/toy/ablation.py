"""How much of the experts' gain does a merge keep? Oracles by layer kind and routed merges on held-out toy prompts.

``python -m segmoe_lab.toy.ablation --n 24 --seed 2027`` (or :func:`main`) prints, on ``n``
held-out prompts per domain (:func:`segmoe_lab.toy.quality.eval_prompts` with a fresh seed; never
the shipped prompt set or the experts' gate prompts), ground truth, 15 steps, guidance 3, one seed
per prompt:

* the **model oracle** (each prompt through its own domain's full expert) and the base: the gain
  every other row is normalised by;
* the **site oracle by layer kind**: the base UNet with the prompt's own expert copied in at the
  chosen kinds (a one-expert merge with those kinds), as % of the model oracle's gain with a paired
  bootstrap CI over prompts;
* routed merges (configs given as ``name=overrides``): % of the oracle's gain, Wilcoxon p against
  the base and routing accuracy per site kind (share of prompts whose summed gate logits prefer
  their own domain's expert at that kind, conditional half of the guidance batch).
"""
from __future__ import annotations

import copy
import time
from typing import Optional, Sequence

import numpy as np
import torch

from . import DOMAINS, check, load_pipeline, merge_config, world
from .quality import eval_prompts, generate, paired

HELDOUT_SEED = 2027  # a fresh stream: neither toy.csv, the quality report nor any gate prompt uses it
# the site oracle's rows: kinds copied from the prompt's expert (segmoe's attn+ff sites always)
ORACLE_ROWS = {
    "attn+ff (segmoe sites)": [],
    "+ resnet": ["resnet"],
    "+ proj": ["proj"],
    "+ attn_out": ["attn_out"],
    "+ norm": ["norm"],
    "+ time": ["time"],
    "+ io (conv_in/out, samplers)": ["io"],
    "+ resnet, norm": ["resnet", "norm"],
    "+ resnet, proj, norm, attn_out": ["resnet", "proj", "norm", "attn_out"],
    "all kinds + mid block (= whole UNet)": ["all"],
}


def heldout(n: int, seed: int = HELDOUT_SEED) -> list[dict]:
    """``n`` held-out descriptions per domain, domain by domain."""
    return [d for dom in DOMAINS for d in eval_prompts(dom, n, seed)]


def oracle_unet(base_unet, expert_unet, kinds: Sequence[str], include_mid: bool = False):
    """A copy of ``base_unet`` with ``expert_unet``'s tensors at segmoe's ``all`` sites and the extra ``kinds``.

    Equal to a one-expert merge of ``expert_unet`` with ``moe_layers: all`` and ``moe_extra: kinds``
    (a MoE layer of one expert runs that expert)."""
    from segmoe_lab.merge.discovery import find_sites, site_prefixes
    from segmoe_lab.merge.kinds import find_extra_sites

    sites = [*find_sites(base_unet, "all", include_mid or "all" in kinds), *find_extra_sites(base_unet, kinds)]
    prefixes = site_prefixes(sites)
    unet = copy.deepcopy(base_unet)
    src = expert_unet.state_dict()
    with torch.no_grad():
        for name, t in unet.state_dict().items():
            if name.startswith(prefixes):
                t.copy_(src[name])
    return unet


class RoutingProbe:
    """Sums each MoE layer's gate logits over tokens and steps, per prompt (conditional half)."""

    def __init__(self, unet):
        from segmoe_lab.merge.kinds import SampleMoE, _kind_of
        from segmoe_lab.merge.moe import MoELayer

        self.sums: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(unet.named_modules())
        for path, m in modules.items():
            if isinstance(m, MoELayer):
                kind = _site_kind(path)
            elif isinstance(m, SampleMoE):
                kind = _kind_of(path, m.experts[0], modules[path.rpartition(".")[0]] if "." in path else unet)
            else:
                continue
            self.handles.append(m.gate.register_forward_hook(self._hook(path, kind)))

    def _hook(self, path: str, kind: str):
        def hook(module, args, out):
            s = out.detach().float().sum(dim=1)  # (N, E)
            s = s[s.shape[0] // 2:] if s.shape[0] % 2 == 0 and s.shape[0] > 1 else s  # guidance: [uncond, cond]
            key = (path, kind)
            self.sums[key] = self.sums.get(key, 0) + s
        return hook

    def take(self) -> dict[tuple, np.ndarray]:
        """``{(path, kind): top-1 expert per prompt}`` since the last take."""
        out = {k: v.argmax(-1).numpy() for k, v in self.sums.items()}
        self.sums = {}
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def _site_kind(path: str) -> str:
    if ".attn2.to_k" in path or ".attn2.to_v" in path:
        return "cross-kv"
    if ".attn2.to_q" in path:
        return "cross-q"
    if ".attn1." in path:
        return "self-attn"
    return "ff"


def scores(pipe, descs: list[dict], steps: int = 15, probe: Optional[RoutingProbe] = None):
    """Ground-truth score per description (seed = its index within its domain), and the probe's
    routing choices per prompt when given."""
    out, choices = [], {}
    for dom in DOMAINS:
        ds = [d for d in descs if d["domain"] == dom]
        images = generate(pipe, [world.caption(d) for d in ds], range(len(ds)), steps)
        out += [check(im, d)["score"] for im, d in zip(images, ds)]
        if probe is not None:
            for k, v in probe.take().items():
                choices.setdefault(k, []).append(v)
    return np.array(out), {k: np.concatenate(v) for k, v in choices.items()}


def pct_of_gain(v: np.ndarray, base: np.ndarray, oracle: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple:
    """100 * mean(v - base) / mean(oracle - base), and its paired bootstrap 95% CI over prompts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(reps, len(v)))
    num, den = (v - base)[idx].mean(1), (oracle - base)[idx].mean(1)
    boot = 100 * num / np.where(den == 0, np.nan, den)
    return 100 * (v - base).mean() / (oracle - base).mean(), np.nanpercentile(boot, [2.5, 97.5])


def routing_accuracy(choices: dict, labels: np.ndarray) -> dict[str, float]:
    """Per site kind: the share of (prompt, site) pairs whose top-1 is the prompt's own expert, and the worst site."""
    by_kind: dict[str, list] = {}
    for (path, kind), top in choices.items():
        by_kind.setdefault(kind, []).append(float(np.mean(top == labels)))
    return {k: (float(np.mean(v)), float(np.min(v))) for k, v in by_kind.items()}


def row(name: str, v, base, oracle, descs, acc: Optional[dict] = None) -> dict:
    pct, ci = pct_of_gain(v, base, oracle)
    r = {"variant": name, **{d: float(v[[x["domain"] == d for x in descs]].mean()) for d in DOMAINS},
         "all": float(v.mean()), "pct_oracle": float(pct), "ci_lo": float(ci[0]), "ci_hi": float(ci[1]),
         "p_vs_base": paired(v, base)["wilcoxon_p"] if np.any(v != base) else 1.0}
    for k, (mean, worst) in (acc or {}).items():
        r[f"acc_{k}"] = round(mean, 3)
        r[f"worst_{k}"] = round(worst, 3)
    return r


def run(n: int = 24, seed: int = HELDOUT_SEED, oracle_rows: Optional[dict] = None, merges: Optional[dict] = None,
        steps: int = 15, progress: bool = True, out: Optional[str] = None) -> list[dict]:
    """The table's rows (see the module docstring); ``merges``: name -> overrides of :func:`merge_config`;
    ``out``: a CSV path rewritten after every row (a long run keeps what it measured)."""
    from segmoe_lab.merge.build import build_merge

    torch.set_num_threads(1)
    descs = heldout(n, seed)
    labels = np.array([DOMAINS.index(d["domain"]) for d in descs])
    t0 = time.perf_counter()

    def say(msg):
        if out:
            import pandas as pd

            pd.DataFrame(rows).to_csv(out, index=False)
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    pipe = load_pipeline("base")
    base_unet = pipe.unet
    base, _ = scores(pipe, descs, steps)
    rows: list[dict] = []
    say(f"base {base.mean():.3f}")
    experts = {d: load_pipeline(d).unet for d in DOMAINS}
    oracle = np.zeros(len(descs))
    for d in DOMAINS:
        pipe.unet = experts[d]
        mask = labels == DOMAINS.index(d)
        oracle[mask], _ = scores(pipe, [x for x in descs if x["domain"] == d], steps)
    rows += [row("base", base, base, oracle, descs), row("model oracle", oracle, base, oracle, descs)]
    say(f"model oracle {oracle.mean():.3f}")
    for name, kinds in (ORACLE_ROWS if oracle_rows is None else oracle_rows).items():
        v = np.zeros(len(descs))
        for d in DOMAINS:
            pipe.unet = oracle_unet(base_unet, experts[d], kinds)
            mask = labels == DOMAINS.index(d)
            v[mask], _ = scores(pipe, [x for x in descs if x["domain"] == d], steps)
        rows.append(row(f"site oracle {name}", v, base, oracle, descs))
        say(f"{rows[-1]['variant']}: {rows[-1]['pct_oracle']:.0f}%")
    pipe.unet = base_unet
    for name, overrides in (merges or {}).items():
        merged = build_merge(merge_config(**overrides), progress=False)
        probe = RoutingProbe(merged.unet)
        v, choices = scores(merged, descs, steps, probe)
        probe.close()
        rows.append(row(name, v, base, oracle, descs, routing_accuracy(choices, labels)))
        say(f"{name}: {rows[-1]['pct_oracle']:.0f}%")
    return rows


def table(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    df["% oracle [95% CI]"] = [f"{r.pct_oracle:.0f} [{r.ci_lo:.0f}, {r.ci_hi:.0f}]" for r in df.itertuples()]
    df["p"] = df.p_vs_base.map(lambda p: f"{p:.1g}")
    cols = ["variant", *DOMAINS, "all", "% oracle [95% CI]", "p"] + [c for c in df.columns if c.startswith(("acc_", "worst_"))]
    return df[cols].round(3).to_string(index=False)


def main(n: int = 24, seed: int = HELDOUT_SEED, out: Optional[str] = None) -> None:
    """Print the oracle-by-kind table and the shipped merge presets' rows (``MERGE_PRESETS``)."""
    from . import MERGE_PRESETS

    rows = run(n, seed, merges=MERGE_PRESETS, out=out)
    print(table(rows))


if __name__ == "__main__":
    import typer

    typer.run(main)
