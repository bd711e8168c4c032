"""Helpers shared by the engine tests: running a graft in-process, reading outputs, the float64
reference, ulp arithmetic and surgery on safetensors files (for the corrupt-input cases)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct

import numpy as np
import torch
from safetensors.torch import load_file

from worker.engine import GraftOptions, GraftRequest, run_graft
from worker.service.settings import Settings

ROLES = ("source_base", "source_finetuned", "target_base")
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def settings(**overrides) -> Settings:
    """A fresh settings object (reads the environment now, not whenever get_settings() was first called)."""
    return Settings(**overrides)


def graft(paths: dict[str, str], output: str, *, settings_overrides: dict | None = None, should_cancel=None,
          writer: str | None = None, **options):
    """Run a graft in-process; returns (result, warnings sent to the warn callback)."""
    warnings: list[dict] = []
    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], str(output),
                           GraftOptions(**options), writer=writer)
    result = run_graft(request, settings=settings(**(settings_overrides or {})), warn=warnings.append,
                       should_cancel=should_cancel)
    return result, warnings


def multipart_trio(root: str) -> dict[str, str]:
    """About 11 MB per model in one shard each: many windows and blocks per file, and an output that goes up
    as a multipart upload (the remote-storage tests' models)."""
    from worker.devtools.sample_models import LlamaShape, make_trio

    shape = LlamaShape(vocab=8192, hidden=320, layers=1, intermediate=64, heads=4, kv_heads=2)
    return make_trio(root, shape=shape, added_rows=0, shards=(1, 1, 1), target_only=False)


def load_dir(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whatever its sharding."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            part = load_file(os.path.join(directory, name))
            assert not set(part) & set(out), f"tensor in two shards: {set(part) & set(out)}"
            out.update(part)
    return out


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def copy_trio(trio: dict[str, str], root) -> dict[str, str]:
    """A private copy of a (session-scoped) trio that a test may damage."""
    out = {}
    for role, path in trio.items():
        out[role] = shutil.copytree(path, os.path.join(str(root), role))
    return out


def effective(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A model's tensor, with a tied lm_head read as the embedding it shares storage with."""
    if name == HEAD and HEAD not in state:
        return state[EMBED]
    return state[name]


def reference(t: torch.Tensor, s: torch.Tensor, f: torch.Tensor, alpha: float) -> torch.Tensor:
    """t + alpha * (f - s) in float64 over the rows all three share."""
    rows = min(t.shape[0], s.shape[0], f.shape[0]) if t.dim() else None
    if rows is not None and not (t.shape == s.shape == f.shape):
        t, s, f = t[:rows], s[:rows], f[:rows]
    return t.double() + alpha * (f.double() - s.double())


_PRECISION = {torch.bfloat16: (8, -125), torch.float16: (11, -13), torch.float32: (24, -125),
              torch.float64: (53, -1021)}


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each value of `ref` (float64), subnormals included."""
    p, emin = _PRECISION[dtype]
    _, exp = torch.frexp(ref.double())
    exp = torch.clamp(exp, min=emin)
    return torch.ldexp(torch.ones_like(ref, dtype=torch.float64), (exp - p).to(torch.int64))


def ulp_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the output dtype's last place."""
    return (out.double() - ref).abs() / ulp(ref, out.dtype)


def correctly_rounded(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 reference rounded once to `dtype` (round to nearest, ties to even), by hand: torch's
    float64 -> bfloat16 goes through float32 and could round twice."""
    step = ulp(ref, dtype)
    return (torch.round(ref / step) * step).to(dtype)


# --- safetensors surgery -------------------------------------------------------------------------------

def read_safetensors(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_safetensors(path: str, header: dict, data: bytes, *, raw_header: bytes | None = None) -> None:
    raw = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)


def data_region(path: str) -> tuple[int, int]:
    """(start, length) of a safetensors file's data region."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n, os.path.getsize(path) - 8 - n


def shard_of(directory: str, tensor: str) -> str:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        return os.path.join(directory, read_json(index)["weight_map"][tensor])
    return os.path.join(directory, "model.safetensors")


def set_element(directory: str, tensor: str, index: tuple[int, ...], value: float) -> None:
    """Rewrite one element of a tensor in whichever shard of `directory` holds it."""
    from safetensors.torch import load_file, save_file

    shard = shard_of(directory, tensor)
    state = load_file(shard)
    state[tensor] = state[tensor].clone()
    state[tensor][index] = value
    save_file(state, shard, metadata={"format": "pt"})


def tensor_names_sorted_by_offset(header: dict) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def numel(shape) -> int:
    return math.prod(shape)


def expected_output(paths: dict[str, str], *, alpha: float = 1.0, vocab: str = "extend",
                    selected=lambda name: True) -> tuple[dict[str, torch.Tensor], bool]:
    """What the output must hold, computed independently in float64 from the three inputs:
    (tensor name -> expected values, whether the output is tied)."""
    s_state, f_state, t_state = (load_dir(paths[r]) for r in ROLES)
    tied_out = all(HEAD not in m for m in (s_state, f_state, t_state))
    names = list(t_state)
    if HEAD not in t_state and not tied_out:
        names.append(HEAD)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = effective(t_state, name)
        has = name in s_state or (name == HEAD and EMBED in s_state)
        has &= name in f_state or (name == HEAD and EMBED in f_state)
        if not selected(name) or not has or not t.is_floating_point():
            out[name] = t
            continue
        s, f = effective(s_state, name), effective(f_state, name)
        if t.shape == s.shape == f.shape:
            out[name] = reference(t, s, f, alpha)
            continue
        rt, rf = t.shape[0], f.shape[0]
        shared = min(rt, s.shape[0], rf)
        out_rows = max(rt, rf) if vocab == "extend" else rt
        parts = [reference(t, s, f, alpha)[:shared], t[shared:rt].double(), f[rt:out_rows].double()]
        out[name] = torch.cat(parts)
    return out, tied_out


def assert_matches_expected(out_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                            max_ulp: float = 1.0) -> None:
    assert set(out_state) == set(expected), (sorted(set(out_state) ^ set(expected)))
    for name, want in expected.items():
        got = out_state[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if not got.is_floating_point():
            assert torch.equal(got, want), name
            continue
        err = ulp_error(got, want.double())
        assert float(err.max()) <= max_ulp, f"{name}: {float(err.max())} ulp"


def documented_draw(seed: int, index: int, name: str, n: int) -> np.ndarray:
    """graft's documented draw (DARE, DELLA), written here independently of the engine: key = the first 4 bytes
    (little endian) of sha256(seed NUL diff NUL tensor); murmur3's fmix32 applied twice to key ^ element index;
    one uint64 value in [0, 2**32) per element index in [0, n)."""
    m32 = np.uint64(0xFFFFFFFF)
    key = int.from_bytes(hashlib.sha256(f"{seed}\x00{index}\x00{name}".encode()).digest()[:4], "little")
    x = np.arange(n, dtype=np.uint64) ^ np.uint64(key)
    for _ in range(2):
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x85EBCA6B)) & m32
        x ^= x >> np.uint64(13)
        x = (x * np.uint64(0xC2B2AE35)) & m32
        x ^= x >> np.uint64(16)
    return x
