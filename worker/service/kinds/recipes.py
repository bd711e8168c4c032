"""What the kinds that run a recipe (a graft, a preflight) share on the worker's side: the inputs a job record
names, and the engine request it runs. A kind of its own sort (a diff extraction) declares both itself (kind.py).
Importable without torch: the engine's request is imported inside recipe_request, in the job's process."""

from __future__ import annotations

from typing import Any


def recipe_diffs(record: dict) -> list[dict]:
    """The diffs of the recipe a record stores, as stored (a diff artifact's by its `diff` URI alone)."""
    return list((record.get("recipe") or {}).get("diffs") or ())


def recipe_inputs(record: dict) -> dict[str, str]:
    """Field -> URI of every model and diff artifact the record's recipe reads (a record written before recipes
    names the three URIs only)."""
    if not record.get("recipe"):
        return {role: record[role] for role in ("source_base", "source_finetuned", "target_base")}
    named = {"target_base": record["recipe"]["target_base"]}
    for i, diff in enumerate(recipe_diffs(record)):
        if diff.get("diff") is not None:
            named[f"diffs.{i}.diff"] = diff["diff"]
        else:
            named.update({f"diffs.{i}.source_base": diff["source_base"],
                          f"diffs.{i}.source_finetuned": diff["source_finetuned"]})
    return named


def recipe_request(record: dict, spec: dict, job_id: str, confinement: dict) -> Any:
    """The job's request: the recipe its record stores. A record written by an API older than this worker (a
    rolling deploy) holds a plain transfer as three URIs and options instead."""
    from worker.engine import GraftOptions, GraftRequest  # torch is imported here, in the job
    from worker.engine.planning.recipe import Recipe, load_recipe

    if record.get("recipe"):
        recipe = load_recipe(record["recipe"])
    else:
        recipe = Recipe.single(record["source_base"], record["source_finetuned"], record["target_base"],
                               GraftOptions(**record["options"]))
    return GraftRequest(recipe, record["output"], writer=job_id, **confinement)
