"""A recipe: what to build from a target base and one or more diffs (`finetuned - base`), declared once.

The same model is what `graft run --recipe FILE` reads (YAML or JSON), what `POST /v1/jobs` and
`/v1/jobs:preview` accept, and what the manifest records. Method parameters come from the registry
(worker/engine/methods): a new method appears here, in the API schema and in the CLI's help by itself.

    output[tensor] = target + merge(transform_i(finetuned_i - base_i), weight_i(tensor))

Weights may be lists, interpolated linearly over the layer index (the first value at layer 0, the last at the
last layer; tensors before the first layer take the first value, those after the last take the last). Rules
override the weight and/or the transform of every diff for the tensors they match (first match wins).

`conventions` says whose choices fill in what a recipe leaves open. graft's: the tokenizer and generation
config come from the first fine-tune, and the final norm and head take a weight list's last value. An imported
mergekit config carries mergekit's: both files from the target (mergekit's base_model), every tensor outside
the layers at the list's first value (mergekit plans them at t = 0) and a one-layer model's layer at its last
(t = 1). `notes` are what the recipe still computes differently from the config it came from: said as
warnings whenever it runs and recorded in the manifest.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from worker.engine.errors import GraftError
from worker.engine.methods import MERGES, TRANSFORMS
from worker.engine.methods.sum import NEAR_ZERO, SumParams
from worker.engine.planning.options import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    FLOAT32_MAX,
    MAX_SHARD,
    MIN_SHARD,
    VOCAB_POLICIES,
    GraftOptions,
    check_alpha,
)
from worker.engine.planning.patterns import MAX_PATTERN_LENGTH, MAX_PATTERNS, check_patterns, matches_any

MAX_DIFFS = 16
MAX_RULES = 100
MAX_WEIGHT_POINTS = 1024
MAX_NOTES = 16
CONVENTIONS = ("graft", "mergekit")
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")



def _layered(params: type[BaseModel]) -> type[BaseModel]:
    """`params` whose numbers may also be lists, interpolated over the layer index as weight lists are (an
    imported mergekit config's per-layer densities), each value bounded as the number is; `transform_at`
    turns one back into `params` at a tensor's depth."""
    fields = {}
    for name, info in params.model_fields.items():
        if info.annotation is float:
            number = Annotated[float, *info.metadata]
            points = Annotated[list[number], Field(min_length=1, max_length=MAX_WEIGHT_POINTS)]
            fields[name] = (number | points, Field(info.default, alias=info.alias, description=info.description))
    return create_model(params.__name__, __base__=params, **fields) if fields else params


def _plain(value: object) -> object:
    """A method's own parameter model (a transform built in code) is read as the mapping it holds."""
    return value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value


Transform = Annotated[Union[tuple(_layered(m.Params) for m in TRANSFORMS.values())],  # noqa: UP007
                      Field(discriminator="method"), BeforeValidator(_plain)]
Merge = Annotated[Union[tuple(m.Params for m in MERGES.values())],  # noqa: UP007
                  Field(discriminator="method")]
# Within float32's range, where the arithmetic runs (products of them are Recipe.check_strength's to bound).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Weight = Number | Annotated[list[Number], Field(min_length=1, max_length=MAX_WEIGHT_POINTS)]
MAX_URI = 2048
URI = Annotated[str, Field(min_length=1, max_length=MAX_URI)]


@contextmanager
def _as_validation_error():
    """An engine check inside a pydantic validator: its GraftError becomes a validation error that keeps the
    engine's code as its type (a refusal for a reason no schema states, such as a pattern RE2 cannot run)."""
    try:
        yield
    except GraftError as err:
        raise PydanticCustomError(err.code, err.message) from None


ARTIFACT_SIDES = ("source_base", "source_finetuned")


def artifact_input(uri: str, side: str) -> str:
    """The input key a diff artifact stands in for one side of its source pair (`diff:<side>:<uri>`): resolved
    as that side's recorded headers, read through the artifact (worker/engine/diffs)."""
    return f"diff:{side}:{uri}"


def split_artifact_input(key: str) -> tuple[str, str] | None:
    """(artifact URI, side) of an artifact's input key; None for a model's URI."""
    if not key.startswith("diff:"):
        return None
    side, _, uri = key[5:].partition(":")
    return (uri, side) if side in ARTIFACT_SIDES and uri else None


def _input_key(value: str) -> str:
    """A model's URI, or a diff artifact's input key (`diff:<side>:<uri>`): the URI in it is what is bounded."""
    artifact = split_artifact_input(value)
    if len(artifact[0] if artifact else value) > MAX_URI:
        raise PydanticCustomError("string_too_long", "String should have at most {max_length} characters",
                                  {"max_length": MAX_URI})
    return value


def _given(name: str) -> dict:
    return {"required": [name], "properties": {name: {"type": "string"}}}  # present and not null


def _pair_or_artifact(schema: dict) -> None:
    """The pair, or the artifact alone (as Diff's validator holds it: a side beside `diff` is refused)."""
    pair = {"required": list(ARTIFACT_SIDES), "properties": {side: {"type": "string"} for side in ARTIFACT_SIDES}}
    schema["anyOf"] = [{**pair, "not": _given("diff")},
                       {**_given("diff"), "not": {"anyOf": [_given(side) for side in ARTIFACT_SIDES]}}]


# A side of a diff's pair: as URI states it, though an artifact's input key is longer than the artifact's URI.
InputURI = Annotated[str, Field(min_length=1), AfterValidator(_input_key),
                     WithJsonSchema({"type": "string", "maxLength": MAX_URI, "minLength": 1})]


class Diff(BaseModel):
    """One diff: a source pair (finetuned - base), or a diff artifact extracted from one (`diff`), which stands
    in for both: its `source_base` / `source_finetuned` are then the artifact's input keys, never shown."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_pair_or_artifact)
    source_base: InputURI | None = None
    source_finetuned: InputURI | None = None
    diff: URI | None = Field(None, description="a diff artifact (`graft diff extract`) in place of source_base and "
                             "source_finetuned")
    weight: Weight = Field(1.0, description="a number, or a list interpolated over the layer index")
    transform: Transform | None = Field(None, description="applied to this diff before the merge (its numbers "
                                        "may be lists, interpolated over the layer index)")

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        artifact = data.get("diff")
        if artifact is None:
            missing = [k for k in ARTIFACT_SIDES if data.get(k) is None]
            if missing:
                raise ValueError(f"a diff is source_base and source_finetuned, or a diff artifact (diff); "
                                 f"{' and '.join(missing)} missing")
            return data
        if not isinstance(artifact, str) or len(artifact) > MAX_URI:
            return data  # the field's own check says so
        data = dict(data)
        for side in ARTIFACT_SIDES:
            if data.get(side) not in (None, artifact_input(artifact, side)):
                raise ValueError("a diff artifact (diff) replaces source_base and source_finetuned: give one or "
                                 "the other")
            data[side] = artifact_input(artifact, side)
        return data

    @model_serializer(mode="wrap")
    def _shown(self, handler) -> dict:
        out = handler(self)
        if self.diff is None:
            out.pop("diff", None)
        else:
            for side in ARTIFACT_SIDES:
                out.pop(side, None)
        return out


def _rule_says_something(schema: dict) -> None:
    schema["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                       for name in ("weight", "transform", "diffs")]


class DiffSetting(BaseModel):
    """What a rule sets for one diff; what it leaves out is the rule's own, else the diff's."""

    model_config = ConfigDict(extra="forbid")
    weight: Weight | None = None
    transform: Transform | None = None


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rule_says_something)
    match: str = Field(min_length=1, max_length=MAX_PATTERN_LENGTH, description="RE2 regex, searched in the name")
    weight: Weight | None = Field(None, description="replaces every diff's weight for matching tensors")
    transform: Transform | None = Field(None, description="replaces every diff's transform for matching tensors")
    diffs: list[DiffSetting | None] | None = Field(
        None, max_length=MAX_DIFFS, description="one entry per diff, in the recipe's order: that diff's weight "
        "and/or transform for matching tensors (over the rule's own); null keeps what the rule or the diff says")

    @model_validator(mode="after")
    def _says_something(self) -> Rule:
        # `diffs` of nulls alone says something too: matching tensors keep the diffs' own, whatever later
        # rules say (first match wins).
        if self.weight is None and self.transform is None and self.diffs is None:
            raise ValueError("a rule sets a weight, a transform or both (for every diff, or per diff)")
        with _as_validation_error():
            check_patterns([self.match], "rules.match")
        return self

    def setting(self, index: int) -> tuple[float | list[float] | None, BaseModel | None]:
        """The weight and transform this rule gives diff `index` (None: the diff's own)."""
        own = self.diffs[index] if self.diffs is not None and index < len(self.diffs) else None
        weight = own.weight if own is not None and own.weight is not None else self.weight
        transform = own.transform if own is not None and own.transform is not None else self.transform
        return weight, transform


class TokenizerSource(BaseModel):
    """The output's tokenizer taken from one input, its vocabulary checked against every input's."""

    model_config = ConfigDict(extra="forbid")
    source: URI = Field(description="the input whose tokenizer files, chat template and generation config the "
                        "output takes")
    vocabularies: Literal["agree", "equal"] = Field(
        "agree", description="agree: every input gives this tokenizer's tokens the same ids (tokens of its own "
        "beyond them are dropped); equal: every input's vocabulary is this one (a union that adds nothing); "
        "otherwise the graft is refused, as are embeddings with another row count than the tokenizer's tokens")


def _size_type(value: object) -> object:
    """A number of bytes or a size string; GraftOptions reads the string and checks the range (its error
    names the field). JSON Schema's integers include 1024.0."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("give a number of bytes or a size such as '500MB'")
    if isinstance(value, str) and len(value) > 32:
        raise ValueError("too long to be a size")
    return value


def _size_schema(schema: dict) -> None:
    schema["anyOf"] = [{"type": "integer", "minimum": MIN_SHARD, "maximum": MAX_SHARD},
                       {"type": "string", "minLength": 1, "maxLength": 32, "pattern": r"^\s*[0-9]"}]


Pattern = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN_LENGTH)]


class RecipeOptions(BaseModel):
    """How the output is written and which tensors take the diffs: declared once, for the CLI's flags, the
    API's `options` and recipes."""

    model_config = ConfigDict(extra="forbid")
    vocab: Literal[VOCAB_POLICIES] = Field(  # type: ignore[valid-type]
        "extend", description="extend: keep the fine-tune's added rows; target: keep the target's rows only")
    dtype: Literal[DTYPE_CHOICES] = Field("auto", description="stored dtype of the output's float tensors")  # type: ignore[valid-type]
    shard_size: Annotated[int | str, BeforeValidator(_size_type)] = Field(
        "5GB", json_schema_extra=_size_schema, description="largest output shard: bytes or e.g. '500MB' (1 KB to 5 TB)")
    device: Literal[DEVICE_CHOICES] = Field("auto", description="where the arithmetic runs")  # type: ignore[valid-type]
    include: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                   description="RE2 regexes (searched): only matching tensors get the diff")
    exclude: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                   description="RE2 regexes (searched): matching tensors are copied from the target")
    parallelism: int | None = Field(None, ge=1, le=10_000, description="the service: at most this many of the "
                                    "job's shard tasks at once when it splits by output shard (default: one per "
                                    "output shard); the output's bytes do not depend on it")

    def engine_options(self, alpha: float = 1.0) -> GraftOptions:
        # How many workers write it is the service's concern, not the engine's: the bytes are the same.
        return GraftOptions(alpha=alpha, **RecipeOptions.model_dump(self, exclude={"parallelism"}))


class Note(BaseModel):
    """One way the recipe computes differently from the foreign config it was imported from."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(min_length=1, max_length=1000)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_base: URI
    diffs: list[Diff] = Field(min_length=1, max_length=MAX_DIFFS)
    merge: Merge = Field(default_factory=lambda: SumParams(method="sum"), description="how the diffs combine "
                         "(default: sum)")
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES,
                              description="per-tensor overrides, first match wins")
    options: RecipeOptions = Field(default_factory=RecipeOptions)
    conventions: Literal[CONVENTIONS] = Field(  # type: ignore[valid-type]
        "graft", description="whose choices fill in what the recipe leaves open: graft's (tokenizer and "
        "generation config from the first fine-tune; tensors after the last layer at a weight list's last value) "
        "or mergekit's (both files from the target; every tensor outside the layers at the first value)")
    notes: list[Note] = Field(default_factory=list, max_length=MAX_NOTES,
                              description="how the recipe differs from the config it was imported from "
                              "(warnings at run time)")
    layers: int | None = Field(None, ge=1, le=1_000_000, description="the layer count the recipe was written for "
                               "(an imported config's layer_range): a target with another count is refused")
    tokenizer: TokenizerSource | None = Field(None, description="the output's tokenizer (default: the "
                                              "conventions' choice, unchecked)")
    chat_template: str | None = Field(None, min_length=1, max_length=64 << 10,
                                      description="the output's chat template (Jinja text), over the tokenizer's")

    @model_validator(mode="after")
    def _engine_checks(self) -> Recipe:
        with _as_validation_error():
            self.options.engine_options()  # sizes and patterns, with the engine's messages
        uris = {self.target_base} | {u for d in self.diffs for u in (d.source_base, d.source_finetuned)}
        if self.tokenizer is not None and self.tokenizer.source not in uris:
            raise ValueError("tokenizer.source: must be one of the recipe's models (the output's files come from "
                             "its inputs)")
        return self

    @classmethod
    def single(cls, source_base: str, source_finetuned: str, target_base: str, options: GraftOptions, *,
               diff: str | None = None) -> Recipe:
        """Today's three fields and alpha as a one-diff recipe whose weight is alpha (`diff`: a diff artifact in
        place of the pair). GraftError naming the field (as the three-field form calls it) when a URI is not one
        a recipe takes."""
        from pydantic import ValidationError

        opts = {k: v for k, v in options.to_dict().items() if k != "alpha"}
        pair = {"diff": diff} if diff else {"source_base": source_base, "source_finetuned": source_finetuned}
        try:
            return cls(target_base=target_base, diffs=[Diff(**pair, weight=options.alpha)],
                       options=RecipeOptions(**opts))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][-1]) if error["loc"] else "source_base"
            raise GraftError("invalid_option", f"{field}: {error['msg']}", {"field": field}) from None

    def engine_options(self) -> GraftOptions:
        """The engine options the recipe amounts to; alpha is the plain transfer's (weight times lambda), 1 for any
        other recipe (its strengths are in the recipe itself)."""
        alpha = self.plain_alpha()
        return self.options.engine_options(1.0 if alpha is None else alpha)

    def plain_alpha(self) -> float | None:
        """The alpha of a plain fine-tuning transfer (one diff, a plain sum, one number as weight, no
        transform, no rules, graft's conventions): weight times lambda. Such a recipe runs on the single-diff
        path and writes today's bytes."""
        merge = self.merge
        diff = self.diffs[0]
        if (len(self.diffs) == 1 and merge.method == "sum" and not merge.normalize
                and diff.transform is None and not self.rules and isinstance(diff.weight, float | int)
                and self.conventions == "graft" and not self.notes and self.layers is None
                and self.tokenizer is None and self.chat_template is None):
            return float(diff.weight) * merge.lambda_
        return None

    def scaled(self, alpha: float) -> Recipe:
        """The recipe at strength alpha: its merged delta times alpha, i.e. the merge's lambda times alpha.
        Alpha beside diffs is a strength on the whole recipe (the API's `alpha` with `diffs`, rules or a
        mergekit config, and each candidate of an alpha sweep). Not the weights: under `normalize` (ties'
        default) the merge divides by their sum, and alpha would cancel out. GraftError naming alpha when a
        factor leaves float32's range."""
        alpha = check_alpha(alpha)
        if alpha == 1.0:
            return self
        if self.plain_alpha() is not None:
            return self._plain_scaled(alpha)
        lam = self.merge.lambda_ * alpha
        if not abs(lam) <= FLOAT32_MAX:
            raise GraftError("invalid_option", f"alpha: {alpha:g} scales the merge's lambda, and then lambda "
                             f"{self.merge.lambda_:g} times alpha is {lam:g}, past float32's range (about 3.4e38)",
                             {"field": "options.alpha"})
        scaled = self.model_copy(update={"merge": self.merge.model_copy(update={"lambda_": lam})})
        try:
            scaled.check_strength()
        except GraftError as err:
            raise GraftError("invalid_option", f"alpha: {alpha:g} scales the merge's lambda, and then "
                             f"{err.message.split(': ', 1)[-1]}", {"field": "options.alpha"}) from None
        return scaled

    def _plain_scaled(self, alpha: float) -> Recipe:
        """The plain transfer says its strength as its weight, whichever face built it (the CLI's flags, the API's
        three fields, a sweep's candidate): weight times alpha, the same product lambda times alpha would give."""
        diff = self.diffs[0]
        weight = diff.weight * alpha
        if not abs(weight * self.merge.lambda_) <= FLOAT32_MAX:
            raise GraftError("invalid_option", f"alpha: {alpha:g} times the graft's alpha {self.plain_alpha():g} "
                             "leaves float32's range (about 3.4e38), in which the arithmetic runs",
                             {"field": "options.alpha"})
        return self.model_copy(update={"diffs": [diff.model_copy(update={"weight": weight})]})

    def check_strength(self) -> None:
        """Every factor the arithmetic applies to a delta (a weight, a rule's weight, times lambda; the weights'
        sum that `normalize` divides by) within float32's range, where the arithmetic runs: past it every
        scaled delta is inf and the graft could only fail in the worker, after the job was accepted.
        GraftError("invalid_recipe") naming the field. Also that every rule's per-diff list has one entry per
        diff (checked here, where the API's own construction of a recipe is checked, rather than by pydantic)."""
        for j, rule in enumerate(self.rules):
            if rule.diffs is not None and len(rule.diffs) != len(self.diffs):
                raise GraftError("invalid_recipe", f"rules.{j}.diffs: one entry per diff ({len(self.diffs)}), got "
                                 f"{len(rule.diffs)}", {"field": f"rules.{j}.diffs"})
        lam = self.merge.lambda_
        named = [(f"diffs.{i}.weight", d.weight) for i, d in enumerate(self.diffs)]
        named += [(f"rules.{j}.weight", r.weight) for j, r in enumerate(self.rules) if r.weight is not None]
        named += [(f"rules.{j}.diffs.{i}.weight", s.weight) for j, r in enumerate(self.rules)
                  for i, s in enumerate(r.diffs or ()) if s is not None and s.weight is not None]
        for field, weight in named:
            for w in _points(weight):
                if not abs(w * lam) <= FLOAT32_MAX:
                    where = field if lam == 1.0 else "merge.lambda"
                    raise GraftError("invalid_recipe", f"{where}: the weight {w:g} times lambda {lam:g} is past "
                                     "float32's range (about 3.4e38), in which the arithmetic runs", {"field": where})
        if getattr(self.merge, "normalize", False):
            try:
                total = math.fsum(max(abs(w) for w in _points(d.weight)) for d in self.diffs)
            except OverflowError:
                total = math.inf
            if not total <= FLOAT32_MAX:
                raise GraftError("invalid_recipe", "diffs: the weights' sum, which normalize divides by, is past "
                                 "float32's range (about 3.4e38)", {"field": "diffs"})
        if self.merge.method == "sum" and self.merge.normalize:
            factor = _normalized_factor([d.weight for d in self.diffs], lam)
            if not factor <= FLOAT32_MAX:
                raise GraftError("invalid_recipe", f"diffs: a weight times lambda over the weights' sum, which "
                                 f"normalize divides by, reaches {factor:g}, past float32's range (about 3.4e38)",
                                 {"field": "diffs"})

    def to_dict(self) -> dict:
        out = self.model_dump(mode="json", by_alias=True)
        for key in ("layers", "tokenizer", "chat_template"):  # unset, as recipes were recorded before them
            if out[key] is None:
                del out[key]
        if out["options"]["parallelism"] is None:  # likewise
            del out["options"]["parallelism"]
        for rule in out["rules"]:
            if rule["diffs"] is None:
                del rule["diffs"]
        return out


def _points(weight: float | list[float]) -> list[float]:
    return weight if isinstance(weight, list) else [weight]


def _normalized_factor(weights: list[float | list[float]], lam: float) -> float:
    """A bound on the factor `sum` with normalize applies to a delta, |w| * |lambda| / |S| with S the weights'
    sum where |S| >= 1e-8 (below it nothing is divided). S is piecewise linear over the depth between the
    lists' knots: where it nears or crosses zero it comes as close to 1e-8 as the layers allow, elsewhere
    its smallest magnitude is at a knot."""
    knots = {0.0, 1.0}
    for w in weights:
        if isinstance(w, list) and len(w) > 1:
            knots.update(k / (len(w) - 1) for k in range(len(w)))
    sums = [math.fsum(weight_at(w, x) for w in weights) for x in sorted(knots)]
    crosses = any(a * b < 0 for a, b in zip(sums, sums[1:], strict=False))
    smallest = NEAR_ZERO if crosses else max(NEAR_ZERO, min(abs(total) for total in sums))
    return max(abs(w) for weight in weights for w in _points(weight)) * abs(lam) / smallest


def load_recipe(data: dict, *, where: str = "recipe") -> Recipe:
    """A recipe from parsed YAML/JSON, or GraftError("invalid_recipe") naming the fields."""
    from pydantic import ValidationError

    try:
        recipe = Recipe.model_validate(data)
        recipe.check_strength()
        return recipe
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or where}: {e['msg']}" for e in exc.errors()[:8])
        raise GraftError("invalid_recipe", f"{where}: {problems}",
                         {"errors": [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                                     for e in exc.errors()[:50]]}) from None
    except GraftError as err:
        raise GraftError("invalid_recipe", f"{where}: {err.message}", err.details) from None


def layer_position(name: str, layers: int | None, conventions: str = "graft") -> float:
    """Where a tensor sits along the depth, in [0, 1]: its layer index over the last index. graft's
    conventions put embeddings and anything before the first layer at 0, the final norm and head at 1, and a
    one-layer model's layer at 0; mergekit's (its planner's `t`) put every tensor outside the layers at 0 and
    a one-layer model's layer at 1."""
    mergekit = conventions == "mergekit"
    match = LAYER_INDEX.search(name)
    if match is None:
        if mergekit:
            return 0.0
        return 0.0 if "embed" in name or ".wte." in name or name.startswith("wte") else 1.0
    if not layers or layers <= 1:
        return 1.0 if mergekit else 0.0
    return min(1.0, int(match.group(1)) / (layers - 1))


def weight_at(weight: float | list[float], position: float) -> float:
    """A weight list interpolated linearly at `position` in [0, 1] (its points evenly spread)."""
    if not isinstance(weight, list):
        return float(weight)
    if len(weight) == 1:
        return float(weight[0])
    x = position * (len(weight) - 1)
    i = min(int(x), len(weight) - 2)
    frac = x - i
    return float(weight[i] * (1 - frac) + weight[i + 1] * frac)


def transform_at(transform: BaseModel | None, position: float) -> BaseModel | None:
    """A transform whose numbers may be lists, at `position` in [0, 1]: the method's own parameters, each list
    interpolated as a weight list is. GraftError("invalid_recipe") when the values there break the method's
    checks across parameters."""
    from pydantic import ValidationError

    if transform is None:
        return None
    values = transform.model_dump(by_alias=True)
    if not any(isinstance(v, list) for v in values.values()):
        return transform
    points = {k: weight_at(v, position) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return TRANSFORMS[transform.method].Params.model_validate(points)
    except ValidationError as exc:
        raise GraftError("invalid_recipe", f"transform {transform.method} at depth {position:g}: "
                         f"{exc.errors()[0]['msg']}") from None


def rule_for(rules: list[Rule], name: str) -> Rule | None:
    for rule in rules:
        if matches_any([rule.match], name, "rules.match"):
            return rule
    return None
