"""mergekit's parameter settings read as mergekit 0.1.5 reads them (config.py `evaluate_setting`,
parameter_resolver.py), and the per-tensor decision they make turned into graft rules.

A setting is a number, a list of numbers (a gradient, interpolated over the layers), `{value, filter}` or a
list of those. mergekit looks a parameter up scope by scope (a model's or slice source's own parameters, then
the slice's, then the top level), takes in a scope the first condition whose filter is a substring of the
tensor's name (no filter, `*` or the empty string: every tensor) and falls through to the next scope when
none matches. What a parameter is for a tensor therefore depends only on which of the config's filters its
name contains. The filters split the tensors into regions (the set of filters a name contains); one graft
rule per region whose values differ from what the next rule would give says it exactly: RE2 cannot say
"contains A but not B", but first match wins, so a region's rule (its name contains all of its filters) comes
before the rules of its subsets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from worker.engine.errors import GraftError
from worker.engine.planning.patterns import MAX_PATTERN_LENGTH
from worker.engine.planning.recipe import MAX_WEIGHT_POINTS

MAX_FILTERS = 10  # distinct filters in one config: 2^10 regions to weigh
_RE2_SPECIAL = set("\\.^$|?*+()[]{}")

Region = frozenset  # the filters a tensor's name contains


def refuse(key: str, message: str) -> GraftError:
    return GraftError("invalid_recipe", f"mergekit config: {key}: {message}", {"field": key})


def number(value: Any, key: str) -> float:
    """A finite number; numeric strings too (YAML reads `1e-3` as a string, mergekit's validation as a number)."""
    if isinstance(value, bool):
        raise refuse(key, "expected a number, not a boolean")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise refuse(key, f"expected a number, got {value[:40]!r}") from None
    if isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise refuse(key, "a number past the range of a float (about 1.8e308)") from None
    if not isinstance(value, float):
        raise refuse(key, "expected a number")
    if not math.isfinite(value):
        raise refuse(key, f"expected a finite number, got {value}")
    return float(value)


@dataclass(frozen=True)
class Entry:
    """One condition of a setting: its filter (None: every tensor), its value (a number, a list of numbers or
    a boolean) and where it was written."""

    filter: str | None
    value: Any
    key: str


def _value(raw: Any, key: str, kind: str) -> Any:
    if kind == "bool":
        if not isinstance(raw, bool):
            raise refuse(key, "expected true or false")
        return raw
    if isinstance(raw, list):
        if not raw or len(raw) > MAX_WEIGHT_POINTS:
            raise refuse(key, f"a list of 1 to {MAX_WEIGHT_POINTS} numbers")
        if any(isinstance(v, dict | list) for v in raw):
            raise refuse(key, "a list of numbers, or a list of {value, filter} conditions, not both")
        values = [number(v, f"{key}[{i}]") for i, v in enumerate(raw)]
        # One point is that number at every depth; a constant list is kept, as mergekit's interpolation of
        # equal points can differ from them in the last bit.
        return values[0] if len(values) == 1 else values
    return number(raw, key)


def read_setting(raw: Any, key: str, kind: str = "number") -> list[Entry]:
    """A setting as its conditions, in order (`kind`: number or bool)."""
    conds = raw if isinstance(raw, list) and raw and all(isinstance(c, dict) for c in raw) else \
        [raw] if isinstance(raw, dict) else None
    if conds is None:
        return [Entry(None, _value(raw, key, kind), key)]
    entries = []
    for i, cond in enumerate(conds):
        where = f"{key}[{i}]" if isinstance(raw, list) else key
        if set(cond) - {"value", "filter"} or "value" not in cond:
            raise refuse(where, "expected {value, filter}")
        flt = cond.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise refuse(f"{where}.filter", "a filter is a piece of tensor name (a string)")
        if isinstance(cond["value"], dict):
            raise refuse(f"{where}.value", "expected a number or a list of numbers")
        entries.append(Entry(None if flt in (None, "*", "") else flt, _value(cond["value"], f"{where}.value", kind),
                             f"{where}.value"))
    return entries


def chain(scopes: Iterable[tuple[dict | None, str]], name: str, kind: str = "number") -> list[Entry]:
    """One parameter's conditions over the scopes, most precedent first; a condition for every tensor ends it."""
    out: list[Entry] = []
    for params, key in scopes:
        if params is None or name not in params:
            continue
        for entry in read_setting(params[name], f"{key}.{name}", kind):
            out.append(entry)
            if entry.filter is None:
                return out
    return out


def lookup(entries: list[Entry], region: Region) -> Entry | None:
    """The condition mergekit takes for a tensor whose name contains exactly the filters of `region`."""
    return next((e for e in entries if e.filter is None or e.filter in region), None)


def filters_of(chains: Iterable[list[Entry]]) -> list[str]:
    seen: dict[str, None] = {}
    for entries in chains:
        for e in entries:
            if e.filter is not None:
                seen.setdefault(e.filter)
    return list(seen)


def regions(filters: list[str], key: str) -> list[Region]:
    """Every set of filters one name can contain (a name containing a filter contains its substrings), the
    empty one first, then by size."""
    if len(filters) > MAX_FILTERS:
        raise refuse(key, f"{len(filters)} distinct filters (at most {MAX_FILTERS})")
    out = []
    for mask in range(1 << len(filters)):
        region = frozenset(f for i, f in enumerate(filters) if mask >> i & 1)
        if all(g in region for f in region for g in filters if g != f and g in f):
            out.append(region)
    return sorted(out, key=lambda r: (len(r), sorted(filters.index(f) for f in r)))


def decision_list(ordered: list[Region], values: Callable[[Region], Any]) -> tuple[Any, list[tuple[Region, Any]]]:
    """The values for tensors matching no filter, and the rules (region, values) in first-match order that
    give every region its own: a region gets a rule only where the rule it would otherwise reach (the first,
    in that order, of its subsets' rules) says something else."""
    default = values(ordered[0])
    emitted: list[tuple[Region, Any]] = []
    rank = {r: i for i, r in enumerate(ordered)}

    def first_order(item: tuple[Region, Any]) -> tuple[int, int]:
        return -len(item[0]), rank[item[0]]

    for region in ordered[1:]:
        own = values(region)
        reached = sorted((e for e in emitted if e[0] < region), key=first_order)
        if own != (reached[0][1] if reached else default):
            emitted.append((region, own))
    return default, sorted(emitted, key=first_order)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _layouts(order: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The literal runs a name holds when the filters occur starting in this order: each one either starts a
    run of its own (anything between) or overlaps the current run after the previous one's start."""
    out: set[tuple[str, ...]] = set()

    def place(i: int, runs: tuple[str, ...], last: int) -> None:
        if i == len(order):
            out.add(runs)
            return
        text = order[i]
        place(i + 1, (*runs, text), 0)
        if runs:
            run = runs[-1]
            for start in range(last + 1, len(run)):
                seen = run[start:start + len(text)]
                if text.startswith(seen):
                    merged = run if len(seen) == len(text) else run[:start] + text
                    place(i + 1, (*runs[:-1], merged), start)

    place(0, (), 0)
    return out


def contains_all(region: Region, key: str) -> list[str]:
    """RE2 patterns that together are found in exactly the names containing every filter of `region` (overlaps
    included): one alternation over the orders the filters can occur in, split where it would pass a
    pattern's length limit (consecutive rules saying the same thing are one rule to first-match)."""
    needed = sorted(f for f in region if not any(f != g and f in g for g in region))
    layouts: set[tuple[str, ...]] = set()
    for order in permutations(needed):
        layouts |= _layouts(order)
    patterns: list[str] = []
    for alternative in sorted(".*".join(_escape(run) for run in runs) for runs in layouts):
        if len(alternative) > MAX_PATTERN_LENGTH:
            raise refuse(key, f"the filters {needed} together need a pattern of {len(alternative)} characters "
                         f"(at most {MAX_PATTERN_LENGTH})")
        if patterns and len(patterns[-1]) + 1 + len(alternative) <= MAX_PATTERN_LENGTH:
            patterns[-1] += "|" + alternative
        else:
            patterns.append(alternative)
    return patterns
