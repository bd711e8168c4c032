"""graft's recipes beside mergekit 0.1.5 on small generated models: do both tools write the same merge?

    .venv/bin/python bench/check_mergekit_agreement.py          # installs mergekit into .bench/ once

For task_arithmetic (normalize false), ties and breadcrumbs, one mergekit config is run by both tools
(`mergekit-yaml CONFIG` and graft's `--mergekit-config` mapping of the same file), with mergekit computing in
float32 and in bfloat16 (its `dtype`); outputs are bf16. Per case: the fraction of output elements whose
bits differ and the largest difference in output ulps, over all elements and over the elements away from a
magnitude threshold tie (where several |delta| equal the cut value, mergekit's sort picks any of them and
graft the first in element order), and each tool's largest error against a float64 reference written here
(ranks by |delta| with ties taken in element order, i.e. graft's documented rule).

Exit status 1 when, with mergekit computing in float32, an element away from a threshold tie differs by
more than 1 ulp: both tools then do the same float32 arithmetic and round once, so they must agree.
A last case checks a weight list: an imported config follows mergekit's conventions (every tensor outside
the layer loop at the list's first value), so no tensor may differ by more than 1 ulp there either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import BENCH, ensure_mergekit  # noqa: E402

_PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


# --- models and runs ------------------------------------------------------------------------------------

def make_models(root: str) -> dict[str, str]:
    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=512, hidden=128, layers=3, intermediate=384, heads=4, kv_heads=2)
    base = llama_state(shape, seed=300)
    states = {"base": base, "ft1": perturb(base, seed=301), "ft2": perturb(base, seed=302, scale=0.08)}
    return {name: save_checkpoint(os.path.join(root, name), state, shape.config())
            for name, state in states.items()}


def config_text(method: str, models: dict[str, str], params: list[dict], dtype: str, top: dict | None = None) -> str:
    import yaml

    cfg = {"merge_method": method, "base_model": models["base"],
           "models": [{"model": models[n], "parameters": p} for n, p in zip(("ft1", "ft2"), params, strict=True)],
           "dtype": dtype, "out_dtype": "bfloat16"}
    if top:
        cfg["parameters"] = top
    return yaml.safe_dump(cfg, sort_keys=False)


def run_mergekit(exe: str, cfg: str, out: str) -> None:
    path = out + ".yml"
    with open(path, "w") as fh:
        fh.write(cfg)
    proc = subprocess.run([exe, path, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed: {proc.stderr[-3000:]}")


def run_graft(cfg: str, out: str) -> None:
    from worker.engine import GraftRequest, run_graft
    from worker.engine.planning.mergekit_config import recipe_from_mergekit
    from worker.service.settings import Settings

    run_graft(GraftRequest(recipe_from_mergekit(cfg), out), settings=Settings())


def load_dir(directory: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


# --- the float64 reference (graft's documented rules, written independently) ------------------------------

def cut_ranks(method: str, numel: int, p: dict) -> tuple[int, int]:
    """The window of descending |delta| ranks kept: [low, high)."""
    density = p.get("density", 1.0)
    if method == "task_arithmetic" or density >= 1:
        return 0, numel
    if method == "ties":
        return 0, max(1, int(density * numel))
    keep, top = int(density * numel), int(p.get("gamma", 0.01) * numel)
    bottom = max(0, numel - keep - top)  # mergekit drops fewer outliers rather than keep less
    return numel - bottom - keep, numel - bottom


def reference(method: str, base: torch.Tensor, fts: list[torch.Tensor], params: list[dict],
              top: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 output, mask of the elements where a tie decides: an ambiguous magnitude cut of some diff, or
    a TIES vote whose sum is zero up to float32 rounding, where the rounding of the weights picks the sign)."""
    b = base.double().flatten()
    kept, ambiguous = [], torch.zeros_like(b, dtype=torch.bool)
    for ft, p in zip(fts, params, strict=True):
        d = ft.double().flatten() - b
        mag = d.float().abs()
        order = torch.sort(-mag, stable=True).indices
        low, high = cut_ranks(method, d.numel(), p)
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[order[low:high]] = True
        ordered = mag[order]
        for cut in (low, high):
            if 0 < cut < d.numel() and ordered[cut - 1] == ordered[cut]:
                ambiguous |= mag == ordered[cut]
        kept.append(torch.where(keep, d, 0.0) * p["weight"])
    stack = torch.stack(kept)
    if method == "ties":
        total = stack.sum(0)
        ambiguous |= (total.abs() <= 2.0**-20 * stack.abs().sum(0)) & (stack != 0).any(0)
        sign = torch.where(total >= 0, 1.0, -1.0).double()
        joins = (stack != 0) & (torch.sign(stack) == sign)
        weights = torch.tensor([p["weight"] for p in params], dtype=torch.float64)[:, None]
        divisor = (joins * weights).sum(0)
        mixed = (stack * joins).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = stack.sum(0)
    return (b + top.get("lambda", 1.0) * mixed).reshape(base.shape), ambiguous.reshape(base.shape)


# --- comparison -----------------------------------------------------------------------------------------

def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|a - b| in ulps of `dtype` at max(|a|, |b|, |scale|) (float64 arithmetic). `scale` (the base) keeps
    a result that cancels to about zero from being measured in the ulps of a tiny number: float32's
    rounding there is relative to the operands, not to the result."""
    size = torch.maximum(a.double().abs(), b.double().abs())
    if scale is not None:
        size = torch.maximum(size, scale.double().abs())
    _, exp = torch.frexp(size)
    step = torch.ldexp(torch.ones_like(size), (exp.clamp(min=-125) - _PRECISION[dtype]).to(torch.int64))
    return (a.double() - b.double()).abs() / step


def compare(graft: dict, mk: dict, refs: dict, base: dict) -> dict:
    names = sorted(set(graft) & set(mk))
    total = mismatched = mismatched_clear = 0
    worst = worst_clear = graft_err = mk_err = 0.0
    for name in names:
        g, m = graft[name], mk[name]
        ref, ambiguous = refs[name]
        diff = g.view(torch.int16) != m.view(torch.int16) if g.dtype == m.dtype else torch.ones_like(g, dtype=bool)
        u = ulps(g, m, g.dtype)
        clear = ~ambiguous
        total += g.numel()
        mismatched += int(diff.sum())
        mismatched_clear += int((diff & clear).sum())
        worst = max(worst, float(u.max()))
        worst_clear = max(worst_clear, float(u[clear].max()) if clear.any() else 0.0)
        graft_err = max(graft_err, float(ulps(g, ref, g.dtype, base[name])[clear].max()))
        mk_err = max(mk_err, float(ulps(m, ref, m.dtype, base[name])[clear].max()))
    return {"tensors": len(names), "only_one": sorted(set(graft) ^ set(mk)), "elements": total,
            "mismatch": mismatched / total, "max_ulps": worst, "mismatch_clear": mismatched_clear / total,
            "max_ulps_clear": worst_clear, "graft_vs_f64": graft_err, "mergekit_vs_f64": mk_err}


CASES = [
    ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}], {"normalize": False}),
    ("ties", [{"weight": 1.0, "density": 0.2}, {"weight": 0.6, "density": 0.2}], {}),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.5, "gamma": 0.05}, {"weight": 0.8, "density": 0.3}], {}),
    # gamma + density past 1 (fewer outliers dropped, the case), and int(gamma * n) = 0 on the norms
    ("breadcrumbs", [{"weight": 1.0, "density": 0.7, "gamma": 0.4}, {"weight": 0.8, "density": 0.3,
                                                                     "gamma": 0.005}], {}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    os.makedirs(BENCH, exist_ok=True)
    exe = ensure_mergekit()
    tmp = tempfile.mkdtemp(prefix="agreement-", dir=BENCH)
    failed = False
    try:
        models = make_models(os.path.join(tmp, "models"))
        states = {n: load_dir(p) for n, p in models.items()}
        print(f"{'case':<41} {'mismatch':>9} {'max ulps':>9} | {'away from ties':>24} | "
              f"{'graft/f64':>9} {'mk/f64':>7}")
        for case, (method, params, top) in enumerate(CASES):
            refs = {name: reference(method, states["base"][name], [states["ft1"][name], states["ft2"][name]],
                                    params, top) for name in states["base"]}
            for dtype in ("float32", "bfloat16"):
                cfg = config_text(method, models, params, dtype, top)
                out_g, out_m = (os.path.join(tmp, f"{case}-{method}-{dtype}-{tool}") for tool in ("graft", "mk"))
                run_graft(cfg, out_g)
                run_mergekit(exe, cfg, out_m)
                r = compare(load_dir(out_g), load_dir(out_m), refs, states["base"])
                label = f"{case}: {method} (mergekit dtype {dtype})"
                print(f"{label:<41} {r['mismatch']:>9.2e} {r['max_ulps']:>9.1f} | "
                      f"{r['mismatch_clear']:>11.2e} {r['max_ulps_clear']:>8.1f} ulps | "
                      f"{r['graft_vs_f64']:>9.2f} {r['mergekit_vs_f64']:>7.2f}"
                      + (f"  only in one: {r['only_one']}" if r["only_one"] else ""))
                if dtype == "float32" and (r["max_ulps_clear"] > 1.0 or r["only_one"]):
                    failed = True
        line, differ = weight_list_agreement(exe, models, tmp)
        print(line)
        failed |= bool(differ)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("FAILED: float32 outputs differ by more than 1 ulp away from threshold ties" if failed else
          "agree: with float32 compute, every element away from a magnitude threshold tie within 1 ulp")
    return 1 if failed else 0


def weight_list_agreement(exe: str, models: dict, tmp: str) -> tuple[str, list[str]]:
    """A weight list, float32 compute: the tensors differing by more than 1 ulp (none: the ends agree)."""
    params = [{"weight": [0.2, 1.0]}, {"weight": 0.5}]
    cfg = config_text("task_arithmetic", models, params, "float32")
    out_g, out_m = os.path.join(tmp, "gradient-graft"), os.path.join(tmp, "gradient-mk")
    run_graft(cfg, out_g)
    run_mergekit(exe, cfg, out_m)
    g, m = load_dir(out_g), load_dir(out_m)
    differ = sorted(n for n in g if n in m and float(ulps(g[n], m[n], g[n].dtype).max()) > 1.0)
    return (f"weight list [0.2, 1.0] (task_arithmetic, mergekit dtype float32): tensors differing by > 1 ulp: "
            f"{differ or 'none'}", differ)


if __name__ == "__main__":
    sys.exit(main())
