"""`graft worker`: an RQ forking worker on the graft queue, plus the recovery monitor and the webhook
sender as threads of the parent. Each job runs in a forked work horse: CUDA is initialised only there
(the parent may import torch, which does not touch the GPU). One worker per GPU: set CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import redis
from rq import Queue, Worker

from .monitor import Monitor
from .settings import get_settings
from .webhooks import WebhookSender


def run_worker(burst: bool = False) -> None:
    settings = get_settings()
    logging.basicConfig(level=os.environ.get("GRAFT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = redis.Redis.from_url(settings.redis_url)
    conn.ping()
    if settings.worker_preload:
        import worker.engine.run  # noqa: F401  (torch and the engine, imported once; no CUDA call here)
    queue = Queue(settings.queue_name, connection=conn)
    monitor, sender = Monitor(conn, settings), WebhookSender(conn, settings)
    monitor.start()
    sender.start()
    # RQ's own maintenance (registry cleanup) every minute is a backstop; the monitor is the fast path.
    w = Worker([queue], connection=conn, maintenance_interval=60)
    try:
        w.work(burst=burst, logging_level=os.environ.get("GRAFT_LOG_LEVEL", "INFO"))
    finally:
        if burst:  # let webhooks of the jobs just finished go out before the process ends
            deadline = time.time() + settings.webhook_timeout + 2
            while time.time() < deadline and conn.zcount(sender.store.webhooks_key, "-inf", time.time()):
                time.sleep(0.2)
        monitor.stop.set()
        sender.stop.set()
