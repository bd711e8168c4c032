"""`graft`: run a graft locally, serve the API, or run a queue worker."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .engine.errors import GraftError


def _add_graft_args(p: argparse.ArgumentParser) -> None:
    models = p.add_argument_group("what to graft: three URIs, or a recipe")
    models.add_argument("--source-base", help="URI of the base the fine-tune started from")
    models.add_argument("--source-finetuned", help="URI of the fine-tune whose diff is transferred")
    models.add_argument("--target-base", help="URI of the newer base that receives the diff")
    models.add_argument("--alpha", type=float, default=None, help="scale of the diff (default 1.0)")
    models.add_argument("--recipe", metavar="FILE", help="a recipe (YAML or JSON): several diffs, transforms, a "
                        "merge method, per-layer weights, rules (see README: recipes)")
    models.add_argument("--mergekit-config", metavar="FILE", help="a mergekit config of the task-vector family, "
                        "run as the equivalent recipe")
    p.add_argument("--output", help="where the checkpoint goes: directory, file:// or s3:// (not with --dry-run)")
    _add_option_flags(p.add_argument_group("options (override a recipe's)"))
    p.add_argument("--dry-run", action="store_true", help="print the plan from headers alone; read no data")
    p.add_argument("--json", action="store_true", help="print the plan or summary as JSON")


def _add_option_flags(group) -> None:
    """One flag per field of the engine's RecipeOptions: the CLI, the API and recipes share one declaration."""
    from typing import get_args, get_origin

    from .engine.recipe import RecipeOptions

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


def _read_document(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)  # YAML is a superset of JSON
    except OSError as exc:
        raise GraftError("input_not_found", f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GraftError("invalid_recipe", f"{path}: not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GraftError("invalid_recipe", f"{path}: expected a mapping at the top level")
    return data


def _request(args: argparse.Namespace):
    """The GraftRequest the flags describe: three URIs and alpha, or a recipe (whose options the option
    flags override)."""
    from .engine.options import GraftRequest
    from .engine.recipe import RecipeOptions, load_recipe

    flags = {name: getattr(args, name) for name in RecipeOptions.model_fields if getattr(args, name) is not None}
    three = [args.source_base, args.source_finetuned, args.target_base]
    documents = [f for f in (args.recipe, args.mergekit_config) if f]
    if len(documents) > 1 or (documents and (any(three) or args.alpha is not None)):
        raise GraftError("invalid_option", "give either --recipe, --mergekit-config or the three model URIs "
                         "(with --alpha)")
    if args.recipe:
        data = _read_document(args.recipe)
        data["options"] = {**(data.get("options") or {}), **flags}
        recipe = load_recipe(data, where=args.recipe)
    elif args.mergekit_config:
        from .engine.mergekit_config import recipe_from_mergekit

        recipe = recipe_from_mergekit(_read_document(args.mergekit_config))
        recipe = load_recipe({**recipe.to_dict(), "options": {**recipe.options.model_dump(), **flags}},
                             where=args.mergekit_config)
    else:
        missing = [f"--{n}" for n, v in zip(("source-base", "source-finetuned", "target-base"), three,
                                            strict=True) if not v]
        if missing:
            raise GraftError("invalid_option", f"{', '.join(missing)} required (or --recipe FILE)")
        from .engine.options import GraftOptions

        options = GraftOptions(alpha=1.0 if args.alpha is None else args.alpha, **flags)
        return GraftRequest(args.source_base, args.source_finetuned, args.target_base, args.output or "", options)
    return GraftRequest.from_recipe(recipe, args.output or "")


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.dry_run and not args.output:
        raise GraftError("invalid_option", "--output is required (or use --dry-run)")
    request = _request(args)
    if args.dry_run:
        from .engine.run import close_models, plan_graft

        plan, models = plan_graft(request)
        close_models(models)
        summary = plan.to_dict()
        print(json.dumps(summary, indent=2) if args.json else _format_plan(summary))
        return 0
    from .engine.run import run_graft
    from .progress import TerminalProgress

    bar = TerminalProgress()
    try:
        result = run_graft(request, progress=bar.update, warn=bar.warn)
    finally:
        bar.close()
    stats = result.stats
    if args.json:
        print(json.dumps({"output": result.output_uri, "manifest": result.manifest_uri, "stats": stats}))
    else:
        actions = ", ".join(f"{n} {a}" for a, n in sorted(result.manifest["plan"]["actions"].items()))
        print(f"grafted {stats['tensors']} tensors ({actions}) into {result.output_uri} in "
              f"{stats['seconds_total']:.2f}s, {stats['bytes_read'] / 1e9:.2f} GB read at "
              f"{stats['input_gb_per_s']} GB/s, {len(result.warnings)} warning(s)")
    return 0


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
    if "recipe" in summary:
        r = summary["recipe"]
        lines.append(f"recipe: merge {r['merge']['method']}, {r['merged_tensors']} tensors merged, tensors per diff "
                     f"{r['tensors_per_diff']}, {r['statistics_passes']} statistics pass(es) before the compute")
    return "\n".join(lines)


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve

    serve(host=args.host, port=args.port)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .service_worker import run_worker

    run_worker(burst=args.burst)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graft", description="Fine-tuning transfer: "
                                     "target_base + alpha * (source_finetuned - source_base)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="graft three checkpoints into a new one")
    _add_graft_args(run)
    run.set_defaults(func=_cmd_run)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_cmd_serve)
    worker = sub.add_parser("worker", help="run a queue worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_cmd_worker)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraftError as err:
        print(f"graft: error [{err.code}]: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graft: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours, not the user's input: one line unless asked for more
        if _debug():
            traceback.print_exc()
        message = " ".join(str(exc).split())[:500] or "no message"
        print(f"graft: error [internal_error]: {type(exc).__name__}: {message} (set GRAFT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _debug() -> bool:
    try:
        from .settings import Settings

        return Settings().debug
    except Exception:  # settings that cannot be read must not hide the error being reported
        return False


if __name__ == "__main__":
    sys.exit(main())
