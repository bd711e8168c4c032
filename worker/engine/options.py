"""What a graft is asked to do: the request the CLI, the worker and the API all build."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import GraftError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
          "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
VOCAB_POLICIES = ("extend", "target")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
MIN_SHARD = 1 << 10


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise GraftError("invalid_option", f"shard_size: cannot read {value!r} as a size (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * _UNITS[unit])


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
        self.alpha = float(self.alpha)
        if self.alpha != self.alpha or self.alpha in (float("inf"), float("-inf")):
            raise GraftError("invalid_option", "alpha must be a finite number")
        if self.vocab not in VOCAB_POLICIES:
            raise GraftError("invalid_option", f"vocab must be one of {', '.join(VOCAB_POLICIES)}")
        if self.dtype not in DTYPE_CHOICES:
            raise GraftError("invalid_option", f"dtype must be one of {', '.join(DTYPE_CHOICES)}")
        if self.device not in DEVICE_CHOICES:
            raise GraftError("invalid_option", f"device must be one of {', '.join(DEVICE_CHOICES)}")
        if self.shard_size < MIN_SHARD:
            raise GraftError("invalid_option", f"shard_size must be at least {MIN_SHARD} bytes")
        for kind in ("include", "exclude"):
            for pattern in getattr(self, kind):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise GraftError("invalid_option", f"{kind}: bad regular expression {pattern!r}: {exc}") from exc

    def selects(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

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

    def inputs(self) -> dict[str, str]:
        return {"source_base": self.source_base, "source_finetuned": self.source_finetuned,
                "target_base": self.target_base}
