"""Level headers: what configs, safetensors headers and tokenizer files say, no tensor data read.

Config agreement is judged between each source base and the target (and each fine-tune and its base):
- architecture (model_type, sizes, layer and head counts, head_dim) differing: incompatible. A diff is added
  by tensor name; in another architecture the same name is another function (a head split another way, a
  layer that means something else), even where the shapes happen to agree.
- rope_theta differing: risky. It changes every rotary frequency, so the target's attention was retrained for
  other angles at every position, and the fine-tune's q/k changes were learned for the old ones.
- rope_scaling or max_position_embeddings differing: informational. Context extension (Llama 3 -> 3.1's
  rope_scaling, say) keeps the short-range frequencies as they were and continues the same training: the
  continued pretraining the transfer is made for. The weights level measures how far it went.
- vocab_size differing: informational here; the tokenizer comparison decides whether shared ids agree.
"""

from __future__ import annotations

from worker.engine.checks.inspect import tokens
from worker.engine.errors import GraftError
from worker.engine.planning.options import base_role, finetuned_role
from worker.engine.planning.plan import EMBED_NAME, LM_HEAD_NAME, Plan, find_name
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import ARITHMETIC_FLOATS
from worker.engine.verdict import Level, Verdict, reason

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim")
CONFIG_KEYS = (*ARCHITECTURE_KEYS, "rope_theta", "rope_scaling", "vocab_size", "max_position_embeddings",
               "tie_word_embeddings")
INFORMATIONAL_KEYS = {"rope_scaling": "rope_scaling_changed", "max_position_embeddings": "context_changed",
                      "vocab_size": "vocab_size_differs"}  # tie_word_embeddings: see mixed_tying
SHOWN = 10  # names listed per kind in the alignment summary
MESSAGE_CAP = 2000  # characters of a plan error's message kept in its reason


def diff_roles(request: GraftRequest) -> list[tuple[int, str, str]]:
    """(diff index, base role, fine-tune role) of each diff of the request."""
    if request.plain:
        return [(0, "source_base", "source_finetuned")]
    return [(i, base_role(i), finetuned_role(i)) for i in range(len(request.recipe.diffs))]


def config_value(config: dict, key: str):
    """A config's value, looked up in text_config too (multimodal wrappers) and derived where transformers
    derives it (head_dim, num_key_value_heads, rope_theta under transformers 5's rope_parameters)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (config, text):
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    merged = {**text, **{k: v for k, v in config.items() if v is not None}}
    heads, hidden = merged.get("num_attention_heads"), merged.get("hidden_size")
    if key == "head_dim" and isinstance(heads, int) and isinstance(hidden, int) and heads:
        return hidden // heads
    if key == "num_key_value_heads":
        return heads
    if key == "rope_theta" and isinstance(merged.get("rope_parameters"), dict):
        return merged["rope_parameters"].get("rope_theta")
    return None


def _config_reasons(models: dict[str, ResolvedModel], pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    differences, reasons = [], []
    for a, b in pairs:
        if models[a] is models[b]:
            continue
        differ = {k: [config_value(models[a].config, k), config_value(models[b].config, k)] for k in CONFIG_KEYS}
        differ = {k: v for k, v in differ.items() if v[0] != v[1]}
        differences += [{"key": k, "between": [a, b], "values": v} for k, v in differ.items()]
        arch = {k: v for k, v in differ.items() if k in ARCHITECTURE_KEYS}
        if arch:
            reasons.append(reason("architecture_mismatch", Level.HEADERS, Verdict.INCOMPATIBLE,
                                  f"{a} and {b} are different architectures: "
                                  + "; ".join(f"{k} {v[0]!r} vs {v[1]!r}" for k, v in arch.items()),
                                  values=_numbers(arch)))
        if "rope_theta" in differ and b == "target_base":
            reasons.append(reason("rope_changed", Level.HEADERS, Verdict.RISKY,
                                  f"rope_theta is {differ['rope_theta'][0]} in {a}, {differ['rope_theta'][1]} in "
                                  "the target: the target's attention was retrained for other rotary angles",
                                  values=_numbers({"rope_theta": differ["rope_theta"]})))
        for key, code in INFORMATIONAL_KEYS.items():
            if key in differ:
                reasons.append(reason(code, Level.HEADERS, Verdict.COMPATIBLE,
                                      f"{key} is {differ[key][0]!r} in {a}, {differ[key][1]!r} in {b}",
                                      values=_numbers({key: differ[key]})))
    return differences, reasons


def _numbers(differ: dict[str, list]) -> dict[str, float]:
    """A difference's numeric values as reason values: `key.a`, `key.b`."""
    out = {}
    for key, (x, y) in differ.items():
        for side, v in (("a", x), ("b", y)):
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{key}.{side}"] = v
    return out


def tied(model: ResolvedModel, embed: str | None, head: str | None) -> bool:
    """Stored tied: an embedding and no head tensor of its own (the planner's rule)."""
    return bool(embed and embed in model.tensors and (not head or head not in model.tensors))


def model_summary(model: ResolvedModel, embed: str | None, head: str | None) -> dict:
    dtypes: dict[str, int] = {}
    for info in model.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    return {"uri": model.uri, "model_type": model.config.get("model_type"), "tensors": len(model.tensors),
            "parameters": sum(i.numel for i in model.tensors.values() if i.dtype in ARITHMETIC_FLOATS),
            "bytes": sum(i.nbytes for i in model.tensors.values()), "dtypes": dtypes,
            "vocab_size": model.vocab_size, "tied": tied(model, embed, head),
            "tie_word_embeddings": config_value(model.config, "tie_word_embeddings"),
            "tokenizer_files": model.tokenizer_files()}


def alignment(target: ResolvedModel, base: ResolvedModel, finetuned: ResolvedModel) -> dict:
    """Names, shapes and dtypes of one diff's three models, by tensor name (tying not resolved: see `tied`)."""
    t, s, f = target.tensors, base.tensors, finetuned.tensors
    common = sorted(set(t) & set(s) & set(f))
    source_only = sorted((set(s) | set(f)) - set(t))
    target_only = sorted(set(t) - (set(s) & set(f)))
    shapes = [n for n in common if not t[n].shape == s[n].shape == f[n].shape]
    dtypes: dict[str, int] = {}
    for n in common:
        if not t[n].dtype == s[n].dtype == f[n].dtype:
            key = f"{t[n].dtype}/{s[n].dtype}/{f[n].dtype}"
            dtypes[key] = dtypes.get(key, 0) + 1
    return {"common": len(common), "source_only": len(source_only), "source_only_names": source_only[:SHOWN],
            "target_only": len(target_only), "target_only_names": target_only[:SHOWN],
            "shape_differences": len(shapes),
            "shape_examples": [{"tensor": n, "target": list(t[n].shape), "source_base": list(s[n].shape),
                                "source_finetuned": list(f[n].shape)} for n in shapes[:SHOWN]],
            "dtype_differences": sum(dtypes.values()), "dtypes_target_base_finetuned": dtypes}


def plan_reason(err: GraftError) -> dict:
    message = err.message if len(err.message) <= MESSAGE_CAP else err.message[:MESSAGE_CAP] + "..."
    listed = err.details.get("tensors") if isinstance(err.details, dict) else None
    return reason(err.code, Level.HEADERS, Verdict.INCOMPATIBLE, f"the graft cannot be planned: {message}",
                  values={"tensors": len(listed)} if isinstance(listed, list) else {})


def inspect_headers(request: GraftRequest, models: dict[str, ResolvedModel], plan: Plan | None,
                    plan_error: GraftError | None) -> tuple[dict, list[dict]]:
    """The headers section of the report and its reasons."""
    names = set().union(*(m.tensors for m in models.values()))
    target = models["target_base"]
    embed = find_name(target.tensors, EMBED_NAME) or find_name(names, EMBED_NAME)
    head = (find_name(target.tensors, LM_HEAD_NAME) or find_name(names, LM_HEAD_NAME)
            or ("lm_head.weight" if embed else None))
    diffs = diff_roles(request)
    pairs = [(b, "target_base") for _i, b, _f in diffs] + [(b, f) for _i, b, f in diffs]
    differences, reasons = _config_reasons(models, list(dict.fromkeys(pairs)))
    if plan_error is not None:
        reasons.append(plan_reason(plan_error))
    roles = ["target_base", *(r for _i, b, f in diffs for r in (b, f))]
    section = {
        "models": {role: model_summary(models[role], embed, head) for role in roles},
        "config": {"keys": list(CONFIG_KEYS), "differences": differences},
        "alignment": [{"diff": i, **alignment(target, models[b], models[f])} for i, b, f in diffs],
        "plan": plan.to_dict() if plan is not None else {"error": plan_error.to_dict() if plan_error else None},
    }
    layout = {role: section["models"][role]["tied"] for role in roles}
    if len(set(layout.values())) > 1:
        reasons.append(reason("mixed_tying", Level.HEADERS, Verdict.COMPATIBLE,
                              "embeddings are tied in " + ", ".join(r for r, v in layout.items() if v)
                              + " only; the output writes lm_head untied", values={}))
    section["tokenizer"], token_reasons = tokenizer_agreement(models, diffs)
    return section, reasons + token_reasons


def _rows(*models: ResolvedModel) -> int | None:
    sizes = [m.vocab_size for m in models if m.vocab_size is not None]
    return min(sizes) if sizes else None


def tokenizer_agreement(models: dict[str, ResolvedModel], diffs: list[tuple[int, str, str]]
                        ) -> tuple[list[dict], list[dict]]:
    """Per diff: the source's ids against the target's over the rows the diff is applied to, and what the
    fine-tune added to its base's tokenizer. The source side is the source base's tokenizer (the diff's rows
    are in its id space), the fine-tune's when the base has none."""
    cache: dict[int, tuple] = {}

    def vocab(model: ResolvedModel):
        if id(model) not in cache:
            cache[id(model)] = tokens.read_vocab(model)
        return cache[id(model)]

    target_vocab, target_why = vocab(models["target_base"])
    out, reasons = [], []
    for i, b, f in diffs:
        base, finetuned = models[b], models[f]
        (base_vocab, base_why), (ft_vocab, ft_why) = vocab(base), vocab(finetuned)
        source_vocab, source_role = (base_vocab, b) if base_vocab is not None else (ft_vocab, f)
        entry: dict = {"diff": i, "source": source_role if source_vocab is not None else None}
        label = f" (diff {i})" if len(diffs) > 1 else ""
        if source_vocab is None or target_vocab is None:
            unknown: dict[str, list[str]] = {}  # why -> the roles it holds for
            for role, (v, w) in ((b, (base_vocab, base_why)), (f, (ft_vocab, ft_why)),
                                 ("target_base", (target_vocab, target_why))):
                if v is None:
                    unknown.setdefault(w, []).append(role)
            why = "; ".join(f"{', '.join(roles)}: {w}" for w, roles in unknown.items())
            entry["status"] = "unknown"
            entry["why"] = why
            differ = base.vocab_size != models["target_base"].vocab_size
            reasons.append(reason("tokenizer_unknown", Level.HEADERS, Verdict.RISKY if differ else Verdict.COMPATIBLE,
                                  f"tokenizers not compared{label}: {why}"
                                  + ("; the vocabulary sizes differ, so shared ids may name other tokens"
                                     if differ else ""), values={}))
        else:
            rows = _rows(base, finetuned, models["target_base"])
            if rows is None:
                rows = min(max(source_vocab.ids, default=-1), max(target_vocab.ids, default=-1)) + 1
            entry.update(status="compared", **tokens.compare(source_vocab, target_vocab, rows))
            reasons += _token_reasons(entry, label)
        if base_vocab is not None and ft_vocab is not None and base is not finetuned:
            entry["finetune_changes"] = tokens.added_tokens(base_vocab, ft_vocab)
            added = entry["finetune_changes"]["added"]
            if added:
                reasons.append(reason("tokens_added_by_finetune", Level.HEADERS, Verdict.COMPATIBLE,
                                      f"the fine-tune added {added} token(s){label}; their rows are copied "
                                      "from it (vocab: extend)", values={"added": added}))
        out.append(entry)
    return out, reasons


def _token_reasons(entry: dict, label: str) -> list[dict]:
    """Re-assigned ordinary tokens: incompatible (the diff's rows would be added to other tokens' rows).
    Only special tokens renamed (reserved placeholders given a name, as between Llama 3 and 3.1): risky,
    a handful of barely trained rows."""
    examples = ", ".join(f"{e['id']}: {e['source']!r} vs {e['target']!r}" for e in entry["examples"])
    values = {k: entry[k] for k in ("reassigned", "reassigned_special", "rows_compared")}
    if entry["reassigned"]:
        return [reason("tokenizer_ids_reassigned", Level.HEADERS, Verdict.INCOMPATIBLE,
                       f"{entry['reassigned']} of the {entry['rows_compared']} ids the diff is applied to name "
                       f"another token in the target's tokenizer{label} (e.g. {examples}): their embedding rows "
                       "would be misapplied", values=values)]
    if entry["reassigned_special"]:
        return [reason("special_tokens_reassigned", Level.HEADERS, Verdict.RISKY,
                       f"{entry['reassigned_special']} special token id(s) name another token in the target's "
                       f"tokenizer{label} (e.g. {examples})", values=values)]
    return []
