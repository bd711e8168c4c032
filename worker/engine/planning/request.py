"""What a graft is asked to do: a recipe, where it writes, and who may read what. Every face builds this one
shape (the CLI from its flags, a recipe file or a mergekit config; the API from a body; the worker from the job
record, which stores the recipe; a sweep by scaling the recipe), and the engine plans from it alone.

Today's three fields are `GraftRequest.single` (a one-diff recipe whose weight is alpha). Whether such a recipe
runs on the plain kernel is the compute step's choice, made per tensor: one diff, a plain sum, no transform."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.planning.options import GraftOptions, base_role, delta_role, finetuned_role
from worker.engine.planning.recipe import Recipe


@dataclass
class GraftRequest:
    recipe: Recipe
    output: str
    # Who writes the output. Attempts of one job share it, so a retry may clear what a killed attempt
    # left under an S3 prefix; a graft never clears another writer's leftovers. None: this run alone.
    writer: str | None = None
    # Directories every local file read or written must resolve under, symlinks followed (the service's
    # roots). None: unconfined, as for the CLI, where the Hugging Face cache's snapshot symlinks lead out.
    allowed_roots: list[str] | None = None
    # Directories refused even under an allowed root, except below an allowed root inside them (the
    # shared output directory, minus the tenant's own namespace in it).
    denied_roots: list[str] | None = None

    @classmethod
    def single(cls, source_base: str, source_finetuned: str, target_base: str, output: str,
               options: GraftOptions | None = None, **kwargs) -> GraftRequest:
        """The fine-tuning transfer `target + alpha * (finetuned - base)` as a request: a one-diff recipe."""
        recipe = Recipe.single(source_base, source_finetuned, target_base, options or GraftOptions())
        return cls(recipe, output, **kwargs)

    @property
    def target_base(self) -> str:
        return self.recipe.target_base

    @property
    def source_base(self) -> str:
        """The first diff's base (the roles `source_base` / `source_finetuned` name the first diff)."""
        return self.recipe.diffs[0].source_base

    @property
    def source_finetuned(self) -> str:
        return self.recipe.diffs[0].source_finetuned

    @property
    def plain(self) -> bool:
        """The recipe is the plain transfer (one diff, a plain sum, a scalar weight, no transform or rule, graft's
        conventions): reports and the manifest describe it by its alpha."""
        return self.recipe.plain_alpha() is not None

    @property
    def options(self) -> GraftOptions:
        """The recipe's engine options (Recipe.engine_options). Built from the recipe on each call: change the
        recipe, not this."""
        return self.recipe.engine_options()

    def inputs(self) -> dict[str, str]:
        """Role -> URI of every input. A recipe's diffs are `source_base.<i>` / `source_finetuned.<i>`; the
        first diff's are also `source_base` / `source_finetuned` (the tokenizer and generation config come
        from its fine-tune)."""
        roles = {"source_base": self.source_base, "source_finetuned": self.source_finetuned,
                 "target_base": self.target_base}
        for i, diff in enumerate(self.recipe.diffs):
            roles[base_role(i)] = diff.source_base
            roles[finetuned_role(i)] = diff.source_finetuned
            if diff.diff is not None:  # the artifact's decoded delta, read through its fine-tune's stand-in
                roles[delta_role(i)] = diff.source_finetuned
        return roles
