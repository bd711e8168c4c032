"""The engine options of a graft (how the output is written, which tensors take the diffs) and their checks:
sizes, alpha, the roles of a recipe's inputs. The request itself is a recipe (planning/request.py)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from worker.engine.errors import GraftError
from worker.engine.planning.patterns import check_patterns, matches_any

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


def delta_role(i: int) -> str:
    """The role of a diff artifact's decoded delta (the i-th diff of a recipe, when it is an artifact)."""
    return f"delta.{i}"


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
