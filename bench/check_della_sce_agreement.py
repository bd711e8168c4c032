"""The methods that came through the statistics seam beside mergekit 0.1.5 on small generated models:

    .venv/bin/python bench/check_della_sce_agreement.py      # installs mergekit into .bench/ once

Each case is one mergekit config run by `mergekit-yaml` (computing in float32) and the graft recipe that says
the same thing (written here: the target is mergekit's base_model, one diff per model), on bf16 models and, for
the deterministic cases, on float32 models too (continuous values: no two elements tie at a selection cut).
Per case: the fraction of output elements whose bits differ and the largest difference in output ulps (at
the magnitude of the output or of the base, whichever is larger: where base + delta cancels, float32's
rounding is relative to the operands), over all elements and over those away from a selection tie (where
several elements share the cut value, mergekit's topk / sort picks any of them and graft the first in
element order; under sce that choice also moves the squared norms that weigh the whole tensor, so on bf16
models, where such ties are common, sce is shown but checked on the float32 models only).

- sce (deterministic): bf16 outputs (as the team's agreement check writes them) must agree within 1 ulp on
  the float32 models; exit status 1 otherwise.
- ties with `rescale: true` (mergekit's L1 rescale; deterministic): bf16 outputs within 1 ulp away from ties
  on both families (tied elements share their magnitude: the L1 norm does not depend on which are kept).
- float32 outputs are shown, not checked: sce's weights and the L1 rescale's factor come from whole-tensor
  float32 reductions in mergekit (torch's summation order over the whole tensor), which graft, streaming,
  forms in float64 and rounds once; the weight or factor then differs by an ulp of float32 now and then,
  and a float32 output by a few ulps. ties without a rescale is the control: within 1 ulp there too.
- della, della_linear and dare_linear with `rescale: false` draw at random: graft's draw is its counter-based
  hash, mergekit's torch.bernoulli, so they cannot agree element for element; shown for the kept fraction
  and the outputs' mismatch, not checked.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import BENCH, ensure_mergekit  # noqa: E402
from check_mergekit_agreement import load_dir, make_models, run_mergekit, ulps  # noqa: E402

# (name, mergekit method, per-model parameters, top-level parameters, graft merge, graft diffs, deterministic)
CASES = [
    ("sce select_topk 0.3", "sce", [{}, {}], {"select_topk": 0.3}, {"method": "sce", "select_topk": 0.3}, [{}, {}],
     True),
    ("sce select_topk 1", "sce", [{}, {}], {}, {"method": "sce"}, [{}, {}], True),
    ("ties density 0.3, rescale", "ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.3}],
     {"rescale": True}, {"method": "ties", "density": 0.3, "rescale": True}, [{"weight": 1.0}, {"weight": 0.6}],
     True),
    ("ties density 0.3 (control, no rescale)", "ties", [{"weight": 1.0, "density": 0.3},
                                                       {"weight": 0.6, "density": 0.3}], {},
     {"method": "ties", "density": 0.3}, [{"weight": 1.0}, {"weight": 0.6}], True),
    ("della density 0.5 eps 0.1", "della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                                            {"weight": 0.6, "density": 0.5, "epsilon": 0.1}], {},
     {"method": "della", "density": 0.5, "epsilon": 0.1}, [{"weight": 1.0}, {"weight": 0.6}], False),
    ("della_linear density 0.6", "della_linear", [{"weight": 0.7, "density": 0.6}, {"weight": 0.3, "density": 0.6}],
     {}, {"method": "della_linear", "density": 0.6}, [{"weight": 0.7}, {"weight": 0.3}], False),
    ("dare_linear density 0.5, no rescale", "dare_linear", [{"weight": 1.0, "density": 0.5},
                                                            {"weight": 0.5, "density": 0.5}], {"rescale": False},
     {"method": "sum"}, [{"weight": 1.0, "transform": {"method": "dare", "drop": 0.5, "rescale": False}},
                         {"weight": 0.5, "transform": {"method": "dare", "drop": 0.5, "rescale": False}}], False),
]


def mergekit_config(method: str, models: dict, params: list[dict], top: dict, out_dtype: str) -> str:
    cfg = {"merge_method": method, "base_model": models["base"],
           "models": [{"model": models[n], "parameters": p} for n, p in zip(("ft1", "ft2"), params, strict=True)],
           "dtype": "float32", "out_dtype": out_dtype}
    if top:
        cfg["parameters"] = top
    return yaml.safe_dump(cfg, sort_keys=False)


def run_graft(models: dict, merge: dict, diffs: list[dict], out_dtype: str, out: str) -> None:
    from worker.engine import GraftRequest, run_graft
    from worker.engine.planning.recipe import load_recipe
    from worker.service.settings import Settings

    recipe = load_recipe({"target_base": models["base"], "merge": merge,
                          "options": {"dtype": out_dtype},
                          "diffs": [{"source_base": models["base"], "source_finetuned": models[n], **d}
                                    for n, d in zip(("ft1", "ft2"), diffs, strict=True)]})
    run_graft(GraftRequest(recipe, out), settings=Settings(cache_dir=""))


def ties_at_cut(states: dict, name: str, method: str, params: list[dict], top: dict) -> torch.Tensor:
    """Elements whose fate a tie at a selection cut decides (equal to the cut value of a magnitude or
    variance rank)."""
    base = states["base"][name].float().flatten()
    deltas = [states[n][name].float().flatten() - base for n in ("ft1", "ft2")]
    out = torch.zeros_like(base, dtype=torch.bool)
    values, ks = [], []
    if method == "sce" and top.get("select_topk", 1.0) < 1:
        var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
        values.append(var)
        ks.append(int(torch.count_nonzero(var) * top["select_topk"]))
    elif method == "ties":
        for d, p in zip(deltas, params, strict=True):
            values.append(d.abs())
            ks.append(max(1, int(p["density"] * d.numel())))
    for v, k in zip(values, ks, strict=True):
        if 0 < k < v.numel():
            ordered = torch.sort(v, descending=True).values
            if ordered[k - 1] == ordered[k]:
                out |= v == ordered[k]
    return out.reshape(states["base"][name].shape)


def float32_models(root: str) -> dict[str, str]:
    """The agreement check's family (the same shape and seeds) with float32 weights throughout."""
    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=512, hidden=128, layers=3, intermediate=384, heads=4, kv_heads=2)
    base = llama_state(shape, seed=300, dtype=torch.float32)
    states = {"base": base, "ft1": perturb(base, seed=301), "ft2": perturb(base, seed=302, scale=0.08)}
    return {name: save_checkpoint(os.path.join(root, name), state, shape.config())
            for name, state in states.items()}


def compare(graft: dict, mk: dict, ambiguous: dict, base: dict) -> dict:
    total = differ = differ_clear = 0
    worst = worst_clear = 0.0
    for name, g in graft.items():
        m = mk[name]
        bits = (g.view(torch.int16) != m.view(torch.int16)) if g.dtype == torch.bfloat16 else (
            g.view(torch.int32) != m.view(torch.int32))
        u = ulps(g, m, g.dtype, base[name])
        clear = ~ambiguous[name]
        total += g.numel()
        differ += int(bits.sum())
        differ_clear += int((bits & clear).sum())
        worst = max(worst, float(u.max()))
        worst_clear = max(worst_clear, float(u[clear].max()) if clear.any() else 0.0)
    return {"mismatch": differ / total, "max_ulps": worst, "mismatch_clear": differ_clear / total,
            "max_ulps_clear": worst_clear, "only_one": sorted(set(graft) ^ set(mk))}


def main() -> int:
    os.makedirs(BENCH, exist_ok=True)
    exe = ensure_mergekit()
    tmp = tempfile.mkdtemp(prefix="della-sce-", dir=BENCH)
    failed = False
    try:
        families = {"bf16": make_models(os.path.join(tmp, "bf16")),
                    "f32": float32_models(os.path.join(tmp, "f32"))}
        print(f"{'case (mergekit computing in float32)':<58} {'mismatch':>9} {'max ulps':>9} | "
              f"{'away from ties':>22}")
        for i, (label, method, params, top, merge, diffs, exact) in enumerate(CASES):
            for family, models in families.items() if exact else [("bf16", families["bf16"])]:
                states = {n: load_dir(p) for n, p in models.items()}
                ambiguous = {n: ties_at_cut(states, n, method, params, top) for n in states["base"]}
                for out_dtype in ("bfloat16", "float32") if exact else ("bfloat16",):
                    checked = exact and out_dtype == "bfloat16" and (family == "f32" or method != "sce")
                    out_g, out_m = (os.path.join(tmp, f"{i}-{family}-{out_dtype}-{t}") for t in ("graft", "mk"))
                    run_graft(models, merge, diffs, out_dtype, out_g)
                    run_mergekit(exe, mergekit_config(method, models, params, top, out_dtype), out_m)
                    r = compare(load_dir(out_g), load_dir(out_m), ambiguous, states["base"])
                    name = f"{label}, {family} in, {out_dtype} out" + ("" if exact else " (random draw)")
                    print(f"{name:<58} {r['mismatch']:>9.2e} {r['max_ulps']:>9.1f} | {r['mismatch_clear']:>9.2e} "
                          f"{r['max_ulps_clear']:>6.1f} ulps" + ("" if checked or not exact else "  (not checked)")
                          + (f"  only in one: {r['only_one']}" if r["only_one"] else ""))
                    if checked and (r["max_ulps_clear"] > 1.0 or r["only_one"]):
                        failed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("FAILED: a checked deterministic case differs by more than 1 ulp away from selection ties" if failed else
          "agree: sce and ties with rescale within 1 ulp of mergekit's float32 run away from selection ties")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
