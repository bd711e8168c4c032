"""Webhook delivery on terminal statuses, off the job's path: a thread in each worker parent takes due
deliveries from a Redis sorted set (queued atomically with the terminal transition, see JobStore) and
POSTs them from a small pool, so a slow receiver delays nothing but its own delivery.

Signature: `Graft-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` (Stripe's scheme: the
timestamp is signed too, so a receiver can refuse replays). Retried with exponential backoff.
Delivery is at least once: a claimed delivery is re-armed for later before it is attempted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import redis

from .job_store import JobStore
from .settings import Settings

log = logging.getLogger("graft.webhooks")
SIGNATURE_HEADER = "Graft-Signature"
# Claim a due delivery: only while its score is still the due time the claimer saw (<= ARGV[2]), push it
# to ARGV[3]. A later claimer sees the pushed score and loses (a ZADD GT alone lets every later clock win).
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def check_webhook_url(url: str, *, allow_private: bool, resolve: bool = False) -> list[str]:
    """http(s) only; with `resolve`, every address the name resolves to must be public (unless allowed).

    Returns the checked addresses (with `resolve` and not `allow_private`): the caller connects to one of
    them, not to a second resolution of the name, which could answer a private address (DNS rebinding)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not carry credentials")
    if allow_private:
        return []
    hosts = [parts.hostname]
    if resolve:
        hosts = [info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443)]
    for host in hosts:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            if host.lower() in ("localhost",) or host.lower().endswith(".localhost"):
                raise ValueError("webhook_url must not point at this host") from None
            continue
        if not all(a.is_global for a in _with_embedded_ipv4(addr)):
            raise ValueError("webhook_url must not point at a private, loopback or link-local address")
    return hosts if resolve else []


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _with_embedded_ipv4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The address and any IPv4 address an IPv6 form carries (mapped, 6to4, NAT64, IPv4-compatible):
    `is_global` alone calls ::127.0.0.1 or 2002:7f00:1:: public."""
    out = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            out.append(addr.ipv4_mapped)
        if addr.sixtofour:
            out.append(addr.sixtofour)
        if addr in _NAT64 or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
            out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


def _pinned(url: str, addr: str) -> tuple[str, dict, dict]:
    """The URL with its host replaced by a checked address, plus the Host header and the TLS name (SNI and
    certificate check) of the original host."""
    parts = urlsplit(url)
    host = f"[{addr}]" if ":" in addr else addr
    netloc = f"{host}:{parts.port}" if parts.port else host
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc}, extensions


class WebhookSender(threading.Thread):
    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        super().__init__(daemon=True, name="graft-webhooks")
        self.store = JobStore(conn, settings.key_prefix)
        self.settings = settings
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="graft-webhook")
        self.client = httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False)
        self._claim_script = conn.register_script(_CLAIM)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.tick()
            except Exception:
                log.exception("webhook tick failed")

    def tick(self) -> None:
        r, key = self.store.r, self.store.webhooks_key
        now = time.time()
        for member in r.zrangebyscore(key, "-inf", now, start=0, num=20):
            if self.claim(member, now):
                self.pool.submit(self._deliver, member)

    def claim(self, member: bytes, due_by: float) -> bool:
        """Push a due delivery's time past a delivery's duration; only one sender wins (see _CLAIM)."""
        rearm = time.time() + self.settings.webhook_timeout + 30
        return bool(self._claim_script(keys=[self.store.webhooks_key], args=[member, repr(due_by), repr(rearm)]))

    def _deliver(self, member: bytes) -> None:
        r, key = self.store.r, self.store.webhooks_key
        item = orjson.loads(member)
        job_id, n = item["job"], item["n"]
        job = self.store.get(job_id)
        if job is None or not job.get("webhook_url"):
            r.zrem(key, member)
            return
        body = orjson.dumps({"type": f"graft.job.{job['status']}", "data": job})
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "Graft-Event": f"graft.job.{job['status']}",
                   "Graft-Delivery": f"{job_id}.{job['status']}", "User-Agent": "graft-webhooks/1"}
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, ts, body)
        error = None
        try:
            addrs = check_webhook_url(job["webhook_url"], allow_private=self.settings.webhook_allow_private,
                                      resolve=True)
            url, extensions = job["webhook_url"], {}
            if addrs:  # connect to the address just checked, not to a fresh (rebindable) DNS answer
                url, host, extensions = _pinned(url, addrs[0])
                headers = {**headers, **host}
            resp = self.client.post(url, content=body, headers=headers, extensions=extensions)
            if 200 <= resp.status_code < 300:
                r.zrem(key, member)
                self.store.add_event(job_id, "webhook_delivered", attempt=n + 1, status_code=resp.status_code)
                return
            error = f"HTTP {resp.status_code}"
        except (httpx.HTTPError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with r.pipeline() as pipe:
            pipe.zrem(key, member)
            if n + 1 < self.settings.webhook_max_attempts:
                delay = self.settings.webhook_backoff * (2 ** n)
                pipe.zadd(key, {orjson.dumps({**item, "n": n + 1}): time.time() + delay})
            pipe.execute()
        self.store.add_event(job_id, "webhook_failed", attempt=n + 1, error=error,
                             will_retry=n + 1 < self.settings.webhook_max_attempts)
