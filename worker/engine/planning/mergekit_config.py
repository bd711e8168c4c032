"""mergekit configs of the task-vector family, read as recipes: `graft run --mergekit-config FILE.yml`.

A team keeps its configs: `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`,
`breadcrumbs_ties` and `linear` (with a `base_model`) map onto a recipe whose target and every diff's source
base are mergekit's `base_model` (mergekit 0.1.5's semantics, read from its source):

- per model: `weight` (a number, or a list interpolated over the layer index as mergekit does), `density`
  (the magnitude trim of ties / breadcrumbs, the keep probability of the dare methods) and `gamma`
  (breadcrumbs' outliers); the same keys under the top-level `parameters` apply to every model without its
  own, as in mergekit.
- top level: `normalize` and `lambda` (each method's mergekit default when absent); `int8_mask` is accepted
  and ignored (it only narrows mergekit's mask dtype: the same result); `rescale` is accepted where it says
  what graft does (true for the dare methods, whose survivors graft rescales by 1 / density, where mergekit
  matches the L1 norm; false for the others) and refused otherwise.
- `dtype` is mergekit's compute dtype: graft computes in float32 whatever it says (float64 where an input is
  float64) and rounds once; `out_dtype` (or `dtype` without it, as in mergekit) is the stored dtype
  (options.dtype).
- the output keeps the base model's vocabulary (options.vocab = target), as mergekit's output does without a
  tokenizer_source, and the recipe carries mergekit's conventions (recipe.py): the tokenizer, chat template
  and generation config come from the base model, and a weight list gives the embeddings, the final norm and
  the head its first value (mergekit plans every tensor outside the layers at t = 0).
- what graft still computes differently (DARE's rescale and draw, ties at a magnitude threshold, the compute
  dtype) goes with the recipe as `notes`: warnings whenever it runs, and in the manifest.

Anything else (other merge methods, slices, modules, tokenizer settings, per-tensor parameter filters,
LoRA references, per-layer densities, a key mergekit would ignore) is refused with
GraftError("invalid_recipe") naming the key.

The YAML is a tenant's: it is read by a safe loader that builds only what JSON has (mappings with string keys,
lists, strings, numbers, booleans, null) and refuses by name what else YAML can say (dates and times, binary,
sets, ordered mappings, non-string keys, integers of more than 400 characters), with collections nested at
most MAX_DEPTH deep (real configs nest about 7) and at most MAX_VALUES values once aliases are expanded (so
neither "billion laughs" nor merge keys `<<` can multiply a page into gigabytes). Any other failure while
reading or converting a config is GraftError("invalid_recipe") too, never another exception.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from worker.engine.errors import GraftError
from worker.engine.planning.recipe import MAX_DIFFS, MAX_WEIGHT_POINTS, Recipe, load_recipe

MAX_CONFIG_CHARS = 1 << 20  # a config is a page of YAML; a megabyte is not one
# Collections inside collections. PyYAML's scanner and parser are iterative but its composer recurses (a few
# Python frames a level): 5,000 brackets inside the API's 64 KiB were a RecursionError. Real configs nest
# about 7 deep (models, a model, parameters, a filter list, its value list).
MAX_DEPTH = 64
MAX_VALUES = 100_000  # nodes of a document, each alias counted as many times as it is used
MAX_INT_CHARS = 400  # past 309 digits no integer is a finite float; Python refuses to parse past 4,300
_OUR_DTYPES = ("bfloat16", "float16", "float32")
_MERGEKIT_DTYPES = (*_OUR_DTYPES, "float64")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SCHEMES = ("s3://", "hf://", "file://")
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_MODEL_KEYS = {"model", "parameters"}


@dataclass(frozen=True)
class _Method:
    """One mergekit method: the recipe merge it becomes, the transform its sparsification is, and mergekit's
    defaults for normalize and rescale."""

    merge: str  # sum | ties | dare_ties
    transform: str | None  # magnitude | dare | breadcrumbs | None
    normalize: bool
    rescale: bool
    shared: tuple[str, ...] = ("int8_mask", "normalize", "rescale", "lambda")
    per_model: tuple[str, ...] = ("weight", "density")


METHODS: dict[str, _Method] = {
    "task_arithmetic": _Method("sum", None, normalize=False, rescale=False),
    "ties": _Method("ties", "magnitude", normalize=True, rescale=False),
    "dare_ties": _Method("dare_ties", "dare", normalize=False, rescale=True),
    "dare_linear": _Method("sum", "dare", normalize=False, rescale=True),
    "breadcrumbs": _Method("sum", "breadcrumbs", normalize=False, rescale=False,
                           per_model=("weight", "density", "gamma")),
    "breadcrumbs_ties": _Method("ties", "breadcrumbs", normalize=False, rescale=False,
                                per_model=("weight", "density", "gamma")),
    # The base takes a weight like every input; the output is a weighted average of the models.
    "linear": _Method("sum", None, normalize=True, rescale=False, shared=("normalize",), per_model=("weight",)),
}


def _refuse(key: str, message: str) -> GraftError:
    return GraftError("invalid_recipe", f"mergekit config: {key}: {message}", {"field": key})


def recipe_from_mergekit(config: str | dict, *, resolve_local: bool = True) -> Recipe:
    """The recipe a mergekit config of the task-vector family describes (YAML text or parsed).

    `resolve_local`: a reference naming an existing local directory is that directory (mergekit's rule);
    the API passes False, so that only absolute paths and URIs are local and nothing is probed."""
    try:
        return _convert(config, resolve_local)
    except GraftError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a tenant's document must not become a 500, whatever it trips over
        detail = str(exc)[:200]
        raise GraftError("invalid_recipe", f"mergekit config: cannot be read ({type(exc).__name__}"
                         + (f": {detail})" if detail else ")")) from exc


def _convert(config: str | dict, resolve_local: bool) -> Recipe:
    doc = _parse(config)
    unknown = sorted(set(doc) - _TOP_KEYS, key=str)
    if unknown:
        key = str(unknown[0])
        why = {"slices": "slices and layer ranges are not supported", "modules": "modules are not supported",
               "tokenizer_source": "the output keeps the base model's tokenizer rows",
               "tokenizer": "tokenizer settings are not supported",
               "chat_template": "the chat template comes from base_model's tokenizer files (mergekit's default)"
               }.get(key, "not supported")
        raise _refuse(key, why)
    name = doc.get("merge_method")
    if not isinstance(name, str) or not name:
        raise _refuse("merge_method", "required: one of " + ", ".join(METHODS))
    method = METHODS.get(name)
    if method is None:
        raise _refuse("merge_method", f"{name!r} is not of the task-vector family (supported: "
                      + ", ".join(METHODS) + ")")
    if doc.get("base_model") is None:
        raise _refuse("base_model", f"{name} needs a base model here: it is the target and every diff's base")
    base = _model_uri(doc["base_model"], "base_model", resolve_local)
    top = _parameters(doc.get("parameters"), "parameters", set(method.shared) | set(method.per_model))
    normalize = _boolean(top, "normalize", method.normalize)
    _boolean(top, "int8_mask", False)  # accepted, without effect on the result
    _check_rescale(top, name, method)
    lam = _number(top["lambda"], "parameters.lambda") if "lambda" in top else 1.0
    diffs, base_weight = _diffs(doc.get("models"), top, method, base, resolve_local)
    if name == "linear":
        _linear_weights(diffs, base_weight, normalize)
        normalize = False  # folded into the weights, the base's included
    merge = _merge(name, method, diffs, normalize, lam, top)
    recipe = {"target_base": base, "diffs": diffs, "merge": merge, "options": {"dtype": _dtype(doc), "vocab": "target"},
              "conventions": "mergekit", "notes": _notes(doc, diffs, merge)}
    return load_recipe(recipe, where="mergekit config")


def _parse(config: str | dict) -> dict:
    if isinstance(config, str):
        if len(config) > MAX_CONFIG_CHARS:
            raise GraftError("invalid_recipe", f"mergekit config: longer than {MAX_CONFIG_CHARS} characters")
        config = load_yaml(config)
    _check_plain(config)  # an already parsed config (the CLI's safe_load) gets the loader's refusals
    if not isinstance(config, dict):
        raise GraftError("invalid_recipe", "mergekit config: expected a mapping at the top level")
    return config


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
    if ref.startswith(_SCHEMES):
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


def _parameters(value: Any, key: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _refuse(key, "expected a mapping of parameter names to values")
    for name in value:
        if name not in allowed:
            raise _refuse(f"{key}.{name}", "not a parameter of this merge method here (it takes "
                          + ", ".join(sorted(allowed)) + ")")
    return {name: _unconditional(setting, f"{key}.{name}") for name, setting in value.items()}


def _unconditional(setting: Any, key: str) -> Any:
    """A setting without per-tensor filters: `{value, filter}` forms are unwrapped when the first condition
    applies to every tensor (mergekit takes the first that matches) and refused otherwise."""
    conds = setting if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting) \
        else [setting] if isinstance(setting, dict) else None
    if conds is None:
        return setting
    first = conds[0]
    if set(first) - {"value", "filter"} or "value" not in first:
        raise _refuse(key, "expected {value, filter}")
    if first.get("filter") not in (None, "*"):
        raise _refuse(f"{key}.filter", "per-tensor parameter filters are not supported: write a graft recipe "
                      "with rules instead")
    if isinstance(first["value"], dict):
        raise _refuse(f"{key}.value", "expected a number or a list of numbers")
    return first["value"]


def _number(value: Any, key: str) -> float:
    """A finite number; numeric strings too (YAML reads `1e-3` as a string, mergekit as a number)."""
    if isinstance(value, bool):
        raise _refuse(key, "expected a number, not a boolean")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _refuse(key, f"expected a number, got {value[:40]!r}") from None
    if isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise _refuse(key, "a number past the range of a float (about 1.8e308)") from None
    if not isinstance(value, float):
        raise _refuse(key, "expected a number")
    if not math.isfinite(value):
        raise _refuse(key, f"expected a finite number, got {value}")
    return float(value)


def _boolean(params: dict, name: str, default: bool) -> bool:
    if name not in params:
        return default
    if not isinstance(params[name], bool):
        raise _refuse(f"parameters.{name}", "expected true or false")
    return params[name]


def _check_rescale(top: dict, name: str, method: _Method) -> None:
    rescale = _boolean(top, "rescale", method.rescale)
    if rescale == method.rescale or method.transform is None:
        return  # what graft does, or nothing to rescale
    if method.transform == "dare":
        raise _refuse("parameters.rescale", "graft's dare always rescales the kept elements by 1 / density")
    raise _refuse("parameters.rescale", f"graft does not rescale {name}'s trimmed deltas to their norm")


def _weight(value: Any, key: str) -> float | list[float]:
    if isinstance(value, list):
        if not value or len(value) > MAX_WEIGHT_POINTS:
            raise _refuse(key, f"a list of 1 to {MAX_WEIGHT_POINTS} numbers")
        return [_number(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _number(value, key)


def _scalar(value: Any, key: str) -> float:
    """A density or gamma: graft's transforms take one value per diff, so a list must be constant."""
    if isinstance(value, list):
        values = _weight(value, key)
        if len(set(values)) != 1:
            raise _refuse(key, "per-layer values are not supported here (one value per model)")
        return values[0]
    return _number(value, key)


def _diffs(models: Any, top: dict, method: _Method, base: str,
           resolve_local: bool) -> tuple[list[dict], tuple[Any, str]]:
    """One diff per model other than the base, and the base's own weight (linear counts it)."""
    if not isinstance(models, list) or not models:
        raise _refuse("models", "a list of models to merge is required")
    diffs, seen, base_weight = [], set(), (top.get("weight"), "parameters.weight")
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise _refuse(key, "expected {model, parameters}")
        for name in entry:
            if name not in _MODEL_KEYS:
                raise _refuse(f"{key}.{name}", "not supported")
        uri = _model_uri(entry.get("model"), f"{key}.model", resolve_local)
        if uri in seen:
            raise _refuse(f"{key}.model", f"{uri} is listed twice")
        seen.add(uri)
        params = {**top, **_parameters(entry.get("parameters"), f"{key}.parameters", set(method.per_model))}
        if uri == base:
            if "weight" in params:  # the base's delta is zero; only linear's average counts its weight
                base_weight = (params["weight"], f"{key}.parameters.weight" if "weight" in (
                    entry.get("parameters") or {}) else "parameters.weight")
            continue
        diffs.append(_diff(params, method, base, uri, key))
    if not diffs:
        raise _refuse("models", "no model besides base_model: nothing to merge")
    if len(diffs) > MAX_DIFFS:
        raise _refuse("models", f"at most {MAX_DIFFS} models besides the base")
    return diffs, base_weight


def _diff(params: dict, method: _Method, base: str, uri: str, key: str) -> dict:
    where = f"{key}.parameters"
    if "weight" not in params:
        raise _refuse(f"{where}.weight", "required (here or under the top-level parameters)")
    diff: dict = {"source_base": base, "source_finetuned": uri, "weight": _weight(params["weight"],
                                                                                   f"{where}.weight")}
    density = _scalar(params["density"], f"{where}.density") if "density" in params else 1.0
    if method.transform is not None and density <= 0:
        raise _refuse(f"{where}.density", "must be above 0 (a model kept at density 0 adds nothing: leave it out)")
    diff["_density"] = min(density, 1.0)  # mergekit treats a density >= 1 as no sparsification
    if method.transform == "breadcrumbs" and density < 1:
        gamma = _scalar(params["gamma"], f"{where}.gamma") if "gamma" in params else 0.01
        if not 0 <= gamma < 1:
            raise _refuse(f"{where}.gamma", "must be in [0, 1)")
        # mergekit's own window, its rounding and its quirks included (see methods/breadcrumbs.py): gamma and
        # density are rounded against each tensor's size, so no capping here can stand for it.
        diff["transform"] = {"method": "breadcrumbs", "density": density, "gamma": gamma, "semantics": "mergekit"}
    return diff


def _linear_weights(diffs: list[dict], base_weight: tuple[Any, str], normalize: bool) -> None:
    """linear: sum_i w_i m_i (/ sum_i w_i) = base + sum_i w_i (m_i - base) / W, where W = sum of all the
    weights, the base's included (or W = 1 without normalize, which only holds when the weights add to 1)."""
    if base_weight[0] is None:
        raise _refuse("models", "linear weighs the base model too: list base_model under models with its "
                      "weight, or set parameters.weight")
    weights = [_number(*base_weight)]
    for i, diff in enumerate(diffs):
        if isinstance(diff["weight"], list):
            raise _refuse(f"models[{i}].parameters.weight", "linear takes one weight per model here")
        weights.append(diff["weight"])
    try:
        total = math.fsum(weights)
    except OverflowError:  # the partial sums pass the float range (1e308 + 1e308 - 1e308)
        raise _refuse("models", "the weights' sum passes the range of a float (about 1.8e308)") from None
    if normalize:
        if abs(total) < 1e-8:
            raise _refuse("parameters.weight", "the weights add up to 0: nothing to normalize by")
        for i, diff in enumerate(diffs):
            diff["weight"] = diff["weight"] / total
            if not math.isfinite(diff["weight"]):
                raise _refuse(f"models[{i}].parameters.weight", f"divided by the weights' sum ({total:g}) it "
                              "passes the range of a float")
    elif abs(total - 1.0) > 1e-6:
        raise _refuse("parameters.normalize", f"without normalize the weights (base's included) must add up "
                      f"to 1 (they add up to {total:g}): the base would be scaled, which is not a transfer")


def _merge(name: str, method: _Method, diffs: list[dict], normalize: bool, lam: float, top: dict) -> dict:
    """The recipe's merge; a density shared by every model goes to the merge (ties, dare_ties), others to
    each diff's transform."""
    densities = [d.pop("_density") for d in diffs]
    shared = densities[0] if len(set(densities)) == 1 else None
    if method.merge in ("ties", "dare_ties") and method.transform != "breadcrumbs" and shared is not None:
        merge: dict = {"method": method.merge, "normalize": normalize, "lambda": lam}
        if shared < 1 or method.merge == "dare_ties":
            merge["density"] = shared
        return merge
    for diff, density in zip(diffs, densities, strict=True):
        if density < 1 and method.transform == "magnitude":
            diff["transform"] = {"method": "magnitude", "density": density}
        elif density < 1 and method.transform == "dare":
            diff["transform"] = {"method": "dare", "drop": 1.0 - density}
    merge = {"method": method.merge, "normalize": normalize, "lambda": lam}
    if method.merge == "dare_ties":
        merge["density"] = 1.0  # each diff names its own draw
    return merge


def _notes(doc: dict, diffs: list[dict], merge: dict) -> list[dict]:
    """What the recipe computes differently from mergekit 0.1.5 running the same config: said whenever the
    recipe runs."""
    transforms = [d.get("transform") or {} for d in diffs]
    shared = merge.get("density", 1.0) < 1  # the merge's own draw (dare_ties) or trim (ties) for every diff
    trimmed = merge["method"] == "ties" and shared or any(t.get("method") in ("magnitude", "breadcrumbs")
                                                          for t in transforms)
    dare = merge["method"] == "dare_ties" and shared or any(t.get("method") == "dare" for t in transforms)
    notes = []
    if dare:
        notes.append({"code": "dare_rescale", "message": "DARE's kept elements are rescaled by exactly "
                      "1 / density; mergekit (rescale: true) rescales them to the delta's L1 norm"})
        notes.append({"code": "dare_draw", "message": "DARE's random draw is graft's (counter-based, the same "
                      "for a given seed on every run and worker): other elements are dropped than in mergekit's run"})
    if trimmed:
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
