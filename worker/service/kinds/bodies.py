"""What the bodies of the job kinds share. Every kind's body is a `Submission` (where the job writes, labels, a
webhook); a graft's and a preflight's are `Models` too: the models (one of four ways), how they combine and the
options with alpha. A kind's body is one of them plus its own fields (worker/service/kinds)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

from worker.engine.checks.checked_graft import MAX_SWEEP
from worker.engine.errors import GraftError
from worker.engine.planning.options import FLOAT32_MAX, check_alpha
from worker.engine.planning.recipe import Diff, Merge, RecipeOptions, Rule
from worker.engine.storage import schemes

# A scheme, then no spaces or control characters: spelled out, because \\s differs between Python, Rust
# (pydantic) and the ECMA regexes of JSON Schema (U+0085, U+001C..U+001F).
URI_PATTERN = r"^({})://[^\x00-\x20\x7f-\x9f]+$"
URI_FIELD = {"min_length": 1, "max_length": 2048, "pattern": URI_PATTERN.format(schemes.pattern()),
             "description": schemes.forms()}
URI = Field(**URI_FIELD)
# A diff's id (POST /v1/diffs answers it: its extraction job's) or a diff artifact's URI.
DIFF_ID_PATTERN = r"^job_[0-9a-f]{24}$"
DIFF_REF_FIELD = {"min_length": 1, "max_length": 2048,
                  "pattern": f"^({DIFF_ID_PATTERN[1:-1]}|{URI_PATTERN.format(schemes.pattern())[1:-1]})$",
                  "description": "a diff artifact in place of source_base and source_finetuned: a diff's id (POST "
                                 f"/v1/diffs) or its URI ({schemes.forms()})"}
# Hard caps of the schema; GRAFT_MAX_METADATA_BYTES bounds the whole map below them.
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
MetaValue = Annotated[str, StringConstraints(max_length=1024)]


class BodyError(GraftError):
    """A body a kind refuses for a reason its schema cannot state; the API answers 422 naming `field`."""

    def __init__(self, field: str, message: str, code: str = "invalid") -> None:
        super().__init__(code, message, {"field": field})
        self.field = field


def _alpha(value: object) -> float | list[float]:
    """One error naming options.alpha, rather than one per member of a union; each number checked as the
    engine checks it (finite, within float32's range: a 400-digit integer was an OverflowError here)."""
    try:
        if isinstance(value, list) and 2 <= len(value) <= MAX_SWEEP:
            return [check_alpha(v) for v in value]
        if not isinstance(value, list):
            return check_alpha(value)
    except GraftError:
        pass
    raise PydanticCustomError("alpha", f"a finite JSON number within float32's range (about 3.4e38), or a list "
                              f"of 2 to {MAX_SWEEP} of them (a sweep)")


_NUMBER = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}  # as check_alpha holds it
Alpha = Annotated[float | list[float], PlainValidator(_alpha), WithJsonSchema(
    {"anyOf": [_NUMBER, {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": MAX_SWEEP}]})]


class Options(RecipeOptions):
    """What `graft run` takes: the engine's options (declared once, in worker/engine/planning/recipe.py) and alpha."""

    alpha: Alpha = Field(1.0, description="scale of the diff (a JSON number); with `diffs`, `rules` or a "
                         "mergekit_config, a factor on the merged delta (the merge's lambda). A list is a sweep: "
                         "each value scales it in its own candidate, which is built and evaluated, and only the "
                         "one `select` picks is published")


def _metadata_schema(schema: dict) -> None:
    """pydantic states the key pattern as patternProperties, under which keys that miss the pattern may hold
    anything; the API refuses them, and so must the contract."""
    pattern = schema.pop("patternProperties", None) or {}
    for key_pattern, value_schema in pattern.items():
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": key_pattern}
        schema["additionalProperties"] = value_schema


def either_diffs_or_three_fields(schema: dict) -> None:
    """The models come one way of four: today's three fields, target_base with a diff artifact (`diff`),
    target_base with `diffs`, or a mergekit config alone (the schema says so, and the API's handler checks the
    same). Every kind's body that takes the models states it: give it as `json_schema_extra` in the body's own
    model_config."""
    def given(*names: str, kind: str = "string") -> dict:  # present and not null
        return {"required": list(names), "properties": {n: {"type": kind} for n in names}}

    models = ("target_base", "source_base", "source_finetuned")
    pair = (given("source_base"), given("source_finetuned"))
    mergekit = (given("mergekit_config"), given("mergekit_stage"))
    schema["anyOf"] = [{"required": ["target_base", "diffs"],
                        "properties": {"target_base": {"type": "string"}, "diffs": {"type": "array"}},
                        "not": {"anyOf": [*pair, given("diff"), *mergekit]}},
                       {**given("target_base", "diff"),
                        "not": {"anyOf": [*pair, given("diffs", kind="array"), *mergekit]}},
                       {**given(*models), "not": {"anyOf": [given("diff"), given("diffs", kind="array"), *mergekit]}},
                       {**given("mergekit_config"),
                        "not": {"anyOf": [*(given(m) for m in models), given("diff"), given("diffs", kind="array"),
                                          given("merge", kind="object"), given("rules", kind="array")]}}]


class Submission(BaseModel):
    """What every kind's body holds besides what the job does: where it writes, labels and a webhook."""

    model_config = ConfigDict(extra="forbid")
    output: str | None = Field(None, min_length=1, max_length=2048,
                               pattern=URI_PATTERN.format(schemes.pattern(writable=True)),
                               description=f"{schemes.prefixes(writable=True)} prefix for what the job writes (a "
                                           "graft's checkpoint, a preflight's report.json and chart, a diff "
                                           "artifact, a LoRA adapter); default GRAFT_OUTPUT_URI/<tenant>/<job id>/")
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=32, json_schema_extra=_metadata_schema,
                                               description="labels returned as given: at most 32, keys of at most 64 "
                                                           "characters, values of at most 1024")
    webhook_url: str | None = Field(None, min_length=1, max_length=2048,
                                    pattern=URI_PATTERN.format("[Hh][Tt][Tt][Pp][Ss]?"),
                                    description="POSTed the job on a terminal status; must reach a public address")


class Models(Submission):
    """The bodies of the kinds that run a recipe (a graft, a preflight): the models (one of four ways), how they
    combine, the options with alpha, and what every submission holds."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=either_diffs_or_three_fields)
    source_base: str | None = Field(None, **URI_FIELD)
    source_finetuned: str | None = Field(None, **URI_FIELD)
    diff: str | None = Field(None, **DIFF_REF_FIELD)
    target_base: str | None = Field(None, **URI_FIELD)
    diffs: list[Diff] | None = Field(None, min_length=1, max_length=16, description="a recipe's diffs, in place of "
                                     "source_base and source_finetuned (see README: recipes); a diff's `diff` "
                                     "may be a diff's id too")
    merge: Merge | None = Field(None, description="how a recipe's diffs combine (default: sum)")
    rules: list[Rule] | None = Field(None, max_length=100, description="a recipe's per-tensor overrides")
    mergekit_config: str | None = Field(None, min_length=1, max_length=64 << 10, description="a mergekit YAML "
                                        "of the task-vector family, in place of the models, merge and rules "
                                        "(its base_model is the target and every diff's base)")
    mergekit_stage: str | None = Field(None, min_length=1, max_length=256, description="the `name:` of the "
                                       "stage to run in a multi-stage mergekit_config")
    options: Options = Field(default_factory=Options)


def probe_text_by_length(spec: dict | None, section: str) -> dict | None:
    """A spec as a job shows it: the probe text of `section` by its length (it may be 64 KiB, and every GET
    returns the job)."""
    if not spec:
        return None
    shown = {**spec}
    if isinstance(shown.get(section), dict) and shown[section].get("probe_text") is not None:
        part = {**shown[section]}
        part["probe_text_chars"] = len(part.pop("probe_text"))
        shown[section] = part
    return shown
