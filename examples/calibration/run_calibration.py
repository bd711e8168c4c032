"""`make example`: the compatibility verdict against what grafts actually do, on a tiny model family trained
here (family.py), grafted and checked through the service's HTTP API.

    python examples/calibration/run_calibration.py [--work-dir .run/calibration] [--retrain]

1. Trains the family (v1; its continuations v2, v2_shift, v2_hot, v2_far; an unrelated base; ft, v1
   fine-tuned on a question task) into WORK/family, unless the same family is already there.
2. Starts the embedded service (Redis, the API, one worker), as `make run` does.
3. For each target (v1 as a control, the continuations, the unrelated base): a preflight at the weights
   level, a preflight at the function level (probed on corpus text), and a graft of ft's diff onto it with
   an evaluation (the task's held-out questions as prompts), all through POST /v1/preflights and
   POST /v1/jobs, polled at GET /v1/jobs/{id}.
4. Scores the task on each target alone, on the service's output (target + diff) and on ft itself, then
   prints a table and writes WORK/results.json and WORK/calibration.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import family  # noqa: E402
from service import embedded_service, submit, wait_all  # noqa: E402

TARGETS = ("v1", "v2", "v2_shift", "v2_hot", "v2_far", "unrelated")  # v1: the control
EVAL_PROMPTS = 8  # held-out questions given to the evaluation (KL to ft, greedy samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=".run/calibration")
    parser.add_argument("--size", default="example", choices=sorted(family.SIZES))
    parser.add_argument("--retrain", action="store_true", help="train the family even if it is there")
    parser.add_argument("--sweep", action="store_true", help="also v1 continued on each corpus at 2, 3, 5 and 20 "
                        "times the near rate (a denser curve; about twice as long)")
    args = parser.parse_args()
    quiet_transformers()
    work = os.path.abspath(args.work_dir)
    t0 = time.time()
    targets = TARGETS + (tuple(family.SWEEP) if args.sweep else ())
    paths = ensure_family(os.path.join(work, "family"), args.size, targets, retrain=args.retrain)
    print(f"family ready in {time.time() - t0:.0f}s")
    shutil.rmtree(os.path.join(work, "outputs"), ignore_errors=True)
    t1 = time.time()
    with embedded_service(work, workers=2) as client:
        jobs = run_jobs(client, paths, targets)
    print(f"service: {len(targets) * 3} jobs in {time.time() - t1:.0f}s")
    results = collect(paths, jobs)
    with open(os.path.join(work, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print_table(results)
    plot(results, os.path.join(work, "calibration.png"))
    print(f"\nwrote {work}/results.json and {work}/calibration.png ({time.time() - t0:.0f}s in all)")
    return 0


def quiet_transformers() -> None:
    """No progress bar per checkpoint loaded or saved (this script loads dozens)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def ensure_family(root: str, size: str, targets: tuple[str, ...], *, retrain: bool) -> dict[str, str]:
    """The family trained from this family.py at this size, reused when its stamp says so and it holds every
    member asked for."""
    with open(family.__file__, "rb") as fh:
        stamp = f"{size} {hashlib.sha256(fh.read()).hexdigest()}"
    stamp_file = os.path.join(root, "STAMP")
    paths = {name: os.path.join(root, name) for name in (*targets, "ft")}
    if (not retrain and os.path.exists(stamp_file) and _read(stamp_file) == stamp
            and all(os.path.isdir(p) for p in paths.values())):
        print(f"family: reusing {root} (--retrain to train it again)")
        return paths
    shutil.rmtree(root, ignore_errors=True)
    print(f"training the {size}-size family into {root}")
    paths = family.train_family(root, size, members=targets, log=print)
    with open(stamp_file, "w") as fh:
        fh.write(stamp)
    return paths


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def run_jobs(client, paths: dict[str, str], targets: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """{target: {"weights": job, "function": job, "graft": job}}, every job terminal."""
    probe = family.probe_text()
    prompts = [q for q, _a in family.task_examples("heldout")[:EVAL_PROMPTS]]
    ids: dict[str, tuple[str, str]] = {}
    for name in targets:
        inputs = {"source_base": f"file://{paths['v1']}", "source_finetuned": f"file://{paths['ft']}",
                  "target_base": f"file://{paths[name]}"}
        for level in ("weights", "function"):
            ids[submit(client, "/v1/preflights", {**inputs, "level": level, "probe_text": probe,
                                                  "metadata": {"target": name}})] = (name, level)
        body = {**inputs, "metadata": {"target": name},
                "evaluate": {"probe_text": probe, "prompts": prompts, "max_new_tokens": 2}}
        ids[submit(client, "/v1/jobs", body)] = (name, "graft")

    def said(job: dict) -> None:
        name, what = ids[job["id"]]
        result = job.get("result") or {}
        detail = (result.get("report") or {}).get("verdict") or result.get("uri") or job.get("error")
        print(f"  {name:<10} {what:<8} {job['status']}: {detail}")

    done = wait_all(client, list(ids), timeout=600, on_done=said)
    out: dict[str, dict[str, dict]] = {name: {} for name in targets}
    for job_id, (name, what) in ids.items():
        job = done[job_id]
        if job["status"] != "succeeded":
            raise SystemExit(f"calibration: {what} job for {name} ended {job['status']}: {job.get('error')}")
        out[name][what] = job
    return out


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _scores(directory: str) -> dict[str, float]:
    return {split: family.task_score(directory, split) for split in ("heldout", "all")}


def collect(paths: dict[str, str], jobs: dict[str, dict[str, dict]]) -> dict:
    """The numbers behind the table and the plot, per target."""
    ft, v1 = _scores(paths["ft"]), _scores(paths["v1"])
    rows = {}
    for name in jobs:
        weights = jobs[name]["weights"]["result"]["report"]
        function = jobs[name]["function"]["result"]["report"]
        graft = jobs[name]["graft"]["result"]
        diff = weights["weights"]["diffs"][0]
        barrier = next((r for r in function["reasons"] if r["code"] == "loss_barrier"), None)
        alone, grafted = _scores(paths[name]), _scores(local_path(graft["uri"]))
        evaluation = graft.get("evaluation") or {}
        rows[name] = {
            "verdict": {"weights": weights["verdict"], "function": barrier["verdict"] if barrier else None,
                        "combined": function["verdict"]},
            "reasons": [{k: r.get(k) for k in ("code", "level", "verdict", "message", "overruled")}
                        for r in function["reasons"]],
            "medians": diff["medians"], "coverage": diff["coverage"]["share"],
            "function": {k: function["function"].get(k) for k in ("losses", "barrier", "barrier_ratio", "tokens")},
            "task": {"alone": alone, "grafted": grafted,
                     "recovered": {s: _recovered(grafted[s], alone[s], ft[s], v1[s]) for s in ft}},
            "knowledge": family.knowledge_score(paths[name]),
            "evaluation": {"kl_to_finetuned": (evaluation.get("kl_to_finetuned") or {}).get("mean"),
                           "probe": evaluation.get("probe"), "quality_warning": evaluation.get("quality_warning"),
                           "samples": evaluation.get("samples")},
            "output": graft["uri"], "chart_uri": jobs[name]["weights"]["result"].get("chart_uri"),
        }
    return {"size": _size_name(paths), "ft": ft, "v1": v1, "targets": rows}


def _size_name(paths: dict[str, str]) -> str:
    return _read(os.path.join(os.path.dirname(paths["v1"]), "STAMP")).split()[0]


def _recovered(grafted: float, alone: float, ft: float, v1: float) -> float | None:
    """The share of what fine-tuning gained over v1 that the graft adds to this target."""
    return (grafted - alone) / (ft - v1) if ft != v1 else None


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    ft = results["ft"]
    print(f"\nft itself: task {ft['heldout']:.2f} held-out / {ft['all']:.2f} all; v1: "
          f"{results['v1']['heldout']:.2f} / {results['v1']['all']:.2f}")
    head = (f"{'target':<10} {'weights':<12} {'function':<12} {'combined':<12} {'dist':>6} {'cos':>6} "
            f"{'dist/d':>6} {'barrier':>7} {'alone':>9} {'grafted':>9} {'recov':>5} {'KL':>6} {'know':>5}")
    print(head)
    print("-" * len(head))
    for name, row in results["targets"].items():
        v, m, task = row["verdict"], row["medians"], row["task"]
        pair = "{heldout:.2f}/{all:.2f}"
        print(f"{name:<10} {v['weights']:<12} {v['function'] or '-':<12} {v['combined']:<12} "
              f"{_fmt(m['bases_distance_ratio']):>6} {_fmt(m['cos_bases_delta'], '.2f'):>6} "
              f"{_fmt(m['bases_to_delta_ratio'], '.2f'):>6} {_fmt(row['function']['barrier_ratio']):>7} "
              f"{pair.format(**task['alone']):>9} {pair.format(**task['grafted']):>9} "
              f"{_fmt(task['recovered']['all'], '.2f'):>5} {_fmt(row['evaluation']['kl_to_finetuned'], '.2f'):>6} "
              f"{row['knowledge']:>5.2f}")
    print("dist: median ||target - v1|| / ||target||; cos: median cos(target - v1, ft - v1); dist/d: median "
          "||target - v1|| / ||ft - v1||;\nbarrier: loss barrier / mean end loss on the line v1 -> target; task "
          "scores held-out/all questions; recov: (grafted - alone) / (ft - v1) on all questions; KL: the "
          "evaluation's mean KL(ft || output) on held-out prompts;\nknow: the target's share of the facts "
          "completed in corpus form (does it still know what the questions ask?)")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worker.engine import verdict as rules

    colours = {"compatible": "tab:green", "risky": "tab:orange", "incompatible": "tab:red"}
    panels = (("bases_distance_ratio", "median ||target - v1|| / ||target||", "weights",
               (rules.BASES_DISTANCE_RISKY, rules.BASES_DISTANCE_INCOMPATIBLE)),
              ("bases_to_delta_ratio", "median ||target - v1|| / ||ft - v1||", "weights", ()),
              ("barrier_ratio", "loss barrier / mean end loss (v1 -> target)", "function",
               (rules.BARRIER_COMPATIBLE, rules.BARRIER_RISKY)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, level, lines) in zip(axes, panels, strict=True):
        for i, (name, row) in enumerate(results["targets"].items()):
            x = row["function"][key] if key == "barrier_ratio" else row["medians"][key]
            y = row["task"]["recovered"]["all"]
            ax.scatter([x], [y], s=60, color=colours[row["verdict"][level]], edgecolor="black", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -12), fontsize=8)
        for line in lines:
            ax.axvline(line, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("share of ft's gain the graft keeps")
        ax.axhline(1.0, color="lightgray", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].set_title("weights level (dashed: risky, incompatible)", fontsize=10)
    axes[2].set_title("function level (dashed: compatible, risky)", fontsize=10)
    fig.suptitle("graft of ft - v1 onto each target; colour: that level's verdict (green compatible, orange "
                 "risky, red incompatible)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
