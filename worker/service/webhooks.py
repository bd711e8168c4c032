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
import re
import socket
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import redis

from worker.service.job_store import JobStore
from worker.service.outage import OUTAGE, REDIS_DOWN, Backoff
from worker.service.settings import Settings

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


class WebhookURLError(ValueError):
    """A refused webhook_url; `code` is what the API's 422 puts in `errors[].type`."""

    def __init__(self, message: str, code: str = "webhook_url_not_allowed") -> None:
        super().__init__(message)
        self.code = code


class WebhookHostUnresolved(WebhookURLError):
    """The host gave no address (no such name, resolver down or too slow): nothing to check or connect to."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "webhook_host_unresolved")


def check_webhook_target(url: str, *, allow_private: bool, timeout: float = 2.0) -> None:
    """Submission-time check: raises WebhookURLError (a ValueError) for a URL whose host parses or resolves
    to a non-public address or names this machine. Blocks up to about `timeout` seconds on DNS: call it from
    a worker thread, never from the event loop.

    A host that does not resolve (no such name, resolver down or slow) is accepted: delivery resolves it
    again, checks and pins the address, so nothing unchecked is ever contacted, while refusing here would
    tie submissions to the API host's view of DNS (split horizon, outages) and to receivers that already
    exist when the job is submitted."""
    try:
        check_webhook_url(url, allow_private=allow_private, resolve=True, resolve_timeout=timeout)
    except WebhookHostUnresolved as exc:
        log.info("webhook host not resolved at submission, checked again at delivery: %s", exc)


def check_webhook_url(url: str, *, allow_private: bool, resolve: bool = False,
                      resolve_timeout: float = 2.0) -> list[str]:
    """http(s) only, no credentials; unless `allow_private`, the host must not be (or, with `resolve`,
    resolve to) a non-public address nor name this machine. Raises WebhookURLError; with `resolve`, a host
    that gives no address within `resolve_timeout` seconds raises WebhookHostUnresolved.

    Returns the checked addresses (with `resolve` and not `allow_private`): the caller connects to one of
    them, not to a second resolution of the name, which could answer a private address (DNS rebinding)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # bad brackets, port out of range
        raise WebhookURLError(f"webhook_url is not a valid URL: {exc}", "invalid") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookURLError("webhook_url must be an http:// or https:// URL with a host", "invalid")
    if parts.username or parts.password:
        raise WebhookURLError("webhook_url must not carry credentials", "invalid")
    if allow_private:
        return []
    forms = _host_forms(parts.hostname)
    literals = [a for form in forms for a in _literal_addresses(form)]
    own_names, own_addrs = _this_host(resolve_timeout)
    if literals:  # what the OS would connect to without asking DNS: check it, pin it
        _refuse_non_public(literals, own_addrs)
        return [str(literals[0])] if resolve else []
    if any(form in _LOCAL_NAMES or form.endswith(".localhost") or form in own_names for form in forms):
        raise WebhookURLError("webhook_url must not point at this host")
    if not resolve:
        return []
    addrs = _resolve(parts.hostname, port, resolve_timeout)
    _refuse_non_public([ipaddress.ip_address(a) for a in addrs], own_addrs)
    return addrs


# Names /etc/hosts commonly maps to loopback; a resolved check catches others, these are refused unresolved.
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost4", "localhost4.localdomain4",
                          "localhost6", "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"})
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_INET_ATON_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")


def _host_forms(host: str) -> list[str]:
    """The ASCII names a resolver could make of the URL's host: IDNA (what getaddrinfo applies to a non-ASCII
    name: NFKC, fullwidth digits and dots), lower case, trailing dots dropped. An IPv6 literal as itself."""
    if ":" in host:  # urlsplit yields a colon only from a bracketed IPv6 literal
        try:
            return [str(ipaddress.IPv6Address(host))]
        except ValueError:
            raise WebhookURLError("webhook_url host is not a valid IPv6 address", "invalid") from None
    candidates = {unicodedata.normalize("NFKC", host)}
    try:
        candidates.add(host.encode("idna").decode("ascii"))
    except UnicodeError:
        pass
    forms = sorted(f for f in {c.lower().rstrip(".") for c in candidates} if _NAME.fullmatch(f))
    if not forms:
        raise WebhookURLError("webhook_url host is not a valid host name", "invalid")
    return forms


def _literal_addresses(form: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address(es) a host string means without DNS: an IPv6 literal, or IPv4 as inet_aton reads it
    (and so getaddrinfo): 1 to 4 parts, each decimal, 0x hex or 0-led octal, the last part filling the
    remaining bytes, so `127.1`, `2130706433`, `0x7f000001` and `0177.0.0.1` all mean 127.0.0.1."""
    if ":" in form:
        return [ipaddress.IPv6Address(form)]
    out = []
    parts = form.split(".")
    if len(parts) <= 4 and all(_INET_ATON_PART.fullmatch(p) for p in parts):
        values = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") else int(p)
                  for p in parts]
        *head, last = values
        tail_bits = 8 * (4 - len(head))
        if all(v <= 255 for v in head) and last < 1 << tail_bits:
            out.append(ipaddress.IPv4Address(int.from_bytes(bytes(head), "big") << tail_bits | last))
    try:  # the platform's own reading too, should it differ from the one above
        out.append(ipaddress.IPv4Address(socket.inet_aton(form)))
    except OSError:
        pass
    return out


def _refuse_non_public(addrs: list, own: frozenset) -> None:
    for addr in addrs:
        if not all(a.is_global and not a.is_multicast for a in _with_embedded_ipv4(addr)):
            raise WebhookURLError("webhook_url must not point at a private, loopback, link-local or reserved "
                                  "address")
        if addr in own:
            raise WebhookURLError("webhook_url must not point at this host")


# getaddrinfo has no timeout: each lookup runs on a daemon thread the caller stops waiting for. A thread
# given up on ends when the resolver's own timeouts end it; this caps how many can be alive at once, so a
# flood of slow names cannot pile threads up (past it, a lookup counts as unanswered).
_LOOKUPS = threading.BoundedSemaphore(32)


def _bounded(fn, timeout: float, what: str):
    """fn() on a daemon thread; WebhookHostUnresolved when it raises OSError/UnicodeError or takes longer
    than `timeout` seconds."""
    if not _LOOKUPS.acquire(blocking=False):
        raise WebhookHostUnresolved(f"{what}: too many lookups in flight")
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller, which decides what it means
            box["error"] = exc
        finally:
            _LOOKUPS.release()
            done.set()

    try:
        threading.Thread(target=run, daemon=True, name="graft-webhook-dns").start()
    except RuntimeError:  # no thread to be had: the lookup did not happen
        _LOOKUPS.release()
        raise WebhookHostUnresolved(f"{what}: no thread for the lookup") from None
    if not done.wait(timeout):
        raise WebhookHostUnresolved(f"{what}: no answer within {timeout:g} s")
    error = box.get("error")
    if isinstance(error, OSError | UnicodeError):
        raise WebhookHostUnresolved(f"{what}: {error}") from error
    if error is not None:
        raise error
    return box["value"]


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    infos = _bounded(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout, host)
    addrs = list(dict.fromkeys(info[4][0] for info in infos))
    if not addrs:
        raise WebhookHostUnresolved(f"{host}: no address")
    return addrs


_this_host_lock = threading.Lock()
_this_host_cache: tuple[float, frozenset, frozenset] | None = None


def _this_host(timeout: float) -> tuple[frozenset[str], frozenset]:
    """This machine's names (host name, FQDN) and the addresses they resolve to, looked up (bounded) and
    kept for 5 minutes; half an answer (a slow resolver) is kept for 30 s."""
    global _this_host_cache
    with _this_host_lock:
        if _this_host_cache is None or time.monotonic() >= _this_host_cache[0]:
            try:
                names, addrs = _bounded(_gather_this_host, timeout, "this host's names")
                ttl = 300.0
            except WebhookHostUnresolved:
                names, addrs, ttl = frozenset({socket.gethostname().lower().rstrip(".")}), frozenset(), 30.0
            _this_host_cache = (time.monotonic() + ttl, names, addrs)
        return _this_host_cache[1], _this_host_cache[2]


def _gather_this_host() -> tuple[frozenset[str], frozenset]:
    names = {socket.gethostname(), socket.getfqdn()}
    addrs = set()
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        addrs.update(ipaddress.ip_address(info[4][0]) for info in infos)
    return frozenset(n.lower().rstrip(".") for n in names if n), frozenset(addrs)


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
        # A delivery whose thread met an outage stays claimed and comes due again later (at least once).
        backoff = Backoff(self.settings.redis_retry_max)
        delay = 0.2
        while not self.stop.wait(delay):
            delay = 0.2
            try:
                self.tick()
            except REDIS_DOWN as exc:
                OUTAGE.down("the webhook sender", exc)
                delay = backoff.next()
                continue
            except Exception:
                log.exception("webhook tick failed")
            OUTAGE.up()
            backoff.reset()

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
