"""`graft`: run a graft locally, serve the API, run a queue worker, or call a service (`graft jobs`, `graft diffs`:
worker/client, which imports no torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from worker import exit_codes
from worker.engine.errors import GraftError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    models = p.add_argument_group("what to graft: three URIs, or a recipe")
    models.add_argument("--source-base", help="URI of the base the fine-tune started from")
    models.add_argument("--source-finetuned", help="URI of the fine-tune whose diff is transferred")
    models.add_argument("--target-base", help="URI of the newer base that receives the diff")
    models.add_argument("--diff", metavar="URI", help="a diff artifact (graft diff extract) in place of "
                        "--source-base and --source-finetuned")
    models.add_argument("--alpha", type=_alphas, default=None, help="scale of the diff (default 1.0); a "
                        "comma-separated list (0.5,0.75,1) is a sweep: each is built and evaluated, the best published")
    models.add_argument("--recipe", metavar="FILE", help="a recipe (YAML or JSON): several diffs, transforms, a "
                        "merge method, per-layer weights, rules (see README: recipes)")
    models.add_argument("--mergekit-config", metavar="FILE", help="a mergekit config of the task-vector family, "
                        "run as the equivalent recipe")
    models.add_argument("--mergekit-stage", metavar="NAME", help="the `name:` of the stage to run in a "
                        "multi-stage mergekit config")
    _add_option_flags(p.add_argument_group("options (override a recipe's)"))


def _add_graft_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan from headers alone; read no data")
    p.add_argument("--json", action="store_true", help="print the plan or summary as JSON")


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """What a graft is made of, for `graft run` and `graft jobs submit` alike: the models, the output, the checks."""
    _add_model_args(p)
    p.add_argument("--output", help="where the checkpoint goes: directory, file:// or s3:// (not with --dry-run)")
    _add_check_flags(p.add_argument_group("checks (see README: know before grafting)"))


def _alphas(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or a comma-separated list of numbers: {text!r}") from None
    return values[0] if len(values) == 1 else values


def _add_check_flags(group) -> None:
    """The flags of worker/engine/checked_graft.Checks and its EvaluateSpec, with their declared descriptions."""
    from worker.engine.checks.checked_graft import Checks, Require, Select
    from worker.engine.checks.evaluation.spec import EvaluateSpec

    fields, spec = Checks.model_fields, EvaluateSpec.model_fields
    group.add_argument("--evaluate", action="store_true", help=fields["evaluate"].description)
    group.add_argument("--probe-text", metavar="FILE", help=f"(with --evaluate) {spec['probe_text'].description}")
    group.add_argument("--prompts", metavar="FILE", help=f"(with --evaluate) one prompt per line; "
                       f"{spec['prompts'].description}")
    group.add_argument("--max-new-tokens", type=int, help=f"(with --evaluate) {spec['max_new_tokens'].description}")
    group.add_argument("--select", choices=[s.value for s in Select], help=fields["select"].description)
    group.add_argument("--require", choices=[r.value for r in Require], help=fields["require"].description)


def _add_option_flags(group) -> None:
    """One flag per field of the engine's RecipeOptions: the CLI, the API and recipes share one declaration."""
    from typing import get_args, get_origin

    from worker.engine.planning.recipe import RecipeOptions

    for name, field in RecipeOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_ = f"{field.description} (default {default or 'none'})"
        if get_origin(field.annotation) is list:
            group.add_argument(flag, dest=name, action="append", default=None, metavar="REGEX", help=help_)
        elif get_args(field.annotation) and all(isinstance(a, str) for a in get_args(field.annotation)):
            group.add_argument(flag, dest=name, choices=get_args(field.annotation), default=None, help=help_)
        else:
            group.add_argument(flag, dest=name, default=None, help=help_)


def _read_document(path: str, what: str = "--recipe", code: str = "invalid_recipe") -> dict:
    """A recipe file (YAML is a superset of JSON), read by the same bounded loader as a tenant's config."""
    from worker.engine.planning.mergekit_config import load_yaml

    data = load_yaml(_read_text(path, what, code=code, missing="input_not_found"), where=path)
    if not isinstance(data, dict):
        raise GraftError(code, f"{path}: expected a mapping at the top level")
    return data


def _job_body(args: argparse.Namespace) -> dict:
    """The API body (worker/service/kinds: Models and graft's Checks) of graft run's flags, only the fields given:
    a recipe's fields are the body's own (the API takes target_base, diffs, merge, rules and options of one), a
    mergekit config goes as its text, the option flags and alpha as options, the checks as graft run reads them."""
    from worker.engine.planning.recipe import RecipeOptions

    body = _read_document(args.recipe) if args.recipe else {}
    if args.mergekit_config:
        body["mergekit_config"] = _read_text(args.mergekit_config, "--mergekit-config", code="invalid_recipe",
                                             missing="input_not_found")
    # `diff` (an artifact's id or URI in place of the source pair) is the body's field of that name
    for name in ("source_base", "source_finetuned", "target_base", "diff", "mergekit_stage", "output", "select",
                 "require"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    options = {name: getattr(args, name) for name in RecipeOptions.model_fields if getattr(args, name) is not None}
    if args.alpha is not None:
        options["alpha"] = args.alpha
    if options:
        body["options"] = {**(body.get("options") or {}), **options}
    evaluate = _evaluate_spec(args)
    if evaluate is not None:
        body["evaluate"] = evaluate.model_dump(mode="json", exclude_unset=True)
    return body


def _request(args: argparse.Namespace):
    """The GraftRequest the flags describe: its recipe, from a recipe file, a mergekit config (the option flags
    override their options) or the three URIs and alpha (a one-diff recipe)."""
    from worker.engine.planning.recipe import RecipeOptions, load_recipe
    from worker.engine.planning.request import GraftRequest

    flags = {name: getattr(args, name) for name in RecipeOptions.model_fields if getattr(args, name) is not None}
    three = [args.source_base, args.source_finetuned, args.target_base]
    if args.diff and (args.source_base or args.source_finetuned):
        raise GraftError("invalid_option", "--diff replaces --source-base and --source-finetuned: not both")
    if args.diff:
        three[:2] = [args.diff, args.diff]
    documents = [f for f in (args.recipe, args.mergekit_config) if f]
    alpha = None if isinstance(args.alpha, list) else args.alpha  # a list is a sweep (see _sweep)
    if len(documents) > 1 or (documents and (any(three) or alpha is not None)):
        raise GraftError("invalid_option", "give either --recipe, --mergekit-config or the three model URIs "
                         "(or --diff and --target-base; with --alpha)")
    if args.mergekit_stage and not args.mergekit_config:
        raise GraftError("invalid_option", "--mergekit-stage names a stage of a --mergekit-config: give the config")
    if args.recipe:
        data = _read_document(args.recipe)
        if isinstance(data.get("options"), dict | None):  # anything else is load_recipe's to refuse by name
            data["options"] = {**(data.get("options") or {}), **flags}
        recipe = load_recipe(data, where=args.recipe)
    elif args.mergekit_config:
        from worker.engine.planning.mergekit_config import recipe_from_mergekit

        # The text, not a dict: the converter's own loader bounds nesting and refuses YAML's non-JSON types.
        recipe = recipe_from_mergekit(_read_text(args.mergekit_config, "--mergekit-config",
                                                   code="invalid_recipe", missing="input_not_found"),
                                      stage=args.mergekit_stage)
        recipe = load_recipe({**recipe.to_dict(), "options": {**recipe.options.model_dump(), **flags}},
                             where=args.mergekit_config)
    else:
        missing = [f"--{n}" for n, v in zip(("source-base", "source-finetuned", "target-base"), three,
                                            strict=True) if not v]
        if missing:
            raise GraftError("invalid_option", f"{', '.join(missing)} required (or --recipe FILE)")
        from worker.engine.planning.options import GraftOptions
        from worker.engine.planning.recipe import Recipe

        recipe = Recipe.single(args.source_base, args.source_finetuned, args.target_base,
                               GraftOptions(alpha=1.0 if alpha is None else alpha, **flags), diff=args.diff)
    return GraftRequest(recipe, getattr(args, "output", None) or "")


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.dry_run and not args.output:
        raise GraftError("invalid_option", "--output is required (or use --dry-run)")
    request = _request(args)
    if args.dry_run:
        from worker.engine.checks.inspect import headers_verdict
        from worker.engine.pipeline.resolve import close_models, plan_graft

        plan, models = plan_graft(request)
        try:
            summary = {**plan.to_dict(), "preflight": headers_verdict(request, models, plan)}
        finally:
            close_models(models)
        print(json.dumps(summary, indent=2) if args.json else _format_plan(summary))
        return 0
    from worker.engine.checks.checked_graft import run_checked_graft
    from worker.progress import TerminalProgress

    checks, alphas = _checks(args)
    bar = TerminalProgress()
    try:
        result = run_checked_graft(request, checks, alphas=alphas, progress=bar.update, warn=bar.warn)
    finally:
        bar.close()
    stats = result.stats
    if args.json:
        print(json.dumps({"output": result.output_uri, "manifest": result.manifest_uri, "stats": stats,
                          **result.checks}))
    else:
        actions = ", ".join(f"{n} {a}" for a, n in sorted(result.manifest["plan"]["actions"].items()))
        print(f"grafted {stats['tensors']} tensors ({actions}) into {result.output_uri} in "
              f"{stats['seconds_total']:.2f}s, {stats['bytes_read'] / 1e9:.2f} GB read at "
              f"{stats['input_gb_per_s']} GB/s, {len(result.warnings)} warning(s)")
        for line in _format_checks(result.checks):
            print(line)
    return 0


def _read_text(path: str, what: str, *, code: str = "invalid_option", missing: str | None = None) -> str:
    """A file the flags name, as UTF-8 text of at most MAX_CONFIG_CHARS characters (read no further: a recipe,
    a config, a probe text or prompts are pages, and a parser must not be handed a disk image)."""
    from worker.engine.planning.mergekit_config import MAX_CONFIG_CHARS

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_CONFIG_CHARS + 1)
    except OSError as exc:
        raise GraftError(missing or code, f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise GraftError(code, f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > MAX_CONFIG_CHARS:
        raise GraftError(code, f"{what} {path}: longer than {MAX_CONFIG_CHARS} characters")
    return text


def _evaluate_spec(args: argparse.Namespace):
    """The EvaluateSpec the flags describe, or None when no evaluation was asked for."""
    from pydantic import ValidationError

    from worker.engine.checks.evaluation.spec import EvaluateSpec

    given = {}
    if args.probe_text:
        given["probe_text"] = _read_text(args.probe_text, "--probe-text")
    if getattr(args, "prompts", None):
        given["prompts"] = [line for line in _read_text(args.prompts, "--prompts").splitlines() if line.strip()]
    if getattr(args, "max_new_tokens", None) is not None:
        given["max_new_tokens"] = args.max_new_tokens
    if not given and not getattr(args, "evaluate", False):
        return None
    try:
        return EvaluateSpec(**given)
    except ValidationError as exc:
        raise GraftError("invalid_option", _validation_message(exc)) from None


def _validation_message(exc) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1000]


def _checks(args: argparse.Namespace):
    """(Checks, the sweep's alphas or None) from the flags."""
    from worker.engine.checks.checked_graft import Checks, check_alphas

    alphas = check_alphas(args.alpha) if isinstance(args.alpha, list) else None
    if args.select and not alphas:
        raise GraftError("invalid_option", "--select picks among several alphas: give --alpha 0.5,0.75,1")
    return Checks(evaluate=_evaluate_spec(args), select=args.select, require=args.require), alphas


def _format_checks(checks: dict) -> list[str]:
    lines = []
    if "preflight" in checks:
        lines.append(f"preflight: {checks['preflight']['verdict']}")
    sweep = checks.get("sweep")
    if sweep:
        for c in sweep["candidates"]:
            mark = " <- published" if c["alpha"] == sweep["chosen_alpha"] else ""
            lines.append(f"alpha {c['alpha']:g}: {sweep['select']} {c['score']:.4f}{mark}")
    evaluation = checks.get("evaluation")
    if evaluation:
        lines += _format_evaluation(evaluation)
    return lines


def _format_evaluation(evaluation: dict) -> list[str]:
    if "error" in evaluation:
        return [f"not evaluated: [{evaluation['error']['code']}] {evaluation['error']['message']}"]
    from worker.engine.checks.checked_graft import evaluation_warnings

    probe = evaluation["probe"]
    lines = ["probe perplexity: " + ", ".join(f"{role} {_number(probe[role]['perplexity'], '.3f')}" for role in
                                             ("target_base", "output", "source_finetuned"))]
    lines.append(f"KL(fine-tune || output) on the prompts: {_number(evaluation['kl_to_finetuned']['mean'], '.4f')}")
    for sample in evaluation.get("samples", [])[:3]:
        lines.append(f"sample: {sample['prompt']!r} -> {sample['text']!r}")
    lines += [f"warning: {w['message']}" for w in evaluation_warnings(evaluation)]
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    from worker.engine.checks.inspect import Level, Verdict, inspect_graft

    if isinstance(args.alpha, list):
        raise GraftError("invalid_option", "--alpha: a list is a sweep (graft run); inspect judges the inputs")
    request = _request(args)
    probe = _read_text(args.probe_text, "--probe-text") if args.probe_text else None
    result = inspect_graft(request, level=Level(args.level), probe_text=probe)
    if args.report:
        os.makedirs(args.report, exist_ok=True)
        for name, data in result.artifacts.items():
            with open(os.path.join(args.report, name), "wb") as fh:
                fh.write(data)
    report = result.report
    print(json.dumps(report, indent=2) if args.json else _format_report(report, args.report))
    return exit_codes.NOT_REQUIRED_VERDICT if args.require and report["verdict"] != Verdict.COMPATIBLE else 0


def _number(value, spec: str) -> str:
    # null in a record: a loss that overflowed, or a KL with no prompt to measure it on
    return "n/a" if value is None else format(value, spec)


def _format_function(function: dict | None) -> list[str]:
    """The function level's line per probed base; or why it did not run."""
    if not function:
        return []
    if "skipped" in function:
        return [f"function level not run: {function['skipped']}"]
    lines = []
    for probe in function.get("probes", [function]):
        if "lambdas" not in probe:
            lines.append(f"function level not run for {probe.get('source_base', 'a base')}: "
                         f"{probe.get('skipped', 'no probe')}")
            continue
        lines.append("loss from source base to target base: " + ", ".join(
            f"{lam:g}: {_number(loss, '.4f')}" for lam, loss in zip(probe["lambdas"], probe["losses"], strict=True))
            + f"; barrier {_number(probe.get('barrier'), '.4f')} ({_number(probe.get('barrier_ratio'), '.1%')} of "
            "the end losses)")
    return lines


def _format_report(report: dict, report_dir: str | None) -> str:
    lines = [f"verdict: {report['verdict']} (levels run: {', '.join(report['levels_run'])})"]
    for reason in report["reasons"]:
        lines.append(f"  [{reason['verdict']}] {reason['level']}: {reason['message']}")
    estimates = report.get("estimates") or {}
    if estimates:
        lines.append("estimates: " + ", ".join(f"{k} {v}" for k, v in estimates.items() if not isinstance(v, dict)))
    lines += _format_function(report.get("function"))
    if report_dir:
        lines.append(f"report written to {report_dir}")
    return "\n".join(lines)


def _format_plan(summary: dict) -> str:
    lines = [f"tensors: {summary['tensors_total']} ("
             + ", ".join(f"{n} {a}" for a, n in sorted(summary["actions"].items())) + ")",
             f"output: {summary['output_bytes']:,} bytes in {len(summary['shards'])} shard(s); "
             f"{summary['input_bytes_to_read']:,} input bytes to read",
             f"tied word embeddings: {summary['tied_word_embeddings']}"]
    memory = summary.get("memory") or {}
    for role, held in memory.get("remote_inputs", {}).items():
        lines.append(f"{role}: remote reads hold at most {held['bytes']:,} bytes ({held['lanes']} lanes, "
                     f"{held['windows']} windows of {held['window_bytes']:,} bytes)")
    for shard in summary["shards"]:
        lines.append(f"  {shard['file']}: {shard['tensors']} tensors, {shard['bytes']:,} bytes")
    for name, rows in summary["vocab"].get("tensors", {}).items():
        lines.append(f"vocab {name}: {rows['transferred']} rows transferred, {rows['from_target']} from target, "
                     f"{rows['from_finetuned']} from fine-tune -> {rows['output_rows']} rows")
    for d in summary["source_only"]:
        lines.append(f"source only (not written): {d['tensor']} in {', '.join(d['in'])}")
    for w in summary["warnings"]:
        lines.append(f"warning: {w['message']}")
    preflight = summary.get("preflight")
    if preflight:
        lines.append(f"header-level verdict: {preflight['verdict']} (weights and function levels: graft inspect)")
        lines += [f"  [{r['verdict']}] {r['message']}" for r in preflight["reasons"] if r["verdict"] != "compatible"]
    if "recipe" in summary:
        r = summary["recipe"]
        lines.append(f"recipe: merge {r['merge']['method']}, {r['merged_tensors']} tensors merged, tensors per diff "
                     f"{r['tensors_per_diff']}, {r['statistics_passes']} statistics pass(es) before the compute")
    return "\n".join(lines)


_DIFF_HELP = "the fine-tuning update as an artifact: extract it once, apply it to every new base (graft run --diff)"


def _add_diff_commands(sub) -> None:
    diff = sub.add_parser("diff", help=_DIFF_HELP)
    diff_sub = diff.add_subparsers(dest="diff_command", required=True)
    extract = diff_sub.add_parser("extract", help="extract source_finetuned - source_base into a diff artifact")
    from worker.engine.diffs.request import DiffExtract

    fields = DiffExtract.model_fields
    extract.add_argument("--source-base", required=True, help=fields["source_base"].description or
                         "URI of the base the fine-tune started from")
    extract.add_argument("--source-finetuned", required=True, help="URI of the fine-tune")
    extract.add_argument("--output", required=True, help="where the artifact goes: directory, file:// or s3://")
    from worker.engine.diffs.encodings import ENCODINGS

    extract.add_argument("--encoding", choices=list(ENCODINGS), default="exact", help=fields["encoding"].description)
    for name, flag_type in _encoding_flags().items():
        extract.add_argument("--" + name.replace("_", "-"), dest=f"enc_{name}", type=flag_type, default=None,
                             help=_encoding_flag_help(name))
    extract.add_argument("--shard-size", type=int, default=None, help=fields["shard_size"].description)
    extract.add_argument("--json", action="store_true", help="print the artifact's manifest summary as JSON")
    extract.set_defaults(func=_cmd_diff_extract)


def _encoding_flags() -> dict[str, type]:
    """Every parameter of every encoding, once (--density, --rank, ...): the encodings' own Params declare them."""
    from worker.engine.diffs.encodings import ENCODINGS

    flags: dict[str, type] = {}
    for encoding in ENCODINGS.values():
        for name, field in encoding.Params.model_fields.items():
            if name != "encoding":
                flags.setdefault(name, float if field.annotation in (float, float | None) else int
                                 if field.annotation in (int, int | None) else str)
    return flags


def _encoding_flag_help(name: str) -> str:
    from worker.engine.diffs.encodings import ENCODINGS

    owners = [(e.name, e.Params.model_fields[name]) for e in ENCODINGS.values() if name in e.Params.model_fields]
    return "; ".join(f"({enc}) {f.description or name}" for enc, f in owners)


def _cmd_diff_extract(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
    from worker.engine.pipeline.diff_extract import extract_diff
    from worker.progress import TerminalProgress

    encoding = {"encoding": args.encoding, **{name: getattr(args, f"enc_{name}") for name in _encoding_flags()
                                              if getattr(args, f"enc_{name}") is not None}}
    body = {"source_base": args.source_base, "source_finetuned": args.source_finetuned, "encoding": encoding}
    if args.shard_size is not None:
        body["shard_size"] = args.shard_size
    try:
        spec = DiffExtract.model_validate(body)
    except ValidationError as exc:
        raise GraftError("invalid_option", _validation_message(exc)) from None
    bar = TerminalProgress()
    try:
        result = extract_diff(DiffExtractRequest(spec, args.output), progress=bar.update)
    finally:
        bar.close()
    totals = result.manifest["totals"]
    if args.json:
        print(json.dumps({"output": result.output_uri, "manifest": result.manifest_uri, "totals": totals,
                          "content_address": result.manifest["content_address"], "stats": result.manifest["stats"]}))
    else:
        print(f"extracted {totals['tensors']} tensors ({args.encoding}) into {result.output_uri}: "
              f"{totals['encoded_bytes']:,} bytes, {totals['ratio_to_finetuned']}x smaller than the fine-tune, "
              f"relative error {totals['rel_frobenius']:.3g} in {result.manifest['stats']['seconds_total']:.2f}s")
    return 0


_LORA_HELP = "the transfer as a LoRA adapter (PEFT's layout) for the target: vLLM or PEFT serve it on that base"


def _add_lora_command(sub) -> None:
    from worker.engine.pipeline.lora_request import LoraExport

    lora = sub.add_parser("lora", help=_LORA_HELP)
    lora.add_argument("--source-base", help="URI of the base the fine-tune started from (with --source-finetuned)")
    lora.add_argument("--source-finetuned", help="URI of the fine-tune")
    lora.add_argument("--diff", help="URI of a diff artifact (instead of the pair)")
    lora.add_argument("--target-base", required=True, help="URI of the base the adapter is for (checked against)")
    lora.add_argument("--output", required=True, help="where the adapter goes: directory, file:// or s3://")
    rank = lora.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=_ranks, help="the rank (default 64; vllm: rounded up to one vLLM accepts), "
                      "or a sweep: 8,16,64 (each evaluated; the smallest within --max-kl is published)")
    rank.add_argument("--energy", type=float, help="instead of rank: per module, the smallest rank keeping this "
                      "share of its delta's squared norm")
    lora.add_argument("--profile", choices=["vllm", "peft"], default="vllm",
                      help="vllm: linear modules only; peft: also norms, embeddings and biases (default vllm)")
    lora.add_argument("--modules", help="regex searched in module names (default: the decoder layers' linear ones)")
    lora.add_argument("--alpha", type=float, default=1.0, help="transfer strength, folded into lora_B (default 1)")
    lora.add_argument("--power-iterations", type=int,
                      help=LoraExport.model_fields["power_iterations"].description + " (default 1)")
    lora.add_argument("--evaluate", action="store_true", help=LoraExport.model_fields["evaluate"].description)
    lora.add_argument("--max-kl", type=float, help=LoraExport.model_fields["max_kl"].description)
    lora.add_argument("--device", choices=["cpu", "cuda", "auto"], help=LoraExport.model_fields["device"].description)
    lora.add_argument("--factor-dtype", choices=["float32", "bfloat16", "float16"],
                      help=LoraExport.model_fields["factor_dtype"].description + " (default float32)")
    lora.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")
    lora.set_defaults(func=_cmd_lora)


def _ranks(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a rank or a comma-separated list of ranks") from None
    return values[0] if len(values) == 1 else values


def _cmd_lora(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.engine.checks.checked_lora import run_checked_lora
    from worker.engine.pipeline.lora_request import LoraExport, LoraExportRequest

    body = {k: getattr(args, k) for k in ("source_base", "source_finetuned", "diff", "target_base", "output",
                                          "energy", "profile", "modules", "alpha", "max_kl", "device",
                                          "power_iterations", "factor_dtype")
            if getattr(args, k) is not None}
    if args.rank is not None:
        body["ranks" if isinstance(args.rank, list) else "rank"] = args.rank
    body["evaluate"] = args.evaluate
    try:
        spec = LoraExport.model_validate(body)
    except ValidationError as exc:
        raise GraftError("invalid_option", _validation_message(exc)) from None
    result = run_checked_lora(LoraExportRequest(spec))
    m = result.manifest
    if args.json:
        print(json.dumps({"output": result.output_uri, "manifest": result.manifest_uri, "rank": m["rank"],
                          "totals": m["totals"], "left_out": sorted(m["left_out"]), "stats": m["stats"],
                          "fidelity": m.get("fidelity")}))
        return 0
    if m.get("fidelity"):
        print(f"{'rank':>5} {'bytes':>12} {'KL to graft':>12} {'KL to fine-tune':>16} {'probe loss':>11}")
        for c in m["fidelity"]["curve"]:
            print(f"{c['rank']:>5} {c['adapter_bytes']:>12,} {_num(c['kl_to_full_graft']):>12} "
                  f"{_num(c['kl_to_finetuned']):>16} {_num(c['probe_loss']):>11}")
        print(f"picked rank {m['fidelity']['picked_rank']} (the smallest within --max-kl {spec.max_kl})")
    print(f"wrote a rank-{m['rank']} adapter ({spec.profile}) of {len(m['modules'])} modules into "
          f"{result.output_uri}: relative error {m['totals']['rel_frobenius_lora']:.3g} on the factored "
          f"modules, {m['totals']['left_out_share']:.3%} of ||delta||^2 left out ({len(m['left_out'])} tensors, "
          f"listed in lora-manifest.json)")
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve

    serve(host=args.host, port=args.port)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.service_worker import run_worker

    run_worker(burst=args.burst)
    return 0


def _add_client_commands(sub) -> None:
    """`graft jobs ...`, `graft diffs ...` and `graft loras ...` (worker/client), lent graft run's flags and the
    kinds' routes."""
    from functools import partial

    from worker.client.commands import Lent
    from worker.client.parsers import add_parsers
    from worker.service.kinds import KINDS

    add_parsers(sub, Lent(kinds={k.name: k.route.path for k in KINDS.values()}, add_graft_flags=_add_job_args,
                          graft_body=_job_body, read_document=partial(_read_document, what="body",
                                                                      code="invalid_body"),
                          bodies={k.name: k.body for k in KINDS.values()}))


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Fine-tuning transfer: "
                                     "target_base + alpha * (source_finetuned - source_base)")
    sub = parser.add_subparsers(dest="command", required=True)
    if argv[:1] in (["jobs"], ["diffs"], ["loras"]):
        # The service's client alone: the other commands' flags import what it never needs (the diff encodings
        # behind `graft diff extract`'s flags import torch), and the client starts in a fraction of a second.
        _add_client_commands(sub)
        return parser
    run = sub.add_parser("run", help="graft three checkpoints into a new one")
    _add_graft_args(run)
    run.set_defaults(func=_cmd_run)
    inspect = sub.add_parser("inspect", help="judge before grafting whether the transfer can work: a verdict "
                             "(compatible, risky, incompatible) with its reasons")
    _add_model_args(inspect)
    from worker.engine.checks.checked_graft import Require
    from worker.engine.verdict import LEVEL_HELP, Level

    inspect.add_argument("--level", choices=[lv.value for lv in Level], default=Level.WEIGHTS.value,
                         help=f"{LEVEL_HELP} (default weights)")
    inspect.add_argument("--probe-text", metavar="FILE", help="text for the function level (default: built in)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--report", metavar="DIR", help="write report.json and the per-layer chart here")
    inspect.add_argument("--require", choices=[r.value for r in Require],
                         help="exit with status 3 unless the verdict is this")
    inspect.set_defaults(func=_cmd_inspect)
    if argv[:1] == ["diff"]:
        _add_diff_commands(sub)
    else:  # listed for --help; its flags (the encodings' parameters) import torch, built when it runs
        sub.add_parser("diff", help=_DIFF_HELP)
    _add_lora_command(sub)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_cmd_serve)
    from worker.service.kinds import KINDS

    worker = sub.add_parser("worker", help=f"run a queue worker (it runs the job kinds {', '.join(KINDS)})")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_cmd_worker)
    _add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except GraftError as err:
        print(f"graft: error [{err.code}]: {err.message}", file=sys.stderr)
        return exit_codes.FAILED
    except KeyboardInterrupt:
        print("graft: interrupted; nothing was published", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception as exc:  # a bug of ours, not the user's input: one line unless asked for more
        if _debug():
            traceback.print_exc()
        message = " ".join(str(exc).split())[:500] or "no message"
        print(f"graft: error [internal_error]: {type(exc).__name__}: {message} (set GRAFT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return exit_codes.INTERNAL_ERROR


# Commands that do their work in this process and are done when main() returns (not the service's processes,
# whose libraries may still have shutdown work of their own).
ONE_SHOT = {"run", "diff", "lora", "inspect"}


def entry() -> None:
    """The `graft` command: main(); a one-shot command's process then ends without the interpreter's teardown
    (0.5-0.6 s of a graft's whole process on 2 cores, most of it torch's own finalisers, with nothing left to
    do: an output is committed, its files closed and synced, its threads joined, by the time main() returns)."""
    argv = sys.argv[1:]
    code = main(argv)
    if next((a for a in argv if not a.startswith("-")), None) in ONE_SHOT:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """End the process at once with `code`, what it printed flushed first."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def _debug() -> bool:
    try:
        from worker.service.settings import Settings

        return Settings().debug
    except Exception:  # settings that cannot be read must not hide the error being reported
        return False


if __name__ == "__main__":
    entry()
