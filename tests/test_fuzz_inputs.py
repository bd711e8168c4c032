"""Fuzzing the input parsers: safetensors headers, index files, config files and user patterns, mutated
from valid ones and made up whole, run through resolve_model and build_plan. Every case must end in a
plan or a GraftError with a code (never another exception, never a hang), and a plan must agree with
the headers: every tensor's bytes inside its file, none overlapping, no segment reading past a tensor.
mergekit YAML (generated configs with hostile scalars, tags, dates, huge numbers, nesting, anchors and
aliases, and raw text edits of them) must end in a recipe the API can return as strict JSON or in
GraftError("invalid_recipe"), both as text and as PyYAML's own safe_load builds it (the CLI's way).

GRAFT_FUZZ_EXAMPLES sets the examples per test (`make fuzz` raises it); the default keeps this file to a
few seconds in the suite. Derandomized: a failure here reproduces on every run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.devtools.sample_models import LlamaShape, make_trio
from worker.engine.errors import GraftError
from worker.engine.planning.options import GraftOptions
from worker.engine.planning.plan import ROLES, build_plan
from worker.engine.storage.model import INDEX_FILE, resolve_model
from worker.engine.storage.safetensors_format import DTYPES, itemsize
from worker.engine.storage.uris import parse_uri

EXAMPLES = int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "150"))
CASE_SECONDS = 10  # one case: three small models resolved and planned, normally a few milliseconds
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"a case ran past {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    shape = LlamaShape(vocab=32, hidden=16, layers=1, intermediate=32, heads=2, kv_heads=1)
    return make_trio(str(tmp_path_factory.mktemp("fuzz-trio")), shape=shape, added_rows=4)


# --- what a hostile file may hold ------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([*DTYPES, "F12", "", "f32", "llama"]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
DEPTHS = st.sampled_from([1, 10, 63, 64, 65, 999, 1001, 5000, 100_000])
NAMES = st.one_of(st.text(max_size=12), st.sampled_from(["lm_head.weight", "model.embed_tokens.weight",
                                                         "__metadata__", "", "\ud800", "a" * 300]))


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _append_raw(text: str, extra: str) -> str:
    """`text` (a JSON object) with `, extra` added before its closing brace."""
    body = text.rstrip()[:-1]
    return body + ("," if body.rstrip() != "{" else "") + extra + "}"


@st.composite
def object_text(draw, value: dict) -> str:
    """A JSON object's text, sometimes with a key repeated or a deeply nested member added."""
    text = _dumps(value)
    if value and draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(sorted(value)))
        text = _append_raw(text, f"{_dumps(key)}:{_dumps(draw(st.sampled_from([value[key], None])))}")
    if draw(st.integers(0, 4)) == 0:
        text = _append_raw(text, f'"deep":{_deep(draw(DEPTHS), draw(st.sampled_from(["list", "dict"])))}')
    return text


# --- safetensors headers ---------------------------------------------------------------------------------

def _read(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


SAME_WIDTH = [["F16", "BF16", "I16", "U16"], ["F32", "I32", "U32"], ["F64", "I64", "U64"],
              ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"]]


def _wellformed(entry) -> bool:
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in DTYPES):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(type(d) is int for d in shape) and isinstance(offsets, list)
            and len(offsets) == 2 and all(type(o) is int for o in offsets))


def _span(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _benign(draw, header: dict, names: list[str]) -> None:
    """Edits that keep the file valid, so that cases get past the parser into the planner: another
    dtype of the same width, another shape of the same size, two same-sized tensors' bytes swapped,
    metadata strings, a renamed tensor."""
    name = draw(st.sampled_from(names))
    entry = header[name]
    op = draw(st.sampled_from(["dtype", "reshape", "swap", "metadata", "rename"]))
    if op in ("dtype", "reshape", "swap") and not _wellformed(entry):
        return  # an earlier hostile edit broke it; these edits assume a valid entry
    if op == "dtype":
        family = next((f for f in SAME_WIDTH if entry["dtype"] in f), [entry["dtype"]])
        entry["dtype"] = draw(st.sampled_from([d for d in family if d in DTYPES]))
    elif op == "reshape":
        n = math.prod(entry["shape"])
        entry["shape"] = draw(st.sampled_from([[n], [1, n], [n, 1], list(reversed(entry["shape"])), []
                                               if n == 1 else [n]]))
    elif op == "swap":
        other = header[draw(st.sampled_from(names))]
        if _wellformed(other) and _span(other) == _span(entry):
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    else:
        header[draw(NAMES.filter(lambda n: n not in header))] = header.pop(name)


def _hostile(draw, header: dict, names: list[str]) -> dict | object:
    op = draw(st.sampled_from(["set", "nudge", "drop", "copy", "metadata", "replace"]))
    name = draw(st.sampled_from(names))
    entry = header.get(name)
    if op == "replace":
        return draw(JSON)
    if op == "metadata":
        header["__metadata__"] = draw(JSON)
    elif op == "drop":
        header.pop(name, None)
    elif op == "copy":
        header[draw(NAMES)] = entry
    elif not isinstance(entry, dict):
        pass
    elif op == "set":
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(JSON)
    else:
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        values = entry.get(field)
        if isinstance(values, list) and values:
            i = draw(st.integers(0, len(values) - 1))
            if isinstance(values[i], int):
                values[i] += draw(st.sampled_from([-8, -1, 1, 2, 8, 2**40, -(2**40)]))
    return header


@st.composite
def mutated_header(draw, header: dict) -> dict | object:
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(0, 3))):
        names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        if not names:
            break
        if draw(st.integers(0, 2)) == 0:
            header = _hostile(draw, header, names)
        else:
            _benign(draw, header, names)
    return header


@st.composite
def safetensors_file(draw, header: dict, data: bytes) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=200))  # nothing like a safetensors file
    value = draw(mutated_header(header))
    text = draw(object_text(value)) if isinstance(value, dict) else _dumps(value)
    raw = text.encode("utf-8", "surrogatepass") + b" " * draw(st.integers(0, 9))
    length = len(raw)
    how = draw(st.sampled_from(["exact"] * 8 + ["delta", "any"]))
    if how == "delta":
        length = max(0, length + draw(st.integers(-16, 16)))
    elif how == "any":
        length = draw(st.integers(0, 2**64 - 1))
    tail = draw(st.sampled_from(["same"] * 8 + ["cut", "grow"]))
    if tail == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif tail == "grow":
        data = data + draw(st.binary(min_size=1, max_size=64))
    return struct.pack("<Q", length) + raw + data


# --- running a case and checking what it resolved to -----------------------------------------------------

def _independent_header(path: str) -> tuple[int, dict]:
    """The header as the plain json module reads it (the engine accepted it, so it must parse)."""
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + n, json.loads(blob[8:8 + n])


def _check_model(model) -> None:
    by_file: dict[str, list] = {}
    for name, info in model.tensors.items():
        assert info.name == name and info.file in model.weight_files
        size = model.store.size(info.file)
        data_start, header = _independent_header(model.store.path(info.file))
        entry = header[name]
        assert (info.dtype, list(info.shape)) == (entry["dtype"], entry["shape"])
        assert [info.start - data_start, info.end - data_start] == entry["data_offsets"]
        assert data_start <= info.start <= info.end <= size
        assert info.end - info.start == math.prod(info.shape) * itemsize(info.dtype)
        by_file.setdefault(info.file, []).append((info.start, info.end))
    for spans in by_file.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), "tensors overlap"


def _check_plan(plan, models) -> None:
    names = [t.name for t in plan.tensors]
    assert len(set(names)) == len(names)
    assert [t.name for s in plan.shards for t in s.tensors] == names
    for t in plan.tensors:
        n = math.prod(t.shape)
        segments = sorted(t.segments, key=lambda s: s.start)
        assert segments and segments[0].start == 0 and segments[-1].stop == n or not n
        for a, b in zip(segments, segments[1:], strict=False):
            assert a.stop == b.start
        for seg in segments:
            reads = {"transfer": ROLES, "target": ("target_base",), "finetuned": ("source_finetuned",)}[seg.op]
            for role in reads:
                info = t.sources[role]
                assert info.numel >= seg.stop, (t.name, role, seg)  # never past the tensor read
                assert model_holds(models[role], info)


def model_holds(model, info) -> bool:
    return any(i is info or i == info for i in model.tensors.values())


def run_case(dirs: dict[str, str], options: GraftOptions | None = None) -> None:
    models = {}
    try:
        with time_limit(CASE_SECONDS):
            try:
                for role in ROLES:
                    models[role] = resolve_model(role, parse_uri(dirs[role]), require_model_type=role == "target_base")
                for model in models.values():
                    _check_model(model)
                plan = build_plan(models["target_base"], models["source_base"], models["source_finetuned"],
                                  options or GraftOptions())
                _check_plan(plan, models)
            except GraftError as err:
                assert isinstance(err.code, str) and err.code and err.message
    finally:
        for model in models.values():
            model.store.close()


@contextmanager
def victim(pristine: dict[str, str], role: str):
    """The trio with a private copy of `role` to damage."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = dict(pristine)
        dirs[role] = shutil.copytree(pristine[role], os.path.join(tmp, role))
        yield dirs


def _shards(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


# --- the fuzz tests --------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(pristine, data):
    role = data.draw(st.sampled_from(ROLES))
    with victim(pristine, role) as dirs:
        path = os.path.join(dirs[role], data.draw(st.sampled_from(_shards(dirs[role]))))
        header, blob = _read(path)
        with open(path, "wb") as fh:
            fh.write(data.draw(safetensors_file(header, blob)))
        run_case(dirs)


@FUZZ
@given(data=st.data())
def test_fuzz_index_files(pristine, data):
    role = data.draw(st.sampled_from(["source_finetuned", "target_base"]))  # the sharded ones
    with victim(pristine, role) as dirs:
        path = os.path.join(dirs[role], INDEX_FILE)
        with open(path) as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        for _ in range(data.draw(st.integers(0, 3))):
            op = data.draw(st.sampled_from(["drop", "add", "value", "shard", "map", "whole"]))
            name = data.draw(st.sampled_from(sorted(weight_map))) if isinstance(weight_map, dict) and weight_map \
                else None
            if op == "whole":
                index = data.draw(JSON)
                break
            if op == "map":
                weight_map = index["weight_map"] = data.draw(JSON)
            elif name is None:
                continue
            elif op == "drop":
                weight_map.pop(name)
            elif op == "add":
                weight_map[data.draw(NAMES)] = data.draw(st.sampled_from(_shards(dirs[role])))
            elif op == "value":
                weight_map[name] = data.draw(JSON)
            else:
                weight_map[name] = data.draw(st.sampled_from(["", "../x", "a/b", "config.json", "missing.safetensors",
                                                              *_shards(dirs[role])]))
        text = data.draw(object_text(index)) if isinstance(index, dict) else _dumps(index)
        with open(path, "wb") as fh:
            fh.write(text.encode("utf-8", "surrogatepass"))
        run_case(dirs)


@FUZZ
@given(data=st.data())
def test_fuzz_config_files(pristine, data):
    role = data.draw(st.sampled_from(ROLES))
    with victim(pristine, role) as dirs:
        path = os.path.join(dirs[role], "config.json")
        with open(path) as fh:
            config = json.load(fh)
        if data.draw(st.integers(0, 9)) == 0:
            raw = data.draw(st.binary(max_size=100))
        else:
            for _ in range(data.draw(st.integers(1, 3))):
                key = data.draw(st.sampled_from(["vocab_size", "model_type", "tie_word_embeddings", "text_config",
                                                 "torch_dtype", "other"]))
                if data.draw(st.booleans()):
                    config.pop(key, None)
                else:
                    config[key] = data.draw(JSON)
            raw = data.draw(object_text(config)).encode("utf-8", "surrogatepass")
        with open(path, "wb") as fh:
            fh.write(raw)
        run_case(dirs)


PATTERN_TEXT = st.text(alphabet="ab.*+?()[]{}|\\^$:,0123456789-=<!PzZdw", max_size=24)


@FUZZ
@given(include=st.lists(PATTERN_TEXT, max_size=3), exclude=st.lists(PATTERN_TEXT, max_size=3),
       vocab=st.sampled_from(["extend", "target"]), dtype=st.sampled_from(["auto", "float32", "bfloat16"]),
       shard_size=st.one_of(st.integers(-10, 10**13), st.text(alphabet="0123456789.kKmMgGtTiIbB ", max_size=12)))
def test_fuzz_options(pristine, include, exclude, vocab, dtype, shard_size):
    try:
        options = GraftOptions(include=include, exclude=exclude, vocab=vocab, dtype=dtype, shard_size=shard_size)
    except GraftError as err:
        assert err.code == "invalid_option"
        return
    assert 0 < options.shard_size <= 5 * 10**12
    with time_limit(CASE_SECONDS):
        assert isinstance(options.selects("model.layers.0." + "a" * 5000 + ".weight"), bool)
    run_case(pristine, options)


# --- mergekit YAML -----------------------------------------------------------------------------------------

# Scalars as YAML text: numbers at and past a float's range, YAML 1.1's other types (dates, binary, sexagesimal,
# yes/no), explicit tags good and bad, quoting, escapes, aliases to nothing, flow indicators out of place.
YAML_SCALAR_TEXT = st.one_of(
    st.sampled_from([
        "1", "0", "-1", "0.5", "0.3", "0.7", "0.01", "-0.3", "1e308", "1.0e308", "-1.0e+308", "1.0e999", "1e999",
        "1e-320", ".inf", "-.inf", ".nan", "~", "null", "yes", "no", "on", "off", "true", "false", "0x1F", "0o17",
        "017", "0b101", "1:30", "190:20:30.15", "1_000", "2001-13-45", "2001-01-01", "2001-12-14t21:59:43.10-05:00",
        "!!binary aGk=", "!!timestamp 2001-01-01", "!!int x", "!!int ''", "!!float abc", "!!bool maybe", "!!str 1",
        "!!null x", "!!float 1e999", "!foo bar", "!!python/name:os.system", "!!set {a, b}", "!!omap [{a: 1}]",
        "'quoted'", '"\\ud800"', '"\\ud83d\\ude00"', '"\\0"', '"\\x85"', "*nowhere", "''", "9" * 5000,
        "-" + "9" * 400, "0x" + "f" * 500, "1" + "0" * 330, "ties", "task_arithmetic", "breadcrumbs",
        "breadcrumbs_ties", "dare_ties", "dare_linear", "linear", "slerp", "float32", "bfloat16", "float64", "int8",
        "torch.float16", "/m/base", "/m/ft", "org/model", "org/model@rev", "s3://b/m", "hf://org/m", "a+b", "..",
    ]),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(min_value=-2.0, max_value=2.0).map(repr),
    st.floats().map(lambda x: f"{x:.17e}"),
    st.text(max_size=10).map(json.dumps),
    st.text(max_size=10).map(lambda t: json.dumps(t, ensure_ascii=False)),
)
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "slices", "model", "weight", "density", "gamma", "normalize", "lambda", "int8_mask", "rescale",
                 "epsilon", "filter", "value", "<<")
YAML_KEY_TEXT = st.one_of(st.sampled_from(MERGEKIT_KEYS), YAML_SCALAR_TEXT, st.just("? [a]"))
# Flow-style YAML trees: lists, mappings, scalars, deeply nested runs (inside and past the bound).
YAML_TREE = st.recursive(
    YAML_SCALAR_TEXT,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(YAML_KEY_TEXT, inner), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"),
        st.tuples(DEPTHS, inner).map(lambda d: "[" * min(d[0], 6000) + d[1] + "]" * min(d[0], 6000)),
        st.tuples(DEPTHS, inner).map(lambda d: "{a: " * min(d[0], 3000) + d[1] + "}" * min(d[0], 3000)),
    ), max_leaves=10)


@st.composite
def yaml_value(draw, anchors: list[str], flag: bool = False) -> str:
    """A value for a mergekit key: mostly plain numbers, sometimes any scalar, a list, a filter list, any
    tree, an anchored value, an alias (to an anchor defined above, or to none), or a merge key over one."""
    kind = draw(st.sampled_from(["number"] * 8 + ["scalar", "list", "filters", "tree", "anchor", "alias", "merge"]))
    if kind in ("alias", "merge") and not anchors:
        kind = "number"
    if kind == "number" and flag:
        return draw(st.sampled_from(["true", "false"]))
    if kind == "number":
        return draw(st.floats(min_value=0.0, max_value=1.0).map(repr) | st.sampled_from(["1", "0.5", "true"]))
    if kind == "scalar":
        return draw(YAML_SCALAR_TEXT)
    if kind == "list":
        return "[" + ", ".join(draw(st.lists(st.floats(min_value=-1.0, max_value=1.0).map(repr) | YAML_SCALAR_TEXT,
                                             min_size=1, max_size=4))) + "]"
    if kind == "filters":
        return "[{filter: " + draw(st.sampled_from(["'*'", "mlp", "self_attn", "~"])) + ", value: " + \
            draw(YAML_SCALAR_TEXT) + "}, {value: 1}]"
    if kind == "tree":
        return draw(YAML_TREE)
    if kind == "anchor":
        name = f"a{len(anchors)}"
        anchors.append(name)
        return f"&{name} " + draw(st.one_of(YAML_SCALAR_TEXT, YAML_TREE))
    if kind == "alias":
        return "*" + draw(st.sampled_from(anchors))
    return "{<<: *" + draw(st.sampled_from(anchors)) + ", weight: " + draw(YAML_SCALAR_TEXT) + "}"


@st.composite
def mergekit_document(draw) -> str:
    """A mergekit-like config in block style (merge method, base, models with parameters, top-level
    parameters, dtypes), its values from yaml_value: mostly what the method takes, so that many reach the
    converter's own checks and some become recipes; now and then any key, any reference, any value."""
    def sane(common, rare=YAML_SCALAR_TEXT):  # nine times in ten the common kind
        return draw(common) if draw(USUALLY) else draw(rare)

    def names(allowed: tuple[str, ...], weight: bool) -> list[str]:
        chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=2))
        if weight and "weight" not in chosen and draw(USUALLY):
            chosen.insert(0, "weight")
        if not draw(USUALLY):
            chosen.append(draw(st.sampled_from(("normalize", "lambda", "rescale", "epsilon", "gamma", "density",
                                                "int8_mask", "filter"))))
        return list(dict.fromkeys(chosen))

    anchors: list[str] = []
    refs = st.sampled_from(["/m/base", "/m/ft1", "/m/ft2", "/m/ft3", "org/ft", "s3://b/ft", "hf://o/m@r"])
    method = draw(st.sampled_from(MERGEKIT_METHODS))
    per_model = {"linear": ("weight",), "breadcrumbs": ("weight", "density", "gamma"),
                 "breadcrumbs_ties": ("weight", "density", "gamma")}.get(method, ("weight", "density"))
    shared = ("normalize",) if method == "linear" else ("normalize", "lambda", "int8_mask")
    lines = [f"merge_method: {sane(st.just(method))}"]
    if draw(USUALLY):
        lines.append(f"base_model: {sane(st.just('/m/base'), refs | YAML_SCALAR_TEXT)}")
    if draw(st.booleans()):
        lines.append("parameters:")
        lines += [f"  {name}: {draw(yaml_value(anchors, name in FLAGS))}" for name in names(per_model + shared, False)]
    if draw(USUALLY):
        lines.append("models:")
        for i in range(draw(st.integers(1 if method != "linear" else 2, 4)) if draw(USUALLY) else 0):
            model = "/m/base" if method == "linear" and i == 0 else f"/m/ft{i}"
            lines.append(f"  - model: {sane(st.just(model), refs | YAML_SCALAR_TEXT)}")
            chosen = names(per_model, True)
            if chosen:
                lines.append("    parameters:")
                lines += [f"      {name}: {draw(yaml_value(anchors, name in FLAGS))}" for name in chosen]
    if draw(st.booleans()):
        lines.append(f"dtype: {sane(st.sampled_from(['float32', 'bfloat16', 'float16', 'float64']))}")
    if not draw(USUALLY_5):
        lines.append(f"{draw(YAML_KEY_TEXT)}: {draw(yaml_value(anchors))}")
    return "\n".join(lines) + "\n"


FLAGS = ("normalize", "int8_mask", "rescale")
# True nine times in ten (four in five): hypothesis draws small integers far more often than their share, and
# "integers(0, 9) != 0" would take the rare branch about half the time.
USUALLY = st.sampled_from([True] * 9 + [False])
USUALLY_5 = st.sampled_from([True] * 4 + [False])
MERGEKIT_METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                    "linear"]
YAML_SNIPPETS = ["[" * 5000, "]" * 5000, "{a: " * 3000, "- " * 3000, "9" * 5000, "2001-13-45", "&x [*x]", "*x",
                 "&x", "!!binary x", "!!set", "!!python/object:os.system", "\t", "\x00", "\ufeff", "\x85", "\u2028",
                 "\ud800", "\n---\n", "\n...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "? ", "- ", "<<: ", ": ",
                 "|\n", ">-\n", "'", '"', "#", ",", "1e308", ".nan", "~", "\n  ", "\n"]


@st.composite
def mutated_yaml(draw) -> str:
    """A document (generated, or a plain valid config) with raw text edits: inserted characters or hostile
    snippets, deleted or duplicated spans."""
    text = draw(mergekit_document()) if draw(st.booleans()) else (
        "merge_method: ties\nbase_model: /m/base\nmodels:\n  - model: /m/ft1\n    parameters: {weight: 1.0, "
        "density: 0.5}\n  - model: /m/ft2\n    parameters:\n      weight: [0.2, 0.8]\n      density: 0.5\n"
        "dtype: float32\n")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "snippet", "delete", "duplicate"]))
        if op == "insert":
            text = text[:at] + draw(st.text(alphabet=st.sampled_from("[]{}:,-?&*!|>'\"#%@` \n\t\\0123456789.e"),
                                            min_size=1, max_size=4) | st.text(min_size=1, max_size=3)) + text[at:]
        elif op == "snippet":
            text = text[:at] + draw(st.sampled_from(YAML_SNIPPETS)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        else:
            end = min(len(text), at + draw(st.integers(1, 80)))
            text = text[:end] + text[at:end] * draw(st.integers(1, 3)) + text[end:]
    return text


def _mergekit_case(config, resolve_local: bool) -> None:
    """A clean refusal or a recipe the API can send back as strict JSON (finite numbers, UTF-8 text)."""
    from worker.engine.planning.mergekit_config import recipe_from_mergekit
    from worker.engine.planning.recipe import Recipe

    with time_limit(CASE_SECONDS):
        try:
            recipe = recipe_from_mergekit(config, resolve_local=resolve_local)
        except GraftError as err:
            assert err.code == "invalid_recipe" and err.message.startswith("mergekit config"), (err.code, err.message)
            return
    assert isinstance(recipe, Recipe)
    json.dumps(recipe.to_dict(), allow_nan=False, ensure_ascii=False).encode("utf-8")


def _parsed_elsewhere(text: str):
    """The text as PyYAML's own safe_load builds it (the CLI's way: dates, any depth), or None where it cannot
    (which is PyYAML's business, not the converter's). Merge keys and the generators' deep runs are left out:
    safe_load itself would expand a merge-key bomb, and spend seconds recursing into thousands of brackets."""
    import yaml

    if "<<" in text or len(text) > 20_000 or any(run * 100 in text for run in ("[", "{a: ", "- ")):
        return None
    try:
        with time_limit(CASE_SECONDS):
            return yaml.safe_load(text)
    except Exception:
        return None


# Fewer by default than the other targets: PyYAML is pure Python, and the suite should stay fast.
YAML_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "60")))


@YAML_FUZZ
@given(text=st.one_of(mergekit_document(), mutated_yaml()), resolve_local=st.booleans())
def test_fuzz_mergekit_yaml(text, resolve_local):
    _mergekit_case(text, resolve_local)
    parsed = _parsed_elsewhere(text)
    if parsed is not None:
        _mergekit_case(parsed, resolve_local)
