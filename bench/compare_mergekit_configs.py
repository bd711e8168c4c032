"""mergekit configs as users write them, through mergekit 0.1.5 and through graft, on tiny stand-in models.

    .venv/bin/python bench/compare_mergekit_configs.py            # installs mergekit into .bench/ once
    .venv/bin/python bench/compare_mergekit_configs.py --graft-root /work/main   # another checkout's graft

Every bench/mergekit_configs/*.yml (written in the styles of mergekit's examples/, docs/ and README) names
its models as bare names (`base`, `ft1`, ...), which both tools read as local directories: both run with the
generated models' directory as their working directory. The models are Llama-shaped (4 layers, float32 or
bf16 matrices, float32 norms) with real tokenizers: `ft_chat` adds two tokens (and rows) to the base's vocabulary,
`ft_swapped` numbers two tokens the other way round.

So that both tools do the same arithmetic, each config is run with `dtype: float32` (mergekit's compute
dtype) and its own `out_dtype` (else its `dtype`, else float32) as the stored dtype, by both tools. A comment
line `# bench-stage: NAME` picks a stage of a multi-stage file (graft's `stage`; mergekit runs that document).

Per config: accepted, or graft's refusal (conversion or planning); for accepted configs that mergekit also
runs, deterministic methods are compared element by element (the share within 1 ulp of the stored dtype and
the largest difference in ulps), random ones (dare, della) by statistics only: the share of elements the merge
moved off the base, and the L1 norm of the merged delta, graft over mergekit. Elements a tie decides (an
|delta| equal to a magnitude cut's value where it straddles the cut: mergekit's unstable sort keeps any of
them, graft the first in element order; a TIES vote cancelling within float32's rounding) are counted apart,
from graft's manifest. The summary line counts accepted configs and agreeing ones (deterministic, >= 99% of
elements within 1 ulp). Exit status 1 when an accepted deterministic config disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(HERE, "mergekit_configs")
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
MODELS = ("base", "ft1", "ft2", "ft3", "ft_chat", "ft_swapped")


def tokenizer_files(tokens: list[str], marker: str) -> dict:
    """A word-level fast tokenizer over `tokens` (ids in list order), loadable by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                                      "chat_template": "{{ '" + marker + "' }}", **special},
            "special_tokens_map.json": special}


def make_models(root: str, dtype: torch.dtype) -> None:
    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=256, hidden=64, layers=4, intermediate=128, heads=4, kv_heads=2)
    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, shape.vocab))]
    swapped = list(words)
    swapped[10], swapped[11] = swapped[11], swapped[10]
    base = llama_state(shape, seed=500, dtype=dtype)
    made = {"base": (base, words), "ft1": (perturb(base, seed=501), words),
            "ft2": (perturb(base, seed=502, scale=0.08), words), "ft3": (perturb(base, seed=503, scale=0.03), words),
            "ft_chat": (perturb(base, seed=504, extra_rows=2), [*words, "<|im_start|>", "<|im_end|>"]),
            "ft_swapped": (perturb(base, seed=505), swapped)}
    for name, (state, vocab) in made.items():
        save_checkpoint(os.path.join(root, name), state, shape.config(vocab=len(vocab)),
                        tokenizer=tokenizer_files(vocab, name))


def documents(text: str) -> tuple[list[dict], str | None]:
    stage = re.search(r"^# bench-stage: *(\S+)", text, re.M)
    return list(yaml.safe_load_all(text)), stage.group(1) if stage else None


def for_float32(doc: dict) -> dict:
    """The config computing in float32 (mergekit's dtype), stored as it says."""
    doc = dict(doc)
    stored = doc.get("out_dtype") or doc.get("dtype")
    doc["dtype"] = "float32"
    if stored:
        doc["out_dtype"] = stored
    return doc


def run_graft(docs: list[dict], stage: str | None, out: str) -> str | None:
    """graft's refusal, or None once it wrote the merge."""
    from worker.engine import GraftError, GraftRequest, run_graft
    from worker.engine.planning.mergekit_config import recipe_from_mergekit
    from worker.service.settings import Settings

    text = yaml.safe_dump_all([for_float32(d) for d in docs], sort_keys=False)
    try:
        recipe = recipe_from_mergekit(text, stage=stage) if stage else recipe_from_mergekit(text)
        make = getattr(GraftRequest, "from_recipe", None)  # older checkouts: the three-field request first
        run_graft(make(recipe, out) if make else GraftRequest(recipe, out), settings=Settings())
    except GraftError as err:
        return f"[{err.code}] {err.message}"
    except TypeError as err:  # an older graft without `stage`
        return f"TypeError: {err}"
    return None


def run_mergekit(exe: str, docs: list[dict], stage: str | None, out: str) -> str | None:
    """mergekit's failure, or None once it wrote the merge."""
    doc = next(d for d in docs if d.get("name") == stage) if stage else docs[0]
    if len(docs) > 1 and not stage:
        return "a multi-stage file (mergekit-multi)"
    path = out + ".yml"
    with open(path, "w") as fh:
        yaml.safe_dump(for_float32({k: v for k, v in doc.items() if k != "name"}), fh, sort_keys=False)
    proc = subprocess.run([exe, path, out, "--random-seed", "0", "--no-write-model-card", "--quiet"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return None


def load_dir(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(name))
    return out


def ambiguous(manifest: dict, name: str, inputs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """Elements where a tie decides (None: none): an |delta| equal to a magnitude cut's value where that value
    straddles the cut (mergekit's unstable sort keeps any of the equal ones, graft the first in element order),
    or a TIES vote whose sum is zero within float32's rounding (where rounding picks the sign)."""
    from worker.engine.methods import TRANSFORMS

    merge = manifest["tensors"].get(name, {}).get("merge")
    if merge is None:
        return None
    diffs = manifest["recipe"]["diffs"]
    mask, votes = None, []
    for use in merge["diffs"]:
        d = diffs[use["diff"]]
        base, ft = inputs[d["source_base"]][name], inputs[d["source_finetuned"]][name]
        rows = min(base.shape[0], ft.shape[0])
        delta = (ft[:rows].float() - base[:rows].float()).flatten()
        votes.append(delta.double() * use["weight"])
        t = use["transform"]
        window = TRANSFORMS[t["method"]].window(TRANSFORMS[t["method"]].Params.model_validate(t), delta.numel()) \
            if t and t["method"] in ("magnitude", "breadcrumbs") else None
        if window is None:
            continue
        ordered = torch.sort(delta.abs(), descending=True).values
        for cut in (window.low, window.high):
            if 0 < cut < delta.numel() and ordered[cut - 1] == ordered[cut]:
                hit = delta.abs() == ordered[cut]
                mask = hit if mask is None else mask | hit
    if merge["method"] in ("ties", "dare_ties") and votes:
        stack = torch.stack(votes)
        near = (stack.sum(0).abs() <= 2.0**-20 * stack.abs().sum(0)) & (stack != 0).any(0)
        mask = near if mask is None else mask | near
    return mask


def compare(graft: str, mk: str, inputs: dict[str, dict[str, torch.Tensor]]) -> dict:
    from check_mergekit_agreement import ulps

    g, m = load_dir(graft), load_dir(mk)
    manifest = _json(os.path.join(graft, "graft-manifest.json"))
    names = sorted(set(g) & set(m))
    total = within = clear_total = clear_within = 0
    worst = 0.0
    for name in names:
        if g[name].shape != m[name].shape or g[name].dtype != m[name].dtype:
            total += m[name].numel()
            worst = float("inf")
            continue
        u = ulps(g[name], m[name], g[name].dtype)
        total += u.numel()
        within += int((u <= 1.0).sum())
        worst = max(worst, float(u.max()))
        flat = u.reshape(-1)
        decided = torch.zeros_like(flat, dtype=torch.bool)
        tie = ambiguous(manifest, name, inputs)
        if tie is not None:
            decided[:tie.numel()] = tie  # the rows every input has come first
        clear_total += int((~decided).sum())
        clear_within += int(((flat <= 1.0) & ~decided).sum())
    vocab = [_json(os.path.join(d, "config.json")).get("vocab_size") for d in (graft, mk)]
    return {"share": within / total if total else 0.0, "max_ulps": worst, "only_one": sorted(set(g) ^ set(m)),
            "vocab": vocab, "clear": clear_within / clear_total if clear_total else 0.0, "ties": total - clear_total}


def _json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def moved(out: str, base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Share of elements off the base, and the merged delta's L1 norm, over the tensors both hold."""
    state = load_dir(out)
    changed = count = 0
    l1 = 0.0
    for name, t in state.items():
        b = base[name].to(t.dtype)
        if b.shape != t.shape:
            continue
        changed += int((t != b).sum())
        count += t.numel()
        l1 += float((t.double() - b.double()).abs().sum())
    return changed / count, l1


def method_of(docs: list[dict], stage: str | None) -> str:
    doc = next((d for d in docs if d.get("name") == stage), docs[0]) if stage else docs[0]
    return str(doc.get("merge_method"))


def one(path: str, exe: str, tmp: str, inputs: dict) -> dict:
    name = os.path.basename(path)[:-4]
    with open(path) as fh:
        docs, stage = documents(fh.read())
    out_g, out_m = os.path.join(tmp, name + "-graft"), os.path.join(tmp, name + "-mk")
    refusal = run_graft(docs, stage, out_g)
    row = {"config": name, "method": method_of(docs, stage), "accepted": refusal is None, "refusal": refusal}
    if refusal is not None:
        return row
    row["mergekit"] = run_mergekit(exe, docs, stage, out_m)
    if row["mergekit"] is not None:
        return row
    if row["method"] in RANDOM:
        base = inputs[os.path.abspath("base")]
        row["random"] = (*moved(out_g, base), *moved(out_m, base))
    else:
        row.update(compare(out_g, out_m, inputs))
    return row


def line(row: dict) -> str:
    head = f"{row['config']:<38} {row['method']:<16}"
    if not row["accepted"]:
        return f"{head} refused: {row['refusal']}"
    if row.get("mergekit"):
        return f"{head} accepted; mergekit failed: {row['mergekit']}"
    if "random" in row:
        gs, gl, ms, ml = row["random"]
        return (f"{head} accepted; random (not compared bit for bit): moved off the base graft {gs:.3f} / "
                f"mergekit {ms:.3f} of elements, merged delta L1 graft/mergekit {gl / ml if ml else 0:.3f}")
    extra = f"; only in one: {row['only_one']}" if row["only_one"] else ""
    extra += f"; vocab_size {row['vocab'][0]} vs {row['vocab'][1]}" if row["vocab"][0] != row["vocab"][1] else ""
    ties = (f" (away from {row['ties']} tie-decided elements: {row['clear'] * 100:.3f}%)" if row["ties"] else "")
    return f"{head} accepted; within 1 ulp {row['share'] * 100:7.3f}%, max {row['max_ulps']:.1f} ulp{ties}{extra}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graft-root", default=ROOT, help="the checkout whose graft runs (default: this one)")
    ap.add_argument("--only", default="", help="a substring of the configs to run")
    ap.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the stand-ins' matrices (norms are float32): bf16 deltas repeat magnitudes, and at a "
                    "magnitude threshold mergekit's unstable sort keeps any of the equal ones")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from bench_engine import BENCH, ensure_mergekit  # (puts this checkout first on the path)

    sys.path.insert(0, os.path.abspath(args.graft_root))
    import worker

    print(f"graft from {os.path.dirname(os.path.dirname(worker.__file__))}")

    os.makedirs(BENCH, exist_ok=True)
    exe = ensure_mergekit()
    tmp = tempfile.mkdtemp(prefix="mk-configs-", dir=BENCH)
    rows = []
    try:
        models = os.path.realpath(os.path.join(tmp, "models"))  # the keys as the tools will spell them
        make_models(models, getattr(torch, args.model_dtype))
        inputs = {os.path.join(models, n): load_dir(os.path.join(models, n)) for n in MODELS}
        with contextlib.chdir(models):
            for path in sorted(glob.glob(os.path.join(CONFIGS, "*.yml"))):
                if args.only in os.path.basename(path):
                    rows.append(one(path, exe, os.path.join(tmp, "out"), inputs))
                    print(line(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(rows)


def summary(rows: list[dict]) -> int:
    accepted = [r for r in rows if r["accepted"]]
    compared = [r for r in accepted if not r.get("mergekit") and "share" in r]
    agreeing = [r for r in compared if r["share"] >= 0.99 and not r["only_one"] and r["vocab"][0] == r["vocab"][1]]
    clear = [r for r in compared if r["clear"] >= 0.99 and not r["only_one"] and r["vocab"][0] == r["vocab"][1]]
    random = [r for r in accepted if "random" in r]
    print(f"accepted {len(accepted)} of {len(rows)}, agreeing {len(agreeing)} of {len(compared)} deterministic "
          f"(>= 99% of elements within 1 ulp; {len(clear)} away from tie-decided elements), {len(random)} random "
          "compared by statistics")
    return 0 if len(agreeing) == len(compared) else 1


if __name__ == "__main__":
    sys.exit(main())
