"""`graft worker`: an RQ forking worker on the graft queue, plus the recovery monitor and the webhook
sender as threads of the parent. Each job runs in a forked work horse: CUDA is initialised only there
(the parent may import torch, which does not touch the GPU). One worker per GPU: set CUDA_VISIBLE_DEVICES.

A Redis outage never ends the process: RQ's work loop, which quits on most connection errors, is started
again once Redis answers (with capped exponential backoff), the threads back off the same way, and a running
job keeps running (see worker/service/jobs.py). SIGTERM stops the worker: at once when idle or waiting for Redis,
after the running job otherwise (RQ's warm shutdown; a second SIGTERM kills the job).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import redis
from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.scheduler import RQScheduler

from worker.service.monitor import Monitor
from worker.service.outage import OUTAGE, REDIS_DOWN, Backoff, RQLogFilter, wait_for_redis
from worker.service.settings import Settings, get_settings
from worker.service.webhooks import WebhookSender

log = logging.getLogger("graft.worker")
# A work loop that ran this long before quitting starts again after the shortest wait.
_STABLE_SECONDS = 60.0


class GraftScheduler(RQScheduler):
    """RQ's scheduler process (it enqueues delayed retries) ends on the first connection error, and the worker
    would start another only at its next maintenance; this one waits for Redis and carries on."""

    retry_max = 5.0

    def work(self) -> None:
        backoff = Backoff(self.retry_max)
        while True:
            try:
                super().work()
                return  # a stop was asked for
            except REDIS_DOWN as exc:
                OUTAGE.down("the RQ scheduler", exc)
            while not self._stop_requested:
                time.sleep(backoff.next())
                if _reachable(self.connection):
                    OUTAGE.up()
                    backoff.reset()
                    break
            if self._stop_requested:
                return  # its locks expire on their own


class GraftWorker(Worker):
    """RQ's forking worker, made to outlive Redis outages:
    - the work horse is waited for whatever Redis does (heartbeats are best effort), so the worker never
      abandons a running job nor takes a second one beside it;
    - teardown is best effort, so a loop that ended on an outage can be replaced by a fresh worker."""

    def __init__(self, *args, retry_max: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_connection_wait_time = retry_max  # RQ's own reconnection waits while it is idle
        self.stop_asked = False

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", *args, **kwargs) -> None:
        """RQ's own, with GraftScheduler (RQ names its scheduler class in the method)."""
        self.scheduler = GraftScheduler(self.queues, connection=self.connection, serializer=self.serializer,
                                        logging_level=logging_level if logging_level is not None else self.log.level)
        self.scheduler.retry_max = self.max_connection_wait_time
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()
        finally:
            self.scheduler.release_locks()
            self.scheduler.register_death()

    def request_stop(self, signum, frame) -> None:
        self.stop_asked = True
        super().request_stop(signum, frame)

    def set_shutdown_requested_date(self) -> None:
        try:  # called from the SIGTERM handler while a job runs; a note for RQ's dashboards only
            super().set_shutdown_requested_date()
        except REDIS_DOWN:
            pass

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is not None:  # queued in the caller's pipeline: the caller meets any error
            super().heartbeat(timeout, pipeline)
            return
        try:
            super().heartbeat(timeout)
        except REDIS_DOWN as exc:
            OUTAGE.down("the worker's heartbeat", exc)

    def maintain_heartbeats(self, job, execution) -> None:
        # Raised here, RQ's monitor_work_horse would leave the horse running unwatched and the worker would quit.
        try:
            super().maintain_heartbeats(job, execution)
        except REDIS_DOWN as exc:
            OUTAGE.down("the worker's heartbeat", exc)

    def _pubsub_exception_handler(self, exc, pubsub, pubsub_thread) -> None:
        if isinstance(exc, REDIS_DOWN):  # RQ's handler logs every retry; redis-py resubscribes on reconnect
            OUTAGE.down("the worker's command channel", exc)
            time.sleep(min(2.0, self.max_connection_wait_time))
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    def teardown(self) -> None:
        if self.is_horse:
            return
        if self.scheduler:
            self.stop_scheduler()
        try:
            self.register_death()
        except REDIS_DOWN:
            pass  # the worker's key expires on its own (worker_ttl)
        if self.pubsub_thread:
            try:
                self.pubsub.unsubscribe()
            except REDIS_DOWN:
                pass
            self.pubsub_thread.stop()
            self.pubsub_thread.join(timeout=1)
            self.pubsub.close()
            self.pubsub_thread = None


def _exit_on_signals() -> None:
    """Outside RQ's loop (which installs its own handlers), SIGTERM and SIGINT end the process at once."""
    def handler(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _reachable(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except REDIS_DOWN:
        return False


def _work(conn: redis.Redis, side: redis.Redis, settings: Settings, burst: bool, level: str) -> None:
    """RQ's work loop, started again (in a fresh worker) whenever it quits without a stop being asked for."""
    backoff = Backoff(settings.redis_retry_max)
    never = threading.Event()
    while True:
        # RQ's maintenance (registry cleanup) every minute is a backstop; the monitor is the fast path.
        w = GraftWorker([Queue(settings.queue_name, connection=conn)], connection=conn, maintenance_interval=60,
                        retry_max=settings.redis_retry_max)
        started = time.monotonic()
        try:
            w.work(burst=burst, logging_level=level, with_scheduler=True)  # delayed retries (jobs.retry_delay)
        except REDIS_DOWN as exc:  # from RQ's bootstrap, which runs before its loop's error handling
            OUTAGE.down("the RQ work loop", exc)
            w.teardown()
        except StopRequested:
            pass  # a SIGTERM during RQ's teardown, which RQ's loop no longer catches
        finally:
            _exit_on_signals()
        if w.stop_asked:
            return
        reachable = _reachable(side)
        if burst and reachable:
            return
        if reachable:
            log.warning("RQ's work loop quit; starting it again")
        if time.monotonic() - started > _STABLE_SECONDS:
            backoff.reset()
        time.sleep(backoff.next())
        wait_for_redis(side, never, settings.redis_retry_max, "the RQ work loop")


def _drain_webhooks(side: redis.Redis, sender: WebhookSender, settings: Settings) -> None:
    """Burst mode: let webhooks of the jobs just finished go out before the process ends."""
    deadline = time.time() + settings.webhook_timeout + 2
    while time.time() < deadline:
        try:
            if not side.zcount(sender.store.webhooks_key, "-inf", time.time()):
                return
        except REDIS_DOWN:
            return
        time.sleep(0.2)


def run_worker(burst: bool = False) -> None:
    settings = get_settings()
    level = os.environ.get("GRAFT_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("rq.worker").addFilter(RQLogFilter())
    _exit_on_signals()
    # RQ's connection (it raises the socket timeout above its blocking dequeue's) and one for our threads,
    # whose commands must give up quickly when Redis is unreachable.
    conn = redis.Redis.from_url(settings.redis_url)
    side = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                                socket_connect_timeout=settings.redis_timeout)
    wait_for_redis(side, threading.Event(), settings.redis_retry_max, "the worker's start")
    if settings.worker_preload:
        import worker.engine.pipeline.graft  # noqa: F401  (torch and the engine, imported once; no CUDA call here)
    monitor, sender = Monitor(side, settings), WebhookSender(side, settings)
    monitor.start()
    sender.start()
    try:
        _work(conn, side, settings, burst, level)
    finally:
        if burst:
            _drain_webhooks(side, sender, settings)
        monitor.stop.set()
        sender.stop.set()
