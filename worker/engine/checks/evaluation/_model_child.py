"""The child process of isolation.py: one request (a JSON file named on its command line), one answer on
stdout, then exit.

It dies with the process that started it, sets its address-space limit once torch and transformers are
imported (the soft limit only: the tokenizer's own child it starts sets its own), re-resolves the inputs by URI
under the request's confinement, and runs the evaluation or the function-level probe as the worker would
in-process. A GraftError is answered as such; an allocation past the limit as model_too_large."""

from __future__ import annotations

import json
import resource
import sys

PER_THREAD_BYTES = 16 << 20  # a thread's stack (8 MiB) and its share of the malloc arenas' reservations


def _limit(memory: int | None) -> None:
    from worker.engine.checks.evaluation._text_child import vm_size

    vm = vm_size()
    if not memory or not vm:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = vm + memory if hard == resource.RLIM_INFINITY else min(vm + memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _models(req: dict, settings) -> dict:
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import remote_reads
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    return {name: resolve_model(m["role"], parse_uri(m["uri"], field=m["role"]),
                                endpoint_url=settings.s3_endpoint_url, max_header_bytes=settings.max_header_bytes,
                                reads=remote_reads(settings), allowed_roots=req["allowed_roots"],
                                denied_roots=req["denied_roots"], retry=storage_retry(settings))
            for name, m in req["models"].items()}


def _evaluate(models: dict, args: dict, settings, device: str) -> dict:
    from worker.engine.checks.evaluation import evaluate_graft
    from worker.engine.checks.evaluation.spec import EvaluateSpec

    return evaluate_graft(models["output"], models["target_base"], models["source_finetuned"],
                          EvaluateSpec.model_validate(args["spec"]), settings=settings, device=device)


def _probe(models: dict, args: dict, settings, device: str) -> dict:
    from worker.engine.checks.inspect.function import function_probe

    return function_probe(models["source_base"], models["target_base"], models["tokenizer_from"],
                          text=args.get("text"), settings=settings, device=device)


OPS = {"evaluate": _evaluate, "probe": _probe}


def _run(req: dict) -> dict:
    from worker.engine.config import EngineSettings
    from worker.engine.errors import GraftError

    settings = EngineSettings.model_validate({**req["settings"], "eval_isolation": "inline"})
    try:
        models = _models(req, settings)
        try:
            return {"result": OPS[req["op"]](models, req["args"], settings, req["device"])}
        finally:
            for model in {id(m): m for m in models.values()}.values():
                model.store.close()
    except GraftError as err:
        return {"error": {"code": err.code, "message": err.message, "details": err.details}}
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        limit = f"{req['memory']:,} bytes of address space beyond its start" if req.get("memory") else "the device's"
        return {"error": {"code": "model_too_large", "message": f"the models ran past the memory their process may "
                          f"take ({limit}: GRAFT_EVAL_MEMORY_BYTES and a slack)"}}


def main() -> None:
    from worker.engine.checks.evaluation._text_child import die_with_parent

    die_with_parent(int(sys.argv[1]))
    import torch  # (imported before the limit is set: its libraries are mapped, not the models)
    import transformers  # noqa: F401

    with open(sys.argv[2], encoding="utf-8") as fh:
        req = json.load(fh)
    # Each of torch's threads holds a stack (and, past MALLOC_ARENA_MAX, an arena) besides the budget.
    threads = torch.get_num_threads() + torch.get_num_interop_threads()
    _limit(req["memory"] + threads * PER_THREAD_BYTES if req.get("memory") else None)
    try:
        answer = _run(req)
    except BaseException as exc:  # an answer, whatever happened: the parent reads one line
        answer = {"error": {"code": "model_failed", "message": f"{type(exc).__name__}: {str(exc)[:500]}"}}
    try:
        line = json.dumps(answer)
    except (TypeError, ValueError) as exc:
        line = json.dumps({"error": {"code": "internal_error", "message": f"unserializable answer: {exc}"}})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
