"""mergekit 0.1.5's task-vector methods as graft recipe parts: diffs, a merge, per-tensor rules and notes.

`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`, `della` and
`della_linear` are mergekit's generalized task arithmetic: a sparsification per model (magnitude, random,
magnitude_outliers, della_magprune), then a sum or a TIES sign vote. graft's merges are `sum` and `ties`
(`dare_ties`: the same vote), the sparsifications its transforms `magnitude`, `dare`, `breadcrumbs` and `della`,
looked up by name in the method registry with mergekit's own parameter names (density, gamma, epsilon,
rescale): a method or parameter the registry lacks is refused naming it. `linear` is a weighted average of the
models, `sce` a merge of its own (`select_topk`).

Every parameter may vary by filter and layer (mergekit_settings.py): the values for tensors matching no filter
are the diffs' own (weights and transform numbers as lists where they are gradients), the others rules with
per-diff settings. A `lambda` that varies is folded into the weights where that is the same arithmetic
(normalize off, and for a vote only a non-negative one); shared flags (normalize, rescale) must be one value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from worker.engine.methods import MERGES, TRANSFORMS
from worker.engine.planning.mergekit_settings import (
    Entry,
    Region,
    chain,
    contains_all,
    decision_list,
    filters_of,
    lookup,
    refuse,
    regions,
)
from worker.engine.planning.recipe import weight_at


@dataclass
class Source:
    """One model of the merge: its URI, where the config names it, and its own parameters."""

    uri: str
    key: str
    params: dict | None
    ref: str = ""  # as the config writes it (for messages that quote a line to add)


@dataclass
class Scopes:
    """Where mergekit looks a parameter up: a model's own, its slice's, the top level's."""

    sources: list[Source]
    slice_params: dict | None = None
    slice_key: str = "slices[0].parameters"
    top: dict | None = None

    def of(self, source: Source | None) -> list[tuple[dict | None, str]]:
        own = [] if source is None else [(source.params, f"{source.key}.parameters")]
        return [*own, (self.slice_params, self.slice_key), (self.top, "parameters")]


@dataclass
class Parts:
    """What a method makes of the config: the recipe's target, diffs, merge and rules, and the transforms
    used (for the notes)."""

    target: str
    diffs: list[dict]
    merge: dict
    rules: list[dict] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    notes: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TaskVector:
    """One of mergekit's generalized task arithmetic methods and its defaults."""

    vote: bool
    sparsify: str | None
    normalize: bool
    rescale: bool
    extra: str | None = None  # gamma (magnitude_outliers) or epsilon (della_magprune)

    @property
    def per_model(self) -> tuple[str, ...]:
        return ("weight", "density") + ((self.extra,) if self.extra else ())


SHARED = ("int8_mask", "normalize", "rescale", "lambda")
EXTRA_DEFAULT = {"gamma": 0.01, "epsilon": 0.15}
GRAFT_TRANSFORM = {"magnitude": "magnitude", "random": "dare", "magnitude_outliers": "breadcrumbs",
                   "della_magprune": "della"}
TASK_VECTOR = {
    "task_arithmetic": TaskVector(False, None, normalize=False, rescale=False),
    "ties": TaskVector(True, "magnitude", normalize=True, rescale=False),
    "dare_ties": TaskVector(True, "random", normalize=False, rescale=True),
    "dare_linear": TaskVector(False, "random", normalize=False, rescale=True),
    "breadcrumbs": TaskVector(False, "magnitude_outliers", normalize=False, rescale=False, extra="gamma"),
    "breadcrumbs_ties": TaskVector(True, "magnitude_outliers", normalize=False, rescale=False, extra="gamma"),
    "della": TaskVector(True, "della_magprune", normalize=True, rescale=True, extra="epsilon"),
    "della_linear": TaskVector(False, "della_magprune", normalize=False, rescale=True, extra="epsilon"),
}
METHOD_NAMES = (*TASK_VECTOR, "linear", "sce")


def check_names(scopes: Scopes, per_model: tuple[str, ...], shared: tuple[str, ...], method: str) -> None:
    """mergekit resolves only its method's parameters and ignores the rest; a name it would ignore is refused
    (a model's own parameters are per model only: mergekit reads shared ones from the slice and top level)."""
    places = [(s.params, f"{s.key}.parameters", per_model) for s in scopes.sources]
    places += [(scopes.slice_params, scopes.slice_key, per_model + shared), (scopes.top, "parameters",
                                                                            per_model + shared)]
    for params, key, allowed in places:
        if params is None:
            continue
        if not isinstance(params, dict):
            raise refuse(key, "expected a mapping of parameter names to values")
        for name in params:
            if name not in allowed:
                raise refuse(f"{key}.{name}", f"not a parameter {method} reads here (it takes "
                             + ", ".join(sorted(allowed)) + "; mergekit would ignore it)")


def one_value(entries_by_region: dict[Region, Entry | None], default: Any, name: str) -> Any:
    """A shared flag's single value over every region, or a refusal naming where it varies."""
    values = {repr(e.value if e else default): (e.value if e else default, e) for e in entries_by_region.values()}
    if len(values) > 1:
        keys = [e.key for _, e in values.values() if e is not None]
        raise refuse(keys[0] if keys else f"parameters.{name}", f"{name} differs between tensors: graft's "
                     "merge takes one value")
    value, entry = next(iter(values.values()))
    if isinstance(value, list):
        raise refuse(entry.key, f"{name}: one value, not a list")
    return value


def _points(value: Any) -> list[float]:
    return value if isinstance(value, list) else [value]


def _fold(weight: Any, lam: Any, key: str) -> Any:
    """lambda folded into a weight: a number or a list times a number (a list times a list is no list)."""
    if isinstance(weight, list) and isinstance(lam, list):
        raise refuse(key, "a lambda list beside a weight list multiplies two gradients, which no weight list says")
    if isinstance(weight, list):
        return [w * lam for w in weight]
    if isinstance(lam, list):
        return [weight * x for x in lam]
    return weight * lam


def _density_points(density: Any, key: str) -> None:
    for d in _points(density):
        if d <= 0:
            raise refuse(key, "must be above 0 (a model kept at density 0 adds nothing: leave it out)")
    if isinstance(density, list) and max(density) > 1:
        raise refuse(key, "a density list with points above 1 (mergekit keeps every element there, and its "
                     "interpolation between such points is not a density graft can take)")


def transform(method: str, tv: TaskVector, values: dict, rescale: bool, key: str) -> dict | None:
    """The graft transform of one diff in one region (None: mergekit leaves the delta as it is)."""
    density = values["density"]
    if tv.sparsify is None or (not isinstance(density, list) and density >= 1):
        return None
    _density_points(density, f"{key}.density")
    name = GRAFT_TRANSFORM[tv.sparsify]
    if name not in TRANSFORMS:
        raise refuse("merge_method", f"{method}: graft has no {name} transform (mergekit's {tv.sparsify} "
                     "sparsification) in its method registry")
    fields = _names(TRANSFORMS[name].Params)
    out: dict = {"method": name}
    if "density" in fields:
        out["density"] = density
    else:  # graft's dare: the drop probability
        out["drop"] = [1.0 - d for d in density] if isinstance(density, list) else 1.0 - density
    if tv.extra:
        out.update(_extra(name, tv.extra, values[tv.extra], fields, f"{key}.{tv.extra}"))
    if "rescale" in fields:
        if rescale != TRANSFORMS[name].Params.model_fields["rescale"].default:  # graft's default says it already
            out["rescale"] = rescale
    elif rescale and name != "dare":
        raise refuse("parameters.rescale", f"graft's {name} has no rescale (mergekit's L1 rescale of the "
                     "sparsified deltas)")
    elif not rescale and name == "dare":
        raise refuse("parameters.rescale", "graft's dare always rescales the kept elements by 1 / density")
    return out


def _names(params: type) -> set[str]:
    """A parameter model's field names as recipes spell them (`lambda` for `lambda_`)."""
    return {info.alias or name for name, info in params.model_fields.items()}


def _extra(name: str, param: str, value: Any, fields: set[str], key: str) -> dict:
    if param not in fields:
        raise refuse(key, f"graft's {name} has no {param}")
    if param == "gamma":
        if any(not 0 <= g < 1 for g in _points(value)):
            raise refuse(key, "must be in [0, 1)")
        # mergekit's own window, rounding included (methods/breadcrumbs.py): no capping here can stand for it.
        return {"gamma": value, "semantics": "mergekit"}
    return {param: value}


def identity(t: dict) -> dict:
    """The transform `t`'s method leaving the delta as it is (a rule overriding a diff that sparsifies)."""
    out = {k: v[0] if isinstance(v, list) else v for k, v in t.items()}
    out.update({"drop": 0.0} if "drop" in t else {"density": 1.0})
    return out


def region_table(sources: list[Source], scopes: Scopes, names: tuple[str, ...], shared: tuple[str, ...],
                 kinds: dict[str, str]) -> tuple[list[Region], dict, dict]:
    """The regions of every filter the parameters use, and each parameter's chain per source and shared."""
    chains = {(i, p): chain(scopes.of(s), p, kinds.get(p, "number")) for i, s in enumerate(sources) for p in names}
    shared_chains = {p: chain(scopes.of(None), p, kinds.get(p, "number")) for p in shared}
    ordered = regions(filters_of([*chains.values(), *shared_chains.values()]), "parameters")
    return ordered, chains, shared_chains


def evaluate(chains: dict, sources: list[Source], region: Region, names: tuple[str, ...],
             defaults: dict[str, Any], describe: str) -> list[dict]:
    """Every source's parameters for tensors of one region; a required one missing is refused as mergekit
    stops on it."""
    out = []
    for i, source in enumerate(sources):
        values = {}
        for name in names:
            entry = lookup(chains[(i, name)], region)
            if entry is None and defaults.get(name) is None:
                where = f"whose names contain {sorted(region)}" if region else "that match none of its filters"
                raise refuse(f"{source.key}.parameters.{name}", (
                    f"required, and no value applies to tensors {where} (mergekit stops there: add a fallback "
                    "`- value: ...`)" if chains[(i, name)] else "required (here, or in the slice's or the top-level "
                    "parameters)") + describe)
            values[name] = entry.value if entry is not None else defaults[name]
        out.append(values)
    return out


def task_vector(method: str, base: str, scopes: Scopes) -> Parts:
    tv = TASK_VECTOR[method]
    check_names(scopes, tv.per_model, SHARED, method)
    sources = [s for s in scopes.sources if s.uri != base]  # the base's delta is zero: it takes no parameters
    if not sources:
        raise refuse("models", "no model besides base_model: nothing to merge")
    kinds = {"normalize": "bool", "rescale": "bool", "int8_mask": "bool"}
    ordered, chains, shared_chains = region_table(sources, scopes, tv.per_model, SHARED, kinds)
    shared = {p: {r: lookup(shared_chains[p], r) for r in ordered} for p in SHARED}
    normalize = one_value(shared["normalize"], tv.normalize, "normalize")
    rescale = one_value(shared["rescale"], tv.rescale, "rescale")
    lambdas = {r: (e.value if e else 1.0) for r, e in shared["lambda"].items()}
    fold = len({repr(v) for v in lambdas.values()}) > 1 or isinstance(next(iter(lambdas.values())), list)
    if fold:
        _check_fold(shared["lambda"], normalize, tv.vote)
    defaults = {"weight": None, "density": 1.0, **({tv.extra: EXTRA_DEFAULT[tv.extra]} if tv.extra else {})}
    if tv.sparsify and GRAFT_TRANSFORM[tv.sparsify] not in TRANSFORMS and method in MERGES:
        values = evaluate(chains, sources, ordered[0], tv.per_model, defaults, "")
        return _registered_merge(method, base, sources, values, len(ordered) > 1 or fold,
                                 {"normalize": normalize, "rescale": rescale, "lambda": lambdas[ordered[0]]})
    used: set[str] = set()

    def settings(region: Region) -> list[tuple[Any, dict | None]]:
        out = []
        for i, values in enumerate(evaluate(chains, sources, region, tv.per_model, defaults, "")):
            weight = _fold(values["weight"], lambdas[region], "parameters.lambda") if fold else values["weight"]
            t = transform(method, tv, values, rescale, f"{sources[i].key}.parameters")
            used.update([t["method"]] if t else [])
            out.append((weight, t))
        return out

    default, rules = decision_list(ordered, settings)
    densities = [v["density"] for v in evaluate(chains, sources, ordered[0], tv.per_model, defaults, "")]
    lam = 1.0 if fold else next(iter(lambdas.values()))
    merge = {"method": "dare_ties" if tv.vote and tv.sparsify == "random" else "ties" if tv.vote else "sum",
             "normalize": normalize, "lambda": lam}
    diffs = [{"source_base": base, "source_finetuned": s.uri, "weight": w, "transform": t}
             for s, (w, t) in zip(sources, default, strict=True)]
    parts = Parts(base, diffs, merge, [r for region, own in rules for r in _rules(region, own, default)], used)
    _shared_density(parts, densities)
    return parts


def _registered_merge(method: str, base: str, sources: list[Source], values: list[dict], varies: bool,
                      shared: dict) -> Parts:
    """A method the registry has as a merge of its own (no transform of that name): its parameters by
    mergekit's names, one value for every model and tensor (the weights may be lists)."""
    fields = _names(MERGES[method].Params)
    if varies:
        raise refuse("parameters", f"{method}: graft's {method} merge takes one value of each parameter for every "
                     "tensor (no filters, no varying lambda)")
    merge: dict = {"method": method}
    for name in (p for p in values[0] if p != "weight"):
        found = {repr(v[name]) for v in values}
        if len(found) > 1 or isinstance(values[0][name], list):
            raise refuse(f"{sources[0].key}.parameters.{name}", f"{method}: graft's {method} merge takes one "
                         f"{name} for every model and layer")
        merge[name] = values[0][name]
    merge.update(shared)
    missing = [n for n in merge if n not in fields and n != "method"]
    if missing:
        raise refuse(f"parameters.{missing[0]}", f"graft's {method} merge has no {missing[0]}")
    diffs = [{"source_base": base, "source_finetuned": s.uri, "weight": v["weight"]}
             for s, v in zip(sources, values, strict=True)]
    return Parts(base, diffs, merge, used={method})


def _check_fold(entries: dict[Region, Entry | None], normalize: bool, vote: bool) -> None:
    key = next((e.key for e in entries.values() if e is not None), "parameters.lambda")
    if normalize:
        raise refuse(key, "lambda differs between tensors (or is a list) with normalize on: graft's merge takes "
                     "one lambda, and folded into the weights normalize would divide it out")
    if vote and any(x < 0 for e in entries.values() if e for x in _points(e.value)):
        raise refuse(key, "a negative lambda that differs between tensors: folded into the weights it would "
                     "turn the TIES vote, which mergekit takes before lambda")


def _rules(region: Region, own: list, default: list) -> list[dict]:
    """One region's rule(s): per diff, what differs from the diff's own weight and transform."""
    entries = []
    for (w, t), (dw, dt) in zip(own, default, strict=True):
        entry = {}
        if w != dw:
            entry["weight"] = w
        if t != dt:
            entry["transform"] = t if t is not None else identity(dt)
        entries.append(entry or None)
    return [{"match": pattern, "diffs": entries} for pattern in contains_all(region, "parameters")]


def _shared_density(parts: Parts, densities: list[Any]) -> None:
    """One scalar trim or draw for every diff and no rule: the merge's own density (ties, dare_ties), as the
    config states it."""
    if parts.rules or parts.merge["method"] not in ("ties", "dare_ties"):
        return
    transforms = [d["transform"] for d in parts.diffs]
    first = transforms[0]
    kind = "magnitude" if parts.merge["method"] == "ties" else "dare"
    shared = first is not None and first["method"] == kind and all(t == first for t in transforms) and \
        not set(first) - {"method", "density", "drop", "rescale"} and not isinstance(densities[0], list)
    if shared:
        parts.merge["density"] = densities[0]
        if "rescale" in first:  # the merge's trim or draw rescales as the transform would
            parts.merge["rescale"] = first["rescale"]
        for d in parts.diffs:
            d["transform"] = None
    elif parts.merge["method"] == "dare_ties":
        parts.merge["density"] = 1.0  # each diff names its own draw (or none)


def sce(base: str, scopes: Scopes) -> Parts:
    """mergekit's sce: a variance top-k mask, the TIES sign vote, weights from the task vectors' energy; it
    reads no per-model parameter (not even a weight)."""
    check_names(scopes, (), ("int8_mask", "select_topk"), "sce")
    if "sce" not in MERGES:
        raise refuse("merge_method", "sce: graft has no sce merge in its method registry")
    sources = [s for s in scopes.sources if s.uri != base]
    ordered, _, shared_chains = region_table(sources, scopes, (), ("select_topk",), {})
    topk = one_value({r: lookup(shared_chains["select_topk"], r) for r in ordered}, 1.0, "select_topk")
    merge: dict = {"method": "sce"}
    if "select_topk" in _names(MERGES["sce"].Params):
        merge["select_topk"] = topk
    elif topk != 1.0:
        raise refuse("parameters.select_topk", "graft's sce has no select_topk")
    diffs = [{"source_base": base, "source_finetuned": s.uri, "weight": 1.0} for s in sources]
    return Parts(base, diffs, merge)


def linear(base: str | None, scopes: Scopes) -> Parts:
    """sum_i w_i m_i (/ sum_i w_i): with a target t among the models and coefficients c_i adding up to 1 it is
    t + sum_i c_i (m_i - t). The base (or, without one, the transfer's target) is that t."""
    check_names(scopes, ("weight",), ("normalize",), "linear")
    sources = list(scopes.sources)
    if base is not None and base not in {s.uri for s in sources}:
        sources.append(Source(base, "base_model", None))  # mergekit adds it, weighed like the others
    ordered, chains, shared_chains = region_table(sources, scopes, ("weight",), ("normalize",),
                                                  {"normalize": "bool"})
    normalize = one_value({r: lookup(shared_chains["normalize"], r) for r in ordered}, True, "normalize")
    hint = "" if base is None else (" (linear weighs the base model too: list base_model under models with its "
                                    "weight, or set parameters.weight)")

    def weights(region: Region) -> list[Any]:
        return [v["weight"] for v in evaluate(chains, sources, region, ("weight",), {"weight": None}, hint)]

    if base is None:
        return _linear_without_base(sources, ordered, weights, normalize)
    keys = [s.key for s in sources]
    target = sources.index(next(s for s in sources if s.uri == base))

    def settings(region: Region) -> list[tuple[Any, None]]:
        coefficients = _coefficients(weights(region), normalize, keys)
        return [(c, None) for i, c in enumerate(coefficients) if i != target]

    default, rules = decision_list(ordered, settings)
    others = [s for i, s in enumerate(sources) if i != target]
    diffs = [{"source_base": base, "source_finetuned": s.uri, "weight": w} for s, (w, _) in zip(others, default,
                                                                                                strict=True)]
    return Parts(base, diffs, {"method": "sum", "normalize": False, "lambda": 1.0},
                 [r for region, own in rules for r in _rules(region, own, default)])


def _knots(weights: list[Any]) -> list[float]:
    knots = {0.0, 1.0}
    for w in weights:
        if isinstance(w, list) and len(w) > 1:
            knots.update(k / (len(w) - 1) for k in range(len(w)))
    return sorted(knots)


def _coefficients(weights: list[Any], normalize: bool, keys: list[str]) -> list[Any]:
    """Each model's coefficient (a number, or a list where its weight is), adding up to 1 at every depth."""
    try:
        sums = [math.fsum(weight_at(w, x) for w in weights) for x in _knots(weights)]
    except OverflowError:  # the partial sums pass the float range (1e308 + 1e308 - 1e308)
        raise refuse("models", "the weights' sum passes the range of a float (about 1.8e308)") from None
    listed = next((k for k, w in zip(keys, weights, strict=True) if isinstance(w, list)), "models")
    if not normalize:
        if any(abs(s - 1.0) > 1e-6 for s in sums):
            raise refuse("parameters.normalize", f"without normalize the weights (the base's included) must add "
                         f"up to 1 at every layer (they add up to {sums[0]:g}): the output would be the models' "
                         "sum scaled, which is not a transfer")
        return weights
    if any(abs(s) < 1e-8 for s in sums):
        raise refuse("parameters.weight", "the weights add up to 0: nothing to normalize by")
    if any(s != sums[0] for s in sums):
        raise refuse(f"{listed}.parameters.weight", "linear divides by the weights' sum, which here changes "
                     "across the layers: the coefficients are then no weight lists")
    total = sums[0]
    out = [[p / total for p in w] if isinstance(w, list) else w / total for w in weights]
    for key, c in zip(keys, out, strict=True):
        if not all(math.isfinite(p) for p in _points(c)):
            raise refuse(f"{key}.parameters.weight", f"divided by the weights' sum ({total:g}) it passes the "
                         "range of a float")
    return out


def _linear_without_base(sources: list[Source], ordered: list[Region], weights, normalize: bool) -> Parts:
    """A transfer written as a linear merge: a target +1, fine-tunes +c_i and their one base -sum(c_i)."""
    line = f"`base_model: {sources[0].ref or sources[0].uri}`"
    found = weights(ordered[0])
    if len(ordered) > 1 or any(isinstance(w, list) for w in found):
        raise refuse("base_model", "linear without base_model: per-tensor or per-layer weights are no transfer "
                     f"graft can read; add {line} (one of the models: mergekit's merge is the same, and the "
                     "output takes that model's config and tokenizer)")
    coefficients = _coefficients(found, normalize, [s.key for s in sources])
    negative = [i for i, c in enumerate(coefficients) if c < 0]
    target = next((i for i, c in enumerate(coefficients) if c == 1.0), None)
    if len(negative) != 1 or target is None:
        raise refuse("base_model", f"linear without base_model: the weights {found} are not a fine-tuning "
                     f"transfer (a target +1, fine-tunes +w and their base -w); add {line} (one of the models: "
                     "mergekit's merge is the same, and the output takes that model's config and tokenizer)")
    b = negative[0]
    diffs = [{"source_base": sources[b].uri, "source_finetuned": s.uri, "weight": coefficients[i]}
             for i, s in enumerate(sources) if i not in (b, target) and coefficients[i] != 0]
    if not diffs:
        raise refuse("models", "linear without base_model: no fine-tune besides the target and the base")
    note = {"code": "config_donor", "message": f"without base_model mergekit takes config and tokenizer from "
            f"whichever model its set of models yields first; graft from {sources[target].uri}, the first "
            "model weighted +1 (add base_model to choose)"}
    return Parts(sources[target].uri, diffs, {"method": "sum", "normalize": False, "lambda": 1.0}, notes=[note])
