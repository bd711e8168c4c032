"""LoRA export bench: per rank, `graft lora` beside mergekit 0.1.5's `mergekit-extract-lora` (its own virtualenv
under .bench/, installed once) in the same run, on one generated Llama-shaped trio (bf16).

Per tool and rank: adapter size, wall time and peak RSS (best of --repeat; the range shown), the retained energy
of the factored modules (1 - ||D - B A||^2 / ||D||^2 over every module both tools factor, measured here from the
adapter files against the delta in float64), and the KL of target + adapter to the full graft
(target + (finetuned - base)) over random token sequences (mean nats per token, float32 forward passes through
PEFT's own loading of each adapter). mergekit extracts f - s without a target: its adapter is applied to the same
target here, with what it writes (its modules_to_save carry the fine-tune's own embeddings and norms).

    .venv/bin/python bench/bench_lora.py                    # defaults: 4 layers of hidden 512, ranks 8,16,64
    .venv/bin/python bench/bench_lora.py --layers 8 --hidden 1024 --ranks 16,64 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import BENCH, MERGEKIT_VENV, PY, timed  # noqa: E402


def ensure_mergekit() -> str:
    exe = os.path.join(MERGEKIT_VENV, "bin", "mergekit-extract-lora")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "venv", MERGEKIT_VENV], check=True)
        pip = os.path.join(MERGEKIT_VENV, "bin", "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)
    return exe


def make_trio(root: str, layers: int, hidden: int) -> dict[str, str]:
    import torch

    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=4096, hidden=hidden, layers=layers, intermediate=hidden * 11 // 4, heads=8, kv_heads=4)
    base = llama_state(shape, seed=0, dtype=torch.bfloat16)
    # A fine-tune-like update: low effective rank (a rank-32 product plus small noise), not flat noise.
    g = torch.Generator().manual_seed(1)
    finetuned = {}
    for name, value in base.items():
        if value.dim() == 2 and ".layers." in name:
            m, n = value.shape
            update = (torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g)) / 32 ** 0.5
            update = update * 0.02 + torch.randn(m, n, generator=g) * 0.002
            finetuned[name] = (value.float() + update * float(value.float().std())).to(value.dtype)
        else:
            finetuned[name] = value
    finetuned = perturb(finetuned, seed=3, scale=0.01)
    target = perturb(base, seed=2, scale=0.2)
    config = shape.config()
    return {role: save_checkpoint(os.path.join(root, role), state, config)
            for role, state in (("source_base", base), ("source_finetuned", finetuned), ("target_base", target))}


def run_graft(paths: dict, out: str, rank: int) -> dict:
    cmd = [os.path.join(os.path.dirname(PY), "graft"), "lora", "--source-base", paths["source_base"],
           "--source-finetuned", paths["source_finetuned"], "--target-base", paths["target_base"], "--output", out,
           "--rank", str(rank), "--profile", "peft", "--device", "cpu", "--json"]
    wall, rss, _ = timed(cmd, dict(os.environ, GRAFT_HASH_INPUTS="false"))
    return {"wall_s": wall, "rss_gb": rss}


def run_mergekit(exe: str, paths: dict, out: str, rank: int) -> dict:
    cmd = [exe, "--model", paths["source_finetuned"], "--base-model", paths["source_base"], "--out-path", out,
           "--max-rank", str(rank)]
    wall, rss, _ = timed(cmd)
    return {"wall_s": wall, "rss_gb": rss}


def measure(paths: dict, adapter: str, full_logits, tokens) -> dict:
    """Retained energy over the factored modules and KL(full graft || target + adapter)."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    s, f = load_file(os.path.join(paths["source_base"], "model.safetensors")), load_file(
        os.path.join(paths["source_finetuned"], "model.safetensors"))
    err = norm = 0.0
    for key in weights:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        with open(os.path.join(adapter, "adapter_config.json")) as fh:
            config = json.load(fh)
        scale = config["lora_alpha"] / config["r"]
        d = f[module + ".weight"].double() - s[module + ".weight"].double()
        ba = weights[key.replace("lora_A", "lora_B")].double() @ weights[key].double() * scale
        err += float((d - ba).square().sum())
        norm += float(d.square().sum())
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["target_base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.double()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    return {"bytes": os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")),
            "retained": 1 - err / norm if norm else 1.0, "kl": float(kl)}


def full_graft_logits(paths: dict, tokens):
    import torch
    import transformers
    from safetensors.torch import load_file

    s, f, t = (load_file(os.path.join(paths[r], "model.safetensors"))
               for r in ("source_base", "source_finetuned", "target_base"))
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["target_base"], dtype=torch.float32)
    state = {n: (t[n].float() + (f[n].float() - s[n].float())).to(t[n].dtype).float() for n in t}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits.double()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and rank; the best is shown")
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args()
    import torch

    os.makedirs(BENCH, exist_ok=True)
    exe = None if args.no_mergekit else ensure_mergekit()
    tmp = tempfile.mkdtemp(prefix="bench-lora-", dir=BENCH)
    try:
        paths = make_trio(os.path.join(tmp, "models"), args.layers, args.hidden)
        tokens = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
        full = full_graft_logits(paths, tokens)
        print(f"Llama {args.layers} layers, hidden {args.hidden}, bf16; best of {args.repeat} (range)")
        print(f"{'tool':<22}{'rank':>5}{'adapter MB':>11}{'wall s':>16}{'RSS GB':>8}{'retained':>10}"
              f"{'KL to graft':>13}")
        for rank in [int(r) for r in args.ranks.split(",")]:
            tools = [("graft lora (peft)", lambda out, r=rank: run_graft(paths, out, r))]
            if exe:
                tools.append(("mergekit-extract-lora", lambda out, r=rank: run_mergekit(exe, paths, out, r)))
            for name, run in tools:
                out = os.path.join(tmp, "out")
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(run(out))
                m = measure(paths, out, full, tokens)
                walls = sorted(r["wall_s"] for r in runs)
                print(f"{name:<22}{rank:>5}{m['bytes'] / 1e6:>11.2f}{walls[0]:>7.2f} ({walls[0]:.1f}-{walls[-1]:.1f})"
                      f"{min(r['rss_gb'] for r in runs):>8.2f}{m['retained']:>10.4f}{m['kl']:>13.3g}")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
