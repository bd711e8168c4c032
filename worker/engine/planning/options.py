"""What a graft is asked to do: the request the CLI, the worker and the API all build."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from worker.engine.errors import GraftError
from worker.engine.planning.patterns import check_patterns, matches_any

if TYPE_CHECKING:
    from worker.engine.planning.recipe import Recipe

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
          "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
VOCAB_POLICIES = ("extend", "target")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
MIN_SHARD = 1 << 10
MAX_SHARD = 5 * 10**12  # S3's largest object; no output file of ours may be larger
_SIZE_TEXT_CAP = 64  # characters: a size is short, and a long one is not worth parsing


def parse_size(value: object) -> int:
    """Bytes from an int or a size string such as "5GB", "500MB" or "1.5GiB"; GraftError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and len(value) <= _SIZE_TEXT_CAP and (match := _SIZE.fullmatch(value.strip())):
        unit = match.group(2).upper()
        if unit not in _UNITS:
            raise GraftError("invalid_option", f"shard_size: unknown unit in {value!r} (e.g. 5GB, 500MB)")
        # Exact arithmetic: float("9" * 400) is inf, and int(inf) raised OverflowError.
        size = int(Fraction(match.group(1)) * _UNITS[unit])
    else:
        shown = repr(value[:40] + "..." * (len(value) > 40)) if isinstance(value, str) else type(value).__name__
        raise GraftError("invalid_option", f"shard_size: cannot read {shown} as a size (e.g. 5GB, 500MB)")
    if size <= 0:
        raise GraftError("invalid_option", "shard_size: must be a positive size")
    if size > MAX_SHARD:
        raise GraftError("invalid_option", f"shard_size: at most {MAX_SHARD:,} bytes (5TB)")
    return size


FLOAT32_MAX = 3.4028234663852886e38  # the arithmetic's range: a factor past it makes every scaled delta inf


def check_alpha(value: object) -> float:
    """The one check of an alpha (a graft's, each of a sweep's, a recipe's strength), GraftError naming it."""
    # bool is an int in Python and "1" floats fine: both are refused, a caller who sent them meant something else.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraftError("invalid_option", f"alpha: must be a number, got {type(value).__name__}",
                         {"field": "options.alpha"})
    try:
        alpha = float(value)
    except OverflowError:  # an integer of hundreds of digits
        alpha = math.inf
    if not math.isfinite(alpha) or abs(alpha) > FLOAT32_MAX:
        raise GraftError("invalid_option", "alpha: must be a finite number within float32's range (about 3.4e38), "
                         "in which the arithmetic runs", {"field": "options.alpha"})
    return alpha


def base_role(i: int) -> str:
    """The role of a recipe's i-th diff's base (and of its fine-tune, below): one spelling everywhere."""
    return f"source_base.{i}"


def finetuned_role(i: int) -> str:
    return f"source_finetuned.{i}"


@dataclass
class GraftOptions:
    alpha: float = 1.0
    vocab: str = "extend"
    dtype: str = "auto"
    shard_size: int = 5 * 10**9
    device: str = "auto"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shard_size = parse_size(self.shard_size)
        self.alpha = check_alpha(self.alpha)
        for name, choices in (("vocab", VOCAB_POLICIES), ("dtype", DTYPE_CHOICES), ("device", DEVICE_CHOICES)):
            if not (isinstance(getattr(self, name), str) and getattr(self, name) in choices):
                raise GraftError("invalid_option", f"{name} must be one of {', '.join(choices)}")
        if self.shard_size < MIN_SHARD:
            raise GraftError("invalid_option", f"shard_size: must be at least {MIN_SHARD} bytes")
        self.include = check_patterns(self.include, "include")
        self.exclude = check_patterns(self.exclude, "exclude")

    def selects(self, name: str) -> bool:
        if self.include and not matches_any(self.include, name, "include"):
            return False
        return not matches_any(self.exclude, name, "exclude")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraftRequest:
    source_base: str
    source_finetuned: str
    target_base: str
    output: str
    options: GraftOptions = field(default_factory=GraftOptions)
    # Who writes the output. Attempts of one job share it, so a retry may clear what a killed attempt
    # left under an S3 prefix; a graft never clears another writer's leftovers. None: this run alone.
    writer: str | None = None
    # Directories every local file read or written must resolve under, symlinks followed (the service's
    # roots). None: unconfined, as for the CLI, where the Hugging Face cache's snapshot symlinks lead out.
    allowed_roots: list[str] | None = None
    # Directories refused even under an allowed root, except below an allowed root inside them (the
    # shared output directory, minus the tenant's own namespace in it).
    denied_roots: list[str] | None = None
    # A recipe (worker/engine/planning/recipe.py) beyond the plain transfer: several diffs, transforms, a merge method,
    # weights per layer or per tensor. None: the three fields above and options.alpha say it all.
    recipe: Recipe | None = None

    def inputs(self) -> dict[str, str]:
        """Role -> URI of every input. A recipe's diffs are `source_base.<i>` / `source_finetuned.<i>`; the
        first diff's are also `source_base` / `source_finetuned` (the tokenizer and generation config come
        from its fine-tune)."""
        roles = {"source_base": self.source_base, "source_finetuned": self.source_finetuned,
                 "target_base": self.target_base}
        for i, diff in enumerate(self.recipe.diffs if self.recipe is not None else ()):
            roles[base_role(i)] = diff.source_base
            roles[finetuned_role(i)] = diff.source_finetuned
        return roles

    @classmethod
    def from_recipe(cls, recipe: Recipe, output: str, **kwargs) -> GraftRequest:
        """A plain recipe (one diff, a plain sum, a scalar weight) becomes today's request, and so writes
        today's bytes; any other keeps its recipe."""
        alpha = recipe.plain_alpha()
        first = recipe.diffs[0]
        options = recipe.options.engine_options(alpha if alpha is not None else 1.0)
        return cls(first.source_base, first.source_finetuned, recipe.target_base, output, options,
                   recipe=None if alpha is not None else recipe, **kwargs)
