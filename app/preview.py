"""Previews (the dry-run plan) run in a small pool of spawned processes, never in the API process: reading and
parsing up to three users' safetensors headers is CPU work on user input, and a thread of the API would share
its GIL with the event loop. A preview that outlives its deadline has its process killed, so no input can keep
a core or the API busy; every store the planner opens is closed in the child on every path.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .problems import Problem

STARTUP_TIMEOUT = 120.0  # a pool process importing torch on a loaded machine


def _plan_in_child(settings_dump: dict, request: dict) -> dict:
    """Runs in a pool process. Returns {"plan": ...} or {"error": {"code", "message"}} (exceptions with our
    constructors do not survive pickling, and a crash here must not become the API's 500)."""
    from worker.engine.checks.inspect import headers_verdict
    from worker.engine.errors import GraftError
    from worker.engine.pipeline.resolve import close_models, plan_graft
    from worker.engine.planning.recipe import load_recipe
    from worker.engine.planning.request import GraftRequest
    from worker.service.settings import Settings

    try:
        settings = Settings(**settings_dump)
        graft = GraftRequest(load_recipe(request["recipe"]), "", **request.get("confinement", {}))
        plan, models = plan_graft(graft, settings)
        try:
            return {"plan": {**plan.to_dict(), "preflight": headers_verdict(graft, models, plan)}}
        finally:
            close_models(models)
    except GraftError as err:
        return {"error": {"code": err.code, "message": err.message}}
    except Exception as exc:  # a bug, reported as such without a traceback to the caller
        return {"error": {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500]}}


def _warm() -> None:
    import worker.engine.pipeline.graft  # noqa: F401  (torch and the engine, once per pool process)


class PreviewPool:
    def __init__(self, settings_dump: dict, workers: int, timeout: float) -> None:
        self.settings_dump, self.workers, self.timeout = settings_dump, max(1, workers), timeout
        self._pool: ProcessPoolExecutor | None = None
        self._ready: Future | None = None
        self._lock = threading.Lock()

    def _executor(self) -> tuple[ProcessPoolExecutor, Future]:
        """The pool, and a future done once its processes have imported the engine: a preview's deadline
        starts then, so that no preview is charged for (and killed during) a process's start."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_warm)
                self._ready = self._pool.submit(int)
            return self._pool, self._ready

    def _discard(self, pool: ProcessPoolExecutor, *, restart: bool = True) -> None:
        """Kill a pool's processes (a preview overran). The replacement starts warming at once, so the next
        preview does not pay the engine's import against its deadline."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for proc in list((pool._processes or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        if restart:
            self._executor()

    async def plan(self, request: dict) -> dict:
        pool, ready = self._executor()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(asyncio.wrap_future(ready), STARTUP_TIMEOUT)
            future = loop.run_in_executor(pool, _plan_in_child, self.settings_dump, request)
            out = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._discard(pool)
            raise Problem(504, "preview_timeout", f"the preview took longer than {self.timeout:g} s and was "
                          "stopped; the inputs may be very large or their storage slow") from None
        except BrokenProcessPool:
            self._discard(pool)
            raise Problem(503, "preview_unavailable", "the preview process stopped; retry",
                          headers={"Retry-After": "1"}) from None
        if "error" in out:
            err = out["error"]
            status = 500 if err["code"] == "internal_error" else 422
            raise Problem(status, err["code"], err["message"])
        return out["plan"]

    def close(self) -> None:
        pool = self._pool
        if pool is not None:
            self._discard(pool, restart=False)
