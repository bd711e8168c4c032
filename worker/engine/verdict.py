"""The verdict of `graft inspect`: its levels, its reasons, the thresholds behind them, and how the levels
combine. Every threshold lives here, named, beside what it rests on, so recalibrating is one edit.

A reason is a plain dict (JSON-able, stored on jobs):
    {"code", "level", "verdict" (what this reason alone implies), "message", "values", "thresholds"}
The report's verdict is the worst verdict among the reasons that stand (see `combine`).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Verdict(StrEnum):
    COMPATIBLE = "compatible"
    RISKY = "risky"
    INCOMPATIBLE = "incompatible"


class Level(StrEnum):
    HEADERS = "headers"
    WEIGHTS = "weights"
    FUNCTION = "function"


# Levels in the order they run: asking for one runs the ones before it too.
LEVEL_HELP = ("headers: configs, tensors, tokenizers, estimates (no weights read); weights: one streaming pass over "
              "the inputs; function: also the probe loss along the line between the bases (runs the models)")
LEVEL_ORDER = (Level.HEADERS, Level.WEIGHTS, Level.FUNCTION)
_RANK = {Verdict.COMPATIBLE: 0, Verdict.RISKY: 1, Verdict.INCOMPATIBLE: 2}

# --- weights level --------------------------------------------------------------------------------------
# median over transferred tensors of ||target - source_base|| / ||target||. Two independent inits of the
# same shape sit near sqrt(2) (orthogonal vectors of equal norm); a continuation of the same run moves a
# small fraction of the weights' norm. Provisional: recalibrated on the trained toy family (examples/).
BASES_DISTANCE_INCOMPATIBLE = 0.9
BASES_DISTANCE_RISKY = 0.25
# median over transferred tensors of cos(target - source_base, delta): strongly negative means the target
# undid what the fine-tune did (training on the same signal in the other direction), so adding the delta
# pushes further along a direction the target's own training rejected.
COS_AGAINST_RISKY = -0.3
# share of the target's parameters that a transferred tensor covers: below this, most of the model gets
# nothing from the fine-tune (a diff restricted by rules, or names that do not line up).
COVERAGE_RISKY = 0.5

# --- function level -------------------------------------------------------------------------------------
# barrier_ratio = max over lambda of (loss on the line - linear interpolation of the ends), over the mean
# of the ends' losses. Linearly connected bases show no barrier (a few percent is noise of a short probe);
# unrelated ones show a barrier of the order of the loss itself. Provisional, like the weights thresholds.
BARRIER_COMPATIBLE = 0.02
BARRIER_RISKY = 0.10
# A barrier is measured against the chord between the ends: when one base models the probe text far worse
# than the other, the chord sits high and hides any bump (an unrelated base fitted to other text gave a path
# 0.96 -> 2.4 -> 9.6 nats: "no barrier"). Past this relative gap the probe says nothing about connectivity.
PROBE_ENDS_APART = 0.5

# The share of the probe's tokens that are the tokenizer's unknown token past which its losses are not taken
# at their word (a newline the vocabulary lacked made every loss meaningless). 2%: a stray symbol or two
# stays below it; a character class the vocabulary lacks (newlines, accents, another script) goes past it.
# The same share of the probe's characters that its tokens do not spell (a tokenizer without an unknown
# token drops them silently) counts alike. Past either the function level says so (probe_unknown_tokens,
# at least risky) and overrules nothing.
PROBE_UNKNOWN_SHARE = 0.02

# Weights-level codes about whether the bases are linearly connected. A conclusive function probe measures
# connectivity directly, so it overrules their *incompatible*: the bases are one run after all. It does not
# clear them: how far the target moved relative to the diff is a separate risk the barrier cannot see. The
# calibration family (examples/calibration) shows it: continuations at 0.5-0.8 of the weights' norm away
# have no barrier at all, yet their grafts keep only 23-62% of the fine-tune's gain. So a conclusive probe
# with no barrier caps these reasons at risky; a barrier decides incompatible by itself.
CONNECTIVITY_CODES = frozenset({"bases_unrelated", "bases_far", "target_moved_against_finetune"})


def reason(code: str, level: Level | str, verdict: Verdict | str, message: str, *,
           values: dict | None = None, thresholds: dict | None = None) -> dict:
    return {"code": code, "level": str(Level(level)), "verdict": str(Verdict(verdict)), "message": message,
            "values": dict(values or {}), "thresholds": dict(thresholds or {})}


def worst(verdicts: Iterable[Verdict | str]) -> Verdict:
    """The worst of some verdicts; compatible when there are none."""
    return max((Verdict(v) for v in verdicts), key=_RANK.__getitem__, default=Verdict.COMPATIBLE)


def levels_up_to(level: Level | str) -> list[Level]:
    return list(LEVEL_ORDER[: LEVEL_ORDER.index(Level(level)) + 1])


def combine(reasons: list[dict], levels_run: Iterable[Level | str]) -> tuple[Verdict, list[dict]]:
    """(verdict, reasons): when a conclusive function probe ran, the weights level's connectivity reasons
    that said incompatible are overruled down to risky (`"overruled": true`, the weights' own verdict kept
    as `weights_verdict`); headers' reasons always stand."""
    # The diffs whose source base a conclusive probe measured: an inconclusive probe, or none, overrules nothing.
    probed: set[int] = set()
    if Level.FUNCTION in {Level(x) for x in levels_run}:
        for r in reasons:
            if r["code"] == "loss_barrier":
                probed |= set(r["values"].get("diff_indices", [0]))
    out = []
    for r in reasons:
        r = dict(r)
        if (r["level"] == Level.WEIGHTS and r["code"] in CONNECTIVITY_CODES and r["verdict"] == Verdict.INCOMPATIBLE
                and r["values"].get("diff_index", 0) in probed):
            r.update(overruled=True, weights_verdict=r["verdict"], verdict=str(Verdict.RISKY))
        out.append(r)
    return worst(r["verdict"] for r in out), out


def weights_reasons(*, bases_distance_ratio: float | None, cos_bases_delta: float | None,
                    coverage: float | None, label: str = "", index: int | None = None) -> list[dict]:
    """Reasons from one diff's whole-model figures (medians over transferred tensors, coverage share);
    `label` names the diff when a recipe has several ("" for a plain three-model graft)."""
    where = f" ({label})" if label else ""
    extra = {"diff": label, **({"diff_index": index} if index is not None else {})} if label else {}
    out = []
    d = bases_distance_ratio
    if d is not None and d > BASES_DISTANCE_RISKY:
        bad = d > BASES_DISTANCE_INCOMPATIBLE
        out.append(reason(
            "bases_unrelated" if bad else "bases_far", Level.WEIGHTS,
            Verdict.INCOMPATIBLE if bad else Verdict.RISKY,
            f"median ||target - source_base|| / ||target|| is {d:.3g}{where}: "
            + ("the bases look like independent training runs (unrelated inits sit near 1.41)" if bad
               else "the target moved far from the source base; the diff may not carry over"),
            values={"bases_distance_ratio": d, **extra},
            thresholds={"risky": BASES_DISTANCE_RISKY, "incompatible": BASES_DISTANCE_INCOMPATIBLE}))
    c = cos_bases_delta
    if c is not None and c < COS_AGAINST_RISKY:
        out.append(reason(
            "target_moved_against_finetune", Level.WEIGHTS, Verdict.RISKY,
            f"median cos(target - source_base, delta) is {c:.3g}{where}: the target moved against what "
            "the fine-tune changed", values={"cos_bases_delta": c, **extra},
            thresholds={"risky_below": COS_AGAINST_RISKY}))
    if coverage is not None and coverage < COVERAGE_RISKY:
        out.append(reason(
            "low_coverage", Level.WEIGHTS, Verdict.RISKY,
            f"the diff covers {coverage:.1%} of the target's parameters{where}",
            values={"coverage": coverage, **extra}, thresholds={"risky_below": COVERAGE_RISKY}))
    return out


def function_reasons(result: dict) -> list[dict]:
    """The function level's one reason, from function_probe's result (always given, even when it says
    compatible: it is what overrules the weights level's connectivity reasons). A probe text of which more
    than PROBE_UNKNOWN_SHARE of the tokens are the unknown token, or of the characters are not spelled by
    its tokens, gives probe_unknown_tokens instead: at least risky, the barrier's own verdict kept when
    worse, and no overruling (it is not loss_barrier)."""
    found = _barrier_reasons(result)
    share, dropped = _share(result, "unknown_share"), _share(result, "dropped_share")
    said = unreadable_text(result, "probe")
    if not said:
        return found
    measured = found[0]
    return [reason(
        "probe_unknown_tokens", Level.FUNCTION, worst([Verdict.RISKY, measured["verdict"]]),
        f"{'; '.join(said)} (more than {PROBE_UNKNOWN_SHARE:.0%}): the probe text holds characters the "
        "vocabulary cannot spell, scored as one token or not at all, so the barrier is not trusted and the "
        f"weights level's reasons stand; as measured: {measured['message']}",
        values={"unknown_share": share, "unknown_tokens": result.get("unknown_tokens"), "dropped_share": dropped,
                "characters_dropped": result.get("characters_dropped"), "measured_code": measured["code"],
                "measured_verdict": measured["verdict"], **measured["values"]},
        thresholds={"unknown_share": PROBE_UNKNOWN_SHARE, "dropped_share": PROBE_UNKNOWN_SHARE,
                    **measured["thresholds"]})]


def unreadable_text(counts: dict, what: str) -> list[str]:
    """What a text's token counts say its tokenizer could not read, past PROBE_UNKNOWN_SHARE: its unknown
    tokens (of its tokens), the characters its ids do not spell (of its characters). Empty: it reads."""
    share, dropped = _share(counts, "unknown_share"), _share(counts, "dropped_share")
    said = []
    if share is not None and share > PROBE_UNKNOWN_SHARE:
        said.append(f"{counts.get('unknown_tokens')} of the {what}'s {counts.get('tokens', '?')} tokens "
                    f"({share:.1%}) are the tokenizer's unknown token")
    if dropped is not None and dropped > PROBE_UNKNOWN_SHARE:
        said.append(f"{counts.get('characters_dropped')} of the {what}'s {counts.get('characters', '?')} characters "
                    f"({dropped:.1%}) are not spelled by its tokens (dropped by the tokenizer or unknown)")
    return said


def _share(result: dict, key: str) -> float | None:
    value = result.get(key)
    return None if value is None else float(value)


def _barrier_reasons(result: dict) -> list[dict]:
    ratio = float(result["barrier_ratio"])
    ends = [float(result["losses"][0]), float(result["losses"][-1])]
    gap = abs(ends[1] - ends[0]) / max(min(ends), 1e-9)
    if gap > PROBE_ENDS_APART:
        return [reason(
            "probe_inconclusive", Level.FUNCTION, Verdict.RISKY,
            f"the bases' losses on the probe text are too far apart ({ends[0]:.3g} and {ends[1]:.3g} nats per "
            "token) for a barrier to mean anything: the probe text suits one base much better than the other; "
            "the weights level's reasons stand", values={"ends_gap": gap, "loss_source_base": ends[0],
                                                         "loss_target_base": ends[1], "barrier_ratio": ratio},
            thresholds={"ends_apart": PROBE_ENDS_APART})]
    verdict = (Verdict.COMPATIBLE if ratio <= BARRIER_COMPATIBLE
               else Verdict.RISKY if ratio <= BARRIER_RISKY else Verdict.INCOMPATIBLE)
    text = {Verdict.COMPATIBLE: "the bases look linearly connected",
            Verdict.RISKY: "a small loss barrier between the bases",
            Verdict.INCOMPATIBLE: "a loss barrier between the bases: they are not linearly connected"}
    return [reason(
        "loss_barrier", Level.FUNCTION, verdict,
        f"loss barrier on the line source_base -> target_base is {ratio:.3g} of the ends' mean loss "
        f"({result.get('tokens', '?')} tokens): {text[verdict]}",
        values={"barrier_ratio": ratio, "barrier": float(result["barrier"])},
        thresholds={"compatible": BARRIER_COMPATIBLE, "risky": BARRIER_RISKY})]
