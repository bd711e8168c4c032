"""mergekit configs of the task-vector family, read as recipes: `graft run --mergekit-config FILE.yml`.

A config means what mergekit 0.1.5 computes from it (read from its source); what graft cannot compute so is
refused with GraftError("invalid_recipe") naming the key and what is not expressible.

- methods (mergekit_methods.py): `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`,
  `breadcrumbs_ties`, `della`, `della_linear` (the base_model is the target and every diff's base), `linear`
  (a base_model among the models, or without one a transfer: a target +1, fine-tunes +w, their base -w) and
  `sce`, each with mergekit's defaults for normalize and rescale; a method or a parameter graft's registry
  lacks is refused naming it.
- parameters (mergekit_settings.py): weight, density, gamma, epsilon, lambda, ... as numbers, gradients
  (lists interpolated over the layers as mergekit does: weight lists, transform numbers as lists) and
  `{filter, value}` conditions (substring matches on the tensor name, first match wins, falling through to
  the slice's and the top-level parameters as mergekit does): rules with per-diff settings. `int8_mask` only
  narrows mergekit's mask dtype: accepted, without effect.
- `models:` or `slices:` whose sources keep the same layers, covering the model from layer 0 (the recipe's
  `layers` then refuses a target of another depth); several slices only as one (the same parameters, no
  gradients, since mergekit restarts a gradient in each slice).
- `dtype` is mergekit's compute dtype: graft computes in float32 whatever it says (float64 where an input is)
  and rounds once; `out_dtype` (or `dtype` without it, as in mergekit) is the stored dtype (options.dtype).
- the output keeps the base model's vocabulary (options.vocab = target), and the recipe carries mergekit's
  conventions (recipe.py): tokenizer, chat template and generation config from the base model, tensors
  outside the layers at a gradient's first value. `tokenizer_source` / `tokenizer.source` (base, a model of
  the merge, union) become the recipe's `tokenizer`, which the planner checks against every input's
  vocabulary (planning/vocabulary.py: refused where mergekit would re-map rows by token); `chat_template` as
  Jinja text becomes the recipe's.
- a file of several stages (YAML documents, `name:` keys; mergekit-multimerge) runs one stage, chosen by
  name; a stage reading another stage's output is refused.
- what graft still computes differently (DARE's rescale and draw, ties at a magnitude threshold, the compute
  dtype) goes with the recipe as `notes`: warnings whenever it runs, and in the manifest.

The YAML is a tenant's: it is read by a safe loader that builds only what JSON has (mappings with string keys,
lists, strings, numbers, booleans, null) and refuses by name what else YAML can say (dates and times, binary,
sets, ordered mappings, non-string keys, integers of more than 400 characters), with collections nested at
most MAX_DEPTH deep (real configs nest about 7) and at most MAX_VALUES values once aliases are expanded (so
neither "billion laughs" nor merge keys `<<` can multiply a page into gigabytes). Any other failure while
reading or converting a config is GraftError("invalid_recipe") too, never another exception.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

import yaml

from worker.engine.errors import GraftError
from worker.engine.planning.mergekit_methods import (
    METHOD_NAMES,
    Parts,
    Scopes,
    Source,
    linear,
    sce,
    task_vector,
)
from worker.engine.planning.mergekit_settings import refuse as _refuse
from worker.engine.planning.recipe import MAX_DIFFS, Recipe, load_recipe
from worker.engine.storage.schemes import SCHEMES

MAX_CONFIG_CHARS = 1 << 20  # a config is a page of YAML; a megabyte is not one
# Collections inside collections. PyYAML's scanner and parser are iterative but its composer recurses (a few
# Python frames a level): 5,000 brackets inside the API's 64 KiB were a RecursionError. Real configs nest
# about 7 deep (models, a model, parameters, a filter list, its value list).
MAX_DEPTH = 64
MAX_VALUES = 100_000  # nodes of a document, each alias counted as many times as it is used
MAX_INT_CHARS = 400  # past 309 digits no integer is a finite float; Python refuses to parse past 4,300
MAX_STAGES = 64  # documents of a multi-stage file
_OUR_DTYPES = ("bfloat16", "float16", "float32")
_MERGEKIT_DTYPES = (*_OUR_DTYPES, "float64")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
_MODEL_KEYS = {"model", "parameters"}
_SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_NOT_TASK_VECTORS = {
    "passthrough": "passthrough copies or stacks layers (a frankenmerge), it merges no task vectors",
    "slerp": "slerp interpolates two models along a sphere, which is no sum of task vectors",
}


def recipe_from_mergekit(config: str | dict, *, resolve_local: bool = True, stage: str | None = None) -> Recipe:
    """The recipe a mergekit config of the task-vector family describes (YAML text or parsed).

    `resolve_local`: a reference naming an existing local directory is that directory (mergekit's rule);
    the API passes False, so that only absolute paths and URIs are local and nothing is probed. `stage`: the
    `name:` of the stage to run in a multi-stage file."""
    try:
        return _convert(config, resolve_local, stage)
    except GraftError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a tenant's document must not become a 500, whatever it trips over
        detail = str(exc)[:200]
        raise GraftError("invalid_recipe", f"mergekit config: cannot be read ({type(exc).__name__}"
                         + (f": {detail})" if detail else ")")) from exc


def _convert(config: str | dict, resolve_local: bool, stage: str | None) -> Recipe:
    doc = _parse(config, stage)
    unknown = sorted(set(doc) - _TOP_KEYS, key=str)
    if unknown:
        key = str(unknown[0])
        raise _refuse(key, "modules (per-module merges of a multimodal model) are not supported" if key == "modules"
                      else "not a key of a mergekit merge config")
    name = _method(doc.get("merge_method"))
    base = None if doc.get("base_model") is None else _model_uri(doc["base_model"], "base_model", resolve_local)
    if base is None and name != "linear":
        raise _refuse("base_model", f"{name} needs a base model here: it is the target and every diff's base")
    scopes, layers = _scopes(doc, base, resolve_local)
    parts = linear(base, scopes) if name == "linear" else sce(base, scopes) if name == "sce" else \
        task_vector(name, base, scopes)
    if len(parts.diffs) > MAX_DIFFS:
        raise _refuse("models", f"at most {MAX_DIFFS} models besides the base")
    recipe = {"target_base": parts.target, "diffs": parts.diffs, "merge": parts.merge, "rules": parts.rules,
              "options": {"dtype": _dtype(doc), "vocab": "target"}, "conventions": "mergekit",
              "notes": _notes(doc, parts), "layers": layers,
              "tokenizer": _tokenizer(doc, parts, scopes, resolve_local), "chat_template": _chat_template(doc)}
    return load_recipe(recipe, where="mergekit config")


def _method(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise _refuse("merge_method", "required: one of " + ", ".join(METHOD_NAMES))
    if name not in METHOD_NAMES:
        why = _NOT_TASK_VECTORS.get(name, "not of the task-vector family")
        raise _refuse("merge_method", f"{name!r}: {why} (supported: " + ", ".join(METHOD_NAMES) + ")")
    return name


def _parse(config: str | dict, stage: str | None) -> dict:
    if isinstance(config, str):
        if len(config) > MAX_CONFIG_CHARS:
            raise GraftError("invalid_recipe", f"mergekit config: longer than {MAX_CONFIG_CHARS} characters")
        docs = load_yaml_documents(config)
    else:
        docs = [config]
    for doc in docs:
        _check_plain(doc)  # an already parsed config (the CLI's safe_load) gets the loader's refusals
        if not isinstance(doc, dict):
            raise GraftError("invalid_recipe", "mergekit config: expected a mapping at the top level")
    return _stage(docs, stage)


def _stage(docs: list[dict], stage: str | None) -> dict:
    """One document: the only one, or the stage named `stage` of a multi-stage file."""
    names = [d.get("name") for d in docs]
    shown = ", ".join(repr(n) if n is not None else "the unnamed final merge" for n in names)
    if stage is not None:
        if stage not in names:
            raise _refuse("name", f"no stage named {stage!r} (stages: {shown})")
        doc = docs[names.index(stage)]
    elif len(docs) != 1:
        raise _refuse("name", f"a multi-stage file ({len(docs)} stages: {shown}): graft runs one merge at a time; "
                      "choose a stage by its name, or split the file")
    else:
        doc = docs[0]
    if doc.get("name") is not None and not isinstance(doc["name"], str):
        raise _refuse("name", "a stage's name is a string")
    used = _stage_references(doc, {n for n in names if n is not None})
    if used:
        raise _refuse("models", f"this stage merges the output of stage {used[0]!r}, which graft does not build in "
                      "the same run: run that stage first and name its output here")
    return doc


def _stage_references(doc: dict, names: set[str]) -> list[str]:
    """The other stages' names this stage reads as models (anything malformed is the checks' to refuse)."""
    entries = [doc.get("base_model"), *_listed(doc.get("models"))]
    for item in _listed(doc.get("slices")):
        entries += _listed(item.get("sources")) if isinstance(item, dict) else []
    refs = [e.get("model") if isinstance(e, dict) else e for e in entries]
    return [r for r in refs if isinstance(r, str) and r in names]


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else []


def load_yaml_documents(text: str, where: str = "mergekit config") -> list[Any]:
    """Every document of a YAML stream (a multi-stage file holds several), read as `load_yaml` reads one."""
    try:
        loader = _ConfigLoader(text, where)
        try:
            docs = []
            while loader.check_data():
                docs.append(loader.get_data())
                if len(docs) > MAX_STAGES:
                    raise GraftError("invalid_recipe", f"{where}: more than {MAX_STAGES} documents")
            return docs or [None]
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise GraftError("invalid_recipe", f"{where}: not valid YAML: {exc}") from None


def load_yaml(text: str, where: str = "mergekit config") -> Any:
    """A YAML (or JSON) document from a user, read with the rules above (JSON's types, MAX_DEPTH, MAX_VALUES):
    what it holds, or GraftError("invalid_recipe") naming `where` and the line. Length is the caller's to
    bound."""
    try:
        loader = _ConfigLoader(text, where)  # the reader refuses unprintable characters here already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise GraftError("invalid_recipe", f"{where}: not valid YAML: {exc}") from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader building only what JSON has. The depth and the expanded size are counted on the
    parser's events as they arrive, so the (recursive) composer never goes deeper than MAX_DEPTH collections
    and no alias is expanded past MAX_VALUES; the constructors of YAML's other types refuse them by name, so
    no date, set or giant integer is ever built."""

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self._depth = 0
        self._sizes: dict[yaml.Node, int] = {}  # values each composed node expands to, aliases included

    def refusal(self, at: Any, message: str) -> GraftError:
        """A refusal at a node's or an event's place in the text (PyYAML counts from 0)."""
        mark = at.start_mark
        return GraftError("invalid_recipe", f"{self.where}: line {mark.line + 1}, column {mark.column + 1}: "
                          f"{message}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self._sizes:  # the anchor's collection is still open: the alias is inside it
                raise self.refusal(event, f"the alias *{event.anchor} is used inside what it names (a "
                                   "recursive structure)")
            return node
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection:
            if self._depth >= MAX_DEPTH:
                raise self.refusal(event, f"collections nested deeper than {MAX_DEPTH} levels")
            self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[k] + self._sizes[v] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[v] for v in node.value)
        else:
            size = 1
        if size > MAX_VALUES:
            raise self.refusal(node, f"more than {MAX_VALUES} values (an alias counts as what it names, each time)")
        self._sizes[node] = size
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, _ in node.value:  # before merge keys (<<) bring theirs in, which own keys may override
                if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str":
                    if key.value in seen:  # PyYAML would keep the last silently: ties over task_arithmetic, say
                        raise self.refusal(key, f"the key {key.value[:40]!r} appears twice in one mapping")
                    seen.add(key.value)
            self.flatten_mapping(node)  # merge keys (<<) first: what they bring in is checked too
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
                    raise self.refusal(key, f"a mapping key must be a string (quote it), not {_yaml_kind(key)}")
        return super().construct_mapping(node, deep=deep)


def _yaml_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        value = node.value if len(node.value) <= 40 else node.value[:40] + "..."
        return f"{node.tag.rpartition(':')[2]} {value!r}"
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _refuse_type(what: str, hint: str = ""):
    def construct(loader: _ConfigLoader, node: yaml.Node) -> Any:
        shown = f" {node.value[:40]!r}" if isinstance(node, yaml.ScalarNode) else ""
        raise loader.refusal(node, f"{what}{shown}: not a value JSON has{hint}")
    return construct


def _checked_scalar(what: str, construct):
    """PyYAML's own constructor, its ValueError / KeyError / IndexError on an explicit tag (`!!int x`,
    `!!bool maybe`, `!!int ''`) a refusal."""
    def build(loader: _ConfigLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, IndexError, OverflowError):
            raise loader.refusal(node, f"{node.value[:40]!r} is not {what}") from None
    return build


def _construct_int(loader: _ConfigLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > MAX_INT_CHARS:
        raise loader.refusal(node, f"an integer of {len(node.value)} characters (at most {MAX_INT_CHARS}: no "
                               "float is that long)")
    return _checked_scalar("an integer", yaml.SafeLoader.construct_yaml_int)(loader, node)


def _construct_str(loader: _ConfigLoader, node: yaml.ScalarNode) -> str:
    value = loader.construct_scalar(node)
    if _encodable(value):
        return value
    try:  # PyYAML reads JSON's "\ud83d\ude00" as two surrogates: one character
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        raise loader.refusal(node, "a string with a lone surrogate escape (\\ud800-\\udfff): not text") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float",
                              _checked_scalar("a number", yaml.SafeLoader.construct_yaml_float))
_ConfigLoader.add_constructor("tag:yaml.org,2002:bool",
                              _checked_scalar("true or false", yaml.SafeLoader.construct_yaml_bool))
_ConfigLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _refuse_type(
    "a date or time (YAML timestamp)", " (quote it if it is a name)"))
for _tag, _what in (("binary", "binary data (!!binary)"), ("set", "a set (!!set)"),
                    ("omap", "an ordered mapping (!!omap)"), ("pairs", "a list of pairs (!!pairs)")):
    _ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_type(_what))


def _check_plain(value: Any) -> None:
    """The loader's rules for a config parsed elsewhere: JSON's types only, MAX_DEPTH, MAX_VALUES (shared or
    cyclic references counted each time they are reached). Iterative: no depth can make it recurse."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    seen = 0
    while stack:
        item, path, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise GraftError("invalid_recipe", f"mergekit config: more than {MAX_VALUES} values")
        where = f"mergekit config: {path or 'the document'}"
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise GraftError("invalid_recipe", f"{where}: collections nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, list):
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
                continue
            for key, v in item.items():
                if not isinstance(key, str):
                    raise GraftError("invalid_recipe", f"{where}: a mapping key must be a string, not "
                                     f"{type(key).__name__} {str(key)[:40]!r}")
                stack.append((v, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, str):
            if not _encodable(item):
                raise GraftError("invalid_recipe", f"{where}: a string with a lone surrogate: not text")
        elif not (item is None or isinstance(item, bool | int | float)):
            what = ("a date or time" if isinstance(item, datetime.date | datetime.time) else
                    "binary data" if isinstance(item, bytes | bytearray) else
                    "a set" if isinstance(item, set | frozenset) else f"a {type(item).__name__}")
            raise GraftError("invalid_recipe", f"{where}: {what} is not a value of a mergekit config")


def _model_uri(ref: Any, key: str, resolve_local: bool) -> str:
    """A mergekit model reference as one of our URIs: `org/name[@rev]` is a hub repository, a path (or, with
    `resolve_local`, an existing directory) is local; s3://, hf:// and file:// URIs pass through."""
    if isinstance(ref, dict) and set(ref) == {"model"}:
        ref = ref["model"]  # the mapping form of a plain reference
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 2048:
        raise _refuse(key, "give the model as a path or a hub repository id")
    ref = ref.strip()
    if "://" in ref and ref.split("://", 1)[0].lower() in SCHEMES:  # the storage table's (gs:// when it has one)
        return ref
    if "+" in ref:
        raise _refuse(key, "LoRA adapters (model+lora) are not supported: merge the adapter first")
    if ref.count("@") > 1:
        raise _refuse(key, f"more than one '@' in {ref!r}")
    path, _, revision = ref.partition("@")
    local = path.startswith(("/", "./", "../", "~")) or path in (".", "..") or (
        resolve_local and os.path.isdir(os.path.expanduser(path)))
    if local:
        if revision:
            raise _refuse(key, f"a revision names a hub commit; {path!r} is a local directory")
        return os.path.abspath(os.path.expanduser(path)) if resolve_local else path
    if not _HUB_ID.match(path):
        raise _refuse(key, f"{path!r} is neither a local directory nor a hub repository id")
    return f"hf://{path}" + (f"@{revision}" if revision else "")



def _scopes(doc: dict, base: str | None, resolve_local: bool) -> tuple[Scopes, int | None]:
    """The models and where their parameters are looked up; the layer count a `slices:` config fixes."""
    top = doc.get("parameters")
    if top is not None and not isinstance(top, dict):
        raise _refuse("parameters", "expected a mapping of parameter names to values")
    if ("models" in doc) == ("slices" in doc):
        raise _refuse("slices" if "slices" in doc else "models", "give either models or slices (mergekit takes "
                      "exactly one of them)")
    if "models" in doc:
        return Scopes(_models(doc["models"], resolve_local), top=top), None
    sources, params, layers = _slices(doc["slices"], base, resolve_local)
    return Scopes(sources, slice_params=params, top=top), layers


def _models(models: Any, resolve_local: bool) -> list[Source]:
    if not isinstance(models, list) or not models:
        raise _refuse("models", "a list of models to merge is required")
    out: list[Source] = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise _refuse(key, "expected {model, parameters}")
        for name in entry:
            if name not in _MODEL_KEYS:
                raise _refuse(f"{key}.{name}", "not a key of a model entry (model, parameters)")
        out.append(_source(entry, key, resolve_local, out))
    return out


def _source(entry: dict, key: str, resolve_local: bool, seen: list[Source]) -> Source:
    uri = _model_uri(entry.get("model"), f"{key}.model", resolve_local)
    if uri in {s.uri for s in seen}:
        raise _refuse(f"{key}.model", f"{uri} is listed twice")
    ref = entry.get("model")
    return Source(uri, key, entry.get("parameters"), ref if isinstance(ref, str) else "")


def _slices(slices: Any, base: str | None, resolve_local: bool) -> tuple[list[Source], dict | None, int]:
    """`slices:` where every source keeps the same layers, from layer 0 on: the models, the slice's own
    parameters and the layer count. Several slices only where they say what one would."""
    if not isinstance(slices, list) or not slices:
        raise _refuse("slices", "a list of output slices is required")
    first, end = _slice(slices[0], 0, base, resolve_local, start=0)
    for j, later in enumerate(slices[1:], 1):
        sources, end = _slice(later, j, base, resolve_local, start=end)
        if [(s.uri, s.params) for s in sources] != [(s.uri, s.params) for s in first] or \
                later.get("parameters") != slices[0].get("parameters"):
            raise _refuse(f"slices[{j}]", "its models or parameters differ from slices[0]'s: graft merges every "
                          "layer one way (the layers of a slice of its own would need rules per layer range)")
    if len(slices) > 1 and _has_list(slices[0]):
        raise _refuse("slices", "a gradient (a list of values) over several slices: mergekit restarts it in each "
                      "slice, which no weight list over the whole model says; write one slice")
    return first, slices[0].get("parameters"), end


def _slice(item: Any, j: int, base: str | None, resolve_local: bool, start: int) -> tuple[list[Source], int]:
    key = f"slices[{j}]"
    if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise _refuse(f"{key}.sources", "a slice lists its sources")
    for name in item:
        if name not in _SLICE_KEYS:
            raise _refuse(f"{key}.{name}", "not a key of a slice (sources, parameters)")
    if item.get("residual_weight") is not None:
        raise _refuse(f"{key}.residual_weight", "not supported")
    if item.get("base_model") is not None and _model_uri(item["base_model"], f"{key}.base_model",
                                                         resolve_local) != base:
        raise _refuse(f"{key}.base_model", "a slice's own base model differs from base_model: graft merges every "
                      "layer over one base")
    sources: list[Source] = []
    ranges = set()
    for i, src in enumerate(item["sources"]):
        where = f"{key}.sources[{i}]"
        if not isinstance(src, dict) or set(src) - _SOURCE_KEYS:
            raise _refuse(where, "expected {model, layer_range, parameters}")
        ranges.add(_layer_range(src.get("layer_range"), f"{where}.layer_range"))
        sources.append(_source(src, where, resolve_local, sources))
    if len(ranges) > 1:
        raise _refuse(f"{key}.sources", f"the sources keep different layers {sorted(ranges)}: the output would "
                      "stack layers of different depths (a frankenmerge), which graft does not build")
    low, high = ranges.pop()
    if low != start:
        raise _refuse(f"{key}.sources", f"layer_range [{low}, {high}] where layer {start} comes next: the output "
                      "would lack or repeat layers (a cut or stacked model), which graft does not build; cover "
                      "every layer, from 0, in order")
    if base is not None and base not in {s.uri for s in sources}:
        raise _refuse(f"{key}.sources", "base_model is not among the slice's sources (mergekit refuses such a "
                      "slice: its merge needs the base's layers)")
    return sources, high


def _layer_range(value: Any, key: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value)) or not 0 <= value[0] < value[1]:
        raise _refuse(key, "expected [first, end) layer indices, first < end")
    return value[0], value[1]


def _has_list(item: Any) -> bool:
    if isinstance(item, list):
        return any(isinstance(v, int | float | str) and not isinstance(v, bool) for v in item) or \
            any(_has_list(v) for v in item)
    if isinstance(item, dict):
        return any(_has_list(v) for k, v in item.items() if k != "layer_range")
    return False


def _tokenizer(doc: dict, parts: Parts, scopes: Scopes, resolve_local: bool) -> dict | None:
    """tokenizer_source / tokenizer.source as the recipe's `tokenizer` (mergekit builds the output's tokenizer
    and re-maps every model's embedding rows to it by token; graft checks at planning that its rows line up
    by id, planning/vocabulary.py)."""
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        raise _refuse("tokenizer", "give tokenizer_source or tokenizer, not both (mergekit refuses both)")
    source, key = doc.get("tokenizer_source"), "tokenizer_source"
    spec = doc.get("tokenizer")
    if spec is not None:
        if not isinstance(spec, dict) or set(spec) - {"source", "tokens", "pad_to_multiple_of"}:
            raise _refuse("tokenizer", "expected {source, tokens, pad_to_multiple_of}")
        if spec.get("tokens"):
            raise _refuse("tokenizer.tokens", "per-token embedding sources are not supported (graft keeps rows "
                          "as the models have them)")
        if spec.get("pad_to_multiple_of") is not None:
            raise _refuse("tokenizer.pad_to_multiple_of", "padding the vocabulary adds rows (the mean embedding), "
                          "which graft does not write")
        source, key = spec.get("source", "union"), "tokenizer.source"  # mergekit's default source: union
    if source is None:
        return None
    if source in ("base", "union"):
        return {"source": parts.target, "vocabularies": "agree" if source == "base" else "equal"}
    uri = _model_uri(source, key, resolve_local)
    if uri not in {s.uri for s in scopes.sources} | {parts.target}:
        raise _refuse(key, f"{uri} is not one of the merged models: graft takes the output's files from its inputs")
    return {"source": uri, "vocabularies": "agree"}


def _chat_template(doc: dict) -> str | None:
    """mergekit's chat_template: Jinja text is the output's template; a name of mergekit's own templates and
    `auto` (the most common template of the models, found when merging) are refused."""
    template = doc.get("chat_template")
    if template is None:
        return None
    if not isinstance(template, str):
        raise _refuse("chat_template", "expected the template's Jinja text")
    if template == "auto":
        raise _refuse("chat_template", "auto picks the models' most common template while merging: give the "
                      "template text, or name the model with tokenizer_source")
    if "{" not in template or len(template) < 20:
        raise _refuse("chat_template", f"{template[:40]!r} names one of mergekit's own templates, which graft "
                      "does not carry (or is no template): give the template's Jinja text")
    return template


def _notes(doc: dict, parts: Parts) -> list[dict]:
    """What the recipe computes differently from mergekit 0.1.5 running the same config: said whenever the
    recipe runs."""
    from worker.engine.methods import TRANSFORMS

    merge = parts.merge
    used = set(parts.used)
    if merge["method"] == "ties" and merge.get("density", 1.0) < 1:
        used.add("magnitude")
    if merge["method"] == "dare_ties" and merge.get("density", 1.0) < 1:
        used.add("dare")
    notes = list(parts.notes)
    if "dare" in used and "rescale" not in TRANSFORMS["dare"].Params.model_fields:
        notes.append({"code": "dare_rescale", "message": "DARE's kept elements are rescaled by exactly "
                      "1 / density; mergekit (rescale: true) rescales them to the delta's L1 norm"})
    if used & {"dare", "della"}:
        notes.append({"code": "dare_draw", "message": "the random draw is graft's (counter-based, the same "
                      "for a given seed on every run and worker): other elements are dropped than in mergekit's run"})
    if used & {"magnitude", "breadcrumbs"}:
        notes.append({"code": "threshold_ties", "message": "equal magnitudes at a trim's threshold are kept in "
                      "element order; mergekit's sort keeps any of them"})
    dtype = doc.get("dtype")
    name = dtype[len("torch."):] if isinstance(dtype, str) and dtype.startswith("torch.") else dtype
    if name not in ("float32", "float64"):
        said = f"in {name}" if name else "in the inputs' own dtype (no dtype given)"
        notes.append({"code": "compute_dtype", "message": f"mergekit computes {said}; graft accumulates in "
                      "float32 (float64 where an input is) and rounds once to the stored dtype, so low bits differ"})
    return notes


def _dtype(doc: dict) -> str:
    """options.dtype: out_dtype, else dtype (mergekit stores in its compute dtype without out_dtype)."""
    chosen = "auto"
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if value is None:
            continue
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if name not in _MERGEKIT_DTYPES:
            raise _refuse(key, f"expected one of {', '.join(_MERGEKIT_DTYPES)}")
        if name not in _OUR_DTYPES and (key == "out_dtype" or doc.get("out_dtype") is None):
            raise _refuse(key, f"graft stores {', '.join(_OUR_DTYPES)} (or the inputs' own dtype without it)")
        chosen = name if name in _OUR_DTYPES else chosen
    return chosen
