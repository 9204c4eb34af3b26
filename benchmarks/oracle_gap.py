"""How far the toy merge is from its experts: the oracle table of issue 17 on the held-out toy set.

Generates (or reads from the image cache) every prompt of ``toy_heldout`` with the base, each
expert, the shipped toy merge (``experiments/toy.yaml``: moe_layers all, top-1, segmoe routing),
its variants (site oracle, uniform, random, per-sample routing) and the control model, scores
them with the ground-truth checker and writes, under ``--out``:

* ``results.csv``: the comparison's tidy table; ``routing.csv``: per model x prompt x site x expert top-1 shares;
* ``oracle_table.csv`` / ``oracle_table.txt``: mean, gain over base (CI, Wilcoxon p), % of the model
  oracle's gain (paired bootstrap CI), routing accuracy overall and per site kind, collapsed sites;
* ``by_domain.csv``: mean ground truth per model x category (domain).

Without expert labels (``--prompts toy_composition --variants per_sample,uniform,random --models merge,base,experts``)
the table is each model against the base (mean, gain with CI, Wilcoxon p).

Run (one thread: the toy models are tiny and the machine is shared)::

    OMP_NUM_THREADS=1 python benchmarks/oracle_gap.py --out measurements/oracle_gap --n-prompts 120
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="measurements/oracle_gap")
    ap.add_argument("--prompts", default="toy_heldout")
    ap.add_argument("--n-prompts", type=int, default=None, help="default: the whole set")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="model_oracle,site_oracle,per_sample,uniform,random")
    ap.add_argument("--models", default="merge,base",
                    help="comparison models; the model oracle generates each expert on its own prompts only, "
                         "so 'merge,base' skips the experts' off-domain images (add 'experts' for every expert row)")
    ap.add_argument("--cache", default=None, help="image cache (default: <out>/image_cache)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from segmoe_lab import toy
    from segmoe_lab.judge.compare import CompareConfig, run_comparison
    from segmoe_lab.judge.oracle import format_oracle_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    control = toy.paths()["control"]
    t0 = time.perf_counter()
    result = run_comparison(CompareConfig(
        merge=toy.merge_config(), prompts=args.prompts, n_prompts=args.n_prompts, seeds=[args.seed],
        sampling={"steps": args.steps, "guidance_scale": args.guidance}, scorers={"toy_truth": {}},
        models=args.models.split(","), variants=[v for v in args.variants.split(",") if v],
        references={"control": str(control)} if control.is_dir() else {},
        cache_dir=args.cache or str(out / "image_cache"), device="cpu", progress=True))
    elapsed = time.perf_counter() - t0
    result.table.to_csv(out / "results.csv", index=False)
    result.routing().to_csv(out / "routing.csv", index=False)
    if "model_oracle" in set(result.table.model):
        table = result.oracle_table()
        shown = format_oracle_table(table)
    else:  # e.g. the composition set: no expert labels, so every model against the base only
        from segmoe_lab.judge import stats

        table = stats.paired(result.table, reference="base", by_category=False)
        table = table.assign(model=table.model_b, gain=-table["diff"], gain_low=-table.ci_high, gain_high=-table.ci_low)
        table = table[["model", "n_units", "mean_b", "gain", "gain_low", "gain_high", "wilcoxon_p"]].rename(
            columns={"mean_b": "mean", "n_units": "n", "wilcoxon_p": "p_vs_base"})
        shown = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    table.to_csv(out / "oracle_table.csv", index=False)
    by_domain = result.table.pivot_table(index="model", columns="category", values="score", sort=False)
    by_domain.to_csv(out / "by_domain.csv")
    text = (f"{args.prompts}: {len(result.prompts)} prompts ({result.prompts.category.value_counts().to_dict()}), "
            f"seed {args.seed}, {args.steps} steps, guidance {args.guidance}, ground truth (toy_truth); "
            f"{sum(result.generated.values())} images generated in {elapsed:.0f} s\n"
            + "".join(f"note: {n}\n" for n in result.notes)
            + shown + "\n\nmean per category:\n" + by_domain.round(3).to_string() + "\n")
    (out / "oracle_table.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
