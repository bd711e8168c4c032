"""A real S3 server on a bandwidth-bound link, for the benches (issue 17's rig).

s3rver (npm `s3rver` 3.7.1, installed on first use under .bench/s3rver/) runs in a network namespace of its
own, reached through a veth pair; the kernel caps every TCP connection in each direction: an HTB class per
value of the low byte of the client's port (a `tc u32` hash table of 256 buckets on both ends of the pair),
each class at the rate asked. No proxy process: the link costs no CPU of this machine beyond the kernel's
own. moto stays the correctness tests' server; this rig is for figures only (moto serves every request on one
Python interpreter and reads the whole object for each ranged GET).

    with S3Rig() as rig:
        endpoint = rig.start(5e6)                 # 5 MB/s per connection and direction
        rig.create_bucket("bench")
        with rig.uncapped():                      # set-up traffic need not crawl
            rig.upload_dir("path/to/model", "bench", "in/model")
        reads = rig.read_floor([rig.objects("bench", "in/model")], lanes=8)
        upload = rig.upload_floor("bench", "floor/up", 360_000_000, parts_in_flight=8)

    .venv/bin/python bench/s3_rig.py floors --rate 5 --inputs 3 --size 360MB   # the floors alone
    .venv/bin/python bench/s3_rig.py serve --rate 5 --upload DIR s3://bench/in/m  # a rig to point graft at
    .venv/bin/python bench/s3_rig.py check --rate 5                               # is each connection capped?
    .venv/bin/python bench/s3_rig.py cleanup                                      # rigs whose owner died

Clean-up on every path: the context manager, atexit, SIGTERM/SIGINT (turned into exceptions by the CLI) and,
for a SIGKILL of this process, a reaper: a tiny shell started in a session of its own that waits for this
process to end and then kills the server and deletes the link and the namespace (and `cleanup`, which removes
the rigs of dead owners, also runs before each start). The server gets PR_SET_PDEATHSIG as well.

Caveats, as measured: a connection whose client port shares its low byte with another open connection's
shares that connection's class (Linux hands out connect() ports to one destination in steps of 2, so this is
rare below ~100 open connections; `port_collisions()` counts it). HTB counts frames, headers included: the
payload gets ~3% less than the rate.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, ".bench")
S3RVER_DIR = os.path.join(BENCH, "s3rver")
S3RVER_VERSION = "3.7.1"
S3RVER_JS = os.path.join(S3RVER_DIR, "node_modules", "s3rver", "bin", "s3rver.js")
# s3rver's built-in account: it checks every request's signature against it.
ACCESS_KEY = SECRET_KEY = "S3RVER"
PREFIX = "gs3"  # namespaces gs3-<owner pid>-<n>, links gs3h<tag>/gs3n<tag>
BUCKETS = 256  # buckets of a u32 hash table (its most): every value of the port's low byte
# HTB classes: one per value of the client port's low CLASS_BITS bits. Issue 17's rig had 8 (the low byte);
# 10 makes two of 24 connections sharing a class (and so half their rate each) 4x rarer.
CLASS_BITS = 10
UNMATCHED = 0xFFFF  # HTB class of what no bucket takes (ARP, ...): not capped
LINK = 0xFFFE  # HTB class above the connections' (the link's own cap, if any)
MB = 1_000_000
MiB = 1 << 20


def run(cmd: list[str], *, input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=input_text, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def kernel_support() -> dict[str, bool]:
    """What the rig needs of this kernel: network namespaces, veth, HTB, u32 (and, for the record, what it lacks:
    fq, netem, the flow classifier)."""
    config: dict[str, str] = {}
    with contextlib.suppress(OSError):
        import gzip

        with gzip.open("/proc/config.gz", "rt") as fh:
            for line in fh:
                if line.startswith("CONFIG_") and "=" in line:
                    k, v = line.strip().split("=", 1)
                    config[k] = v
    names = {"netns": "CONFIG_NET_NS", "veth": "CONFIG_VETH", "htb": "CONFIG_NET_SCH_HTB",
             "u32": "CONFIG_NET_CLS_U32", "fq": "CONFIG_NET_SCH_FQ", "netem": "CONFIG_NET_SCH_NETEM",
             "flow": "CONFIG_NET_CLS_FLOW"}
    return {k: config.get(v) in ("y", "m") for k, v in names.items()}


def ensure_s3rver() -> str:
    """s3rver's entry point, installed with npm under .bench/s3rver/ (not globally) the first time."""
    if not os.path.exists(S3RVER_JS):
        os.makedirs(S3RVER_DIR, exist_ok=True)
        if not os.path.exists(os.path.join(S3RVER_DIR, "package.json")):
            with open(os.path.join(S3RVER_DIR, "package.json"), "w") as fh:
                json.dump({"name": "graft-bench-s3rver", "private": True}, fh)
        run(["npm", "install", "--prefix", S3RVER_DIR, "--no-audit", "--no-fund", f"s3rver@{S3RVER_VERSION}"])
    return S3RVER_JS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove the rigs (namespace, link) whose owner process is gone; the names of what was removed."""
    removed = []
    listing = run(["ip", "netns", "list"], check=False).stdout.split()
    for ns in listing:
        parts = ns.split("-")
        if len(parts) != 3 or parts[0] != PREFIX or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "link", "del", _host_link(int(parts[1]), int(parts[2]))], check=False)
        run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


def _tag(owner: int, n: int) -> str:
    return format(owner * 16 + n, "x")


def _host_link(owner: int, n: int) -> str:
    return f"{PREFIX}h{_tag(owner, n)}"


def _free_subnet(tag: str) -> tuple[str, str]:
    """Two addresses of a /30 in 10.200.0.0/13 that no interface of this machine uses."""
    used = run(["ip", "-o", "-4", "addr"], check=False).stdout
    seed = int(hashlib.sha256(tag.encode()).hexdigest(), 16)
    for i in range(1 << 14):
        block = (seed + i) % (1 << 17)  # /30 blocks of 10.200.0.0/13
        a = (10 << 24) | (200 << 16) | (block << 2)
        host, peer = (socket.inet_ntoa((a + k).to_bytes(4, "big")) for k in (1, 2))
        if f" {host}/" not in used and f" {peer}/" not in used:
            return host, peer
    raise RuntimeError("no free /30 in 10.200.0.0/13")


def _set_pdeathsig() -> None:
    """In the server's child before exec: die with the process that started it (PR_SET_PDEATHSIG = 1)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def tc_script(dev: str, rate: float | None, *, client_port_is: str, class_bits: int = CLASS_BITS,
              link_rate: float | None = None, replace: bool = False) -> str:
    """`tc -batch` lines: HTB at the root of `dev`, one class per value of the client port's low `class_bits` bits
    at `rate` bytes/s (None: uncapped), chosen by u32 hash tables: the port's low byte first (256 buckets, the
    most one u32 table has), then, above 8 bits, the next bits in a table per bucket. The classes are children
    of one class at `link_rate` (None: uncapped), the link's own cap shared by all connections (a machine's NIC
    in front of a store that caps each connection). `client_port_is`: 'src' on the client's side of the pair
    (uploads), 'dst' on the server's (downloads). `replace`: only change the classes' rates."""
    def bits(r: float | None) -> str:
        return f"{max(8, int(r * 8))}bit" if r else "100gbit"

    burst = max(128 << 10, int(rate / 50)) if rate else 4 << 20  # above a 64 KB GSO frame; 20 ms of the rate
    link_burst = max(128 << 10, int(link_rate / 50)) if link_rate else 4 << 20
    verb = "change" if replace else "add"
    classes = 1 << class_bits
    # Under a link cap, a connection's guaranteed rate is its share of the link, and it borrows up to its own cap:
    # active connections then share the link evenly (equal quanta).
    floor_rate = min(rate or link_rate or 0, link_rate / classes) if link_rate else rate
    lines = [] if replace else [f"qdisc add dev {dev} root handle 1: htb default {UNMATCHED:x}",
                                f"class add dev {dev} parent 1: classid 1:{UNMATCHED:x} htb rate 100gbit"]
    lines.append(f"class {verb} dev {dev} parent 1: classid 1:{LINK:x} htb rate {bits(link_rate)} "
                 f"ceil {bits(link_rate)} burst {link_burst} cburst {link_burst}")
    lines += [f"class {verb} dev {dev} parent 1:{LINK:x} classid 1:{c + 1:x} htb rate {bits(floor_rate)} "
              f"ceil {bits(rate)} burst {burst} cburst {burst} quantum 60000" for c in range(classes)]
    if replace:
        return "\n".join(lines) + "\n"
    # The TCP ports are the 32-bit word 20 bytes into the IP header (Linux sends no IP options): the source
    # port in its high half, the destination's in its low half. u32 shifts a masked key down by the mask's
    # lowest set bit, so each mask yields the bits it picks as a bucket number.
    shift = 16 if client_port_is == "src" else 0
    low = 0xFF << shift
    high = (((1 << (class_bits - 8)) - 1) << 8) << shift
    f = f"filter add dev {dev} parent 1: prio 5 protocol ip"
    lines += [f"{f} u32", f"filter add dev {dev} parent 1: prio 5 handle 2: protocol ip u32 divisor {BUCKETS}"]
    if class_bits == 8:
        lines += [f"{f} u32 ht 2:{b:x}: match u32 0 0 flowid 1:{b + 1:x}" for b in range(BUCKETS)]
    else:
        sub = 1 << (class_bits - 8)
        for b in range(BUCKETS):
            table = 0x100 + b
            lines.append(f"filter add dev {dev} parent 1: prio 5 handle {table:x}: protocol ip u32 divisor {sub}")
            lines += [f"{f} u32 ht {table:x}:{h:x}: match u32 0 0 flowid 1:{(h << 8 | b) + 1:x}" for h in range(sub)]
            lines.append(f"{f} u32 ht 2:{b:x}: match u32 0 0 hashkey mask 0x{high:08x} at 20 link {table:x}:")
    lines.append(f"{f} u32 ht 800:: match ip protocol 6 0xff hashkey mask 0x{low:08x} at 20 link 2:")
    return "\n".join(lines) + "\n"


@dataclass
class Request:
    """One request of a floor, for a timeline: seconds from the floor's start."""
    group: int
    lane: int
    key: str
    start: int
    length: int
    t_start: float
    t_first: float = 0.0
    t_end: float = 0.0


@dataclass
class Floor:
    seconds: float
    bytes: int
    group_seconds: list[float] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0  # most open connections to the server seen during it
    sharing: int = 0  # of which shared a class with another (their client ports' low bits)
    cpu_client: float = 0.0  # CPU seconds of this process during it
    cpu_server: float = 0.0  # and of s3rver

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB if self.seconds else 0.0


class _ConnWatch:
    """Samples the open connections to the server twice a second while a floor or a job runs."""

    def __init__(self, rig: S3Rig) -> None:
        self.rig, self.most, self.sharing = rig, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            ports = self.rig.client_ports()
            self.most = max(self.most, len(ports))
            self.sharing = max(self.sharing, port_collisions(ports, self.rig.class_bits))

    def __enter__(self) -> _ConnWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def port_collisions(ports: list[int], class_bits: int = CLASS_BITS) -> int:
    """How many of these connections share their HTB class (the port's low `class_bits` bits) with another."""
    counts: dict[int, int] = {}
    mask = (1 << class_bits) - 1
    for p in ports:
        counts[p & mask] = counts.get(p & mask, 0) + 1
    return sum(c for c in counts.values() if c > 1)


class S3Rig:
    """s3rver in its own namespace behind per-connection caps; see the module's docstring."""

    _count = 0

    def __init__(self, *, data_dir: str | None = None, port: int = 4568, class_bits: int = CLASS_BITS,
                 verbose: bool = False) -> None:
        if not 8 <= class_bits <= 12:
            raise ValueError("class_bits: 8 (the port's low byte) to 12")
        self.class_bits = class_bits
        self.owner = os.getpid()
        S3Rig._count += 1
        self.n = S3Rig._count % 16
        self.ns = f"{PREFIX}-{self.owner}-{self.n}"
        self.host_link, self.ns_link = _host_link(self.owner, self.n), f"{PREFIX}n{_tag(self.owner, self.n)}"
        self.port, self.verbose = port, verbose
        self._data_dir_given = data_dir
        self.data_dir: str | None = None
        self.host_ip = self.server_ip = ""
        self.rate: float | None = None
        self.link_rate: float | None = None
        self.server: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None
        self._client = None
        self._started = False

    # --- life ---

    @property
    def endpoint(self) -> str:
        return f"http://{self.server_ip}:{self.port}"

    def start(self, rate_per_conn: float | None, link_rate: float | None = None) -> str:
        """Namespace, link, caps (bytes/s per connection and direction, and of the whole link in each direction;
        None: none) and server: the endpoint."""
        if self._started:
            raise RuntimeError("this rig is running already")
        support = kernel_support()
        missing = [k for k in ("netns", "veth", "htb", "u32") if not support[k]]
        if missing:
            raise RuntimeError(f"this kernel lacks {', '.join(missing)}: the rig cannot cap connections here")
        js = ensure_s3rver()
        cleanup_stale()
        self._started = True
        atexit.register(self.stop)
        try:
            self._make_link()
            self._start_reaper()
            self._shape(rate_per_conn, link_rate, replace=False)
            self._start_server(js)
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _make_link(self) -> None:
        self.host_ip, self.server_ip = _free_subnet(self.ns)
        run(["ip", "netns", "add", self.ns])
        run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link])
        run(["ip", "link", "set", self.ns_link, "netns", self.ns])
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_link])
        run(["ip", "link", "set", self.host_link, "up"])
        run(["ip", "-n", self.ns, "addr", "add", f"{self.server_ip}/30", "dev", self.ns_link])
        run(["ip", "-n", self.ns, "link", "set", self.ns_link, "up"])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])

    def _start_reaper(self) -> None:
        """A shell in a session of its own: once this process is gone (even by SIGKILL), it kills the server and
        deletes the link and the namespace; stop() ends it first when it does that itself."""
        self.data_dir = self._data_dir_given or tempfile.mkdtemp(prefix="s3rig-", dir="/dev/shm")
        self._pidfile = os.path.join(tempfile.gettempdir(), f"{self.ns}.server-pid")
        owned = "" if self._data_dir_given else f"rm -rf '{self.data_dir}'; "
        script = (f"while kill -0 {self.owner} 2>/dev/null; do sleep 0.5; done; "
                  f"[ -f '{self._pidfile}' ] && kill -KILL -- -$(cat '{self._pidfile}') 2>/dev/null; "
                  f"for p in $(ip netns pids {self.ns} 2>/dev/null); do kill -KILL $p; done; "
                  f"ip link del {self.host_link} 2>/dev/null; ip netns del {self.ns} 2>/dev/null; "
                  f"{owned}rm -f '{self._pidfile}'")
        self.reaper = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _shape(self, rate: float | None, link_rate: float | None, *, replace: bool) -> None:
        for dev, side, prefix in ((self.host_link, "src", []), (self.ns_link, "dst", ["-n", self.ns])):
            run(["tc", *prefix, "-batch", "-"], input_text=tc_script(
                dev, rate, client_port_is=side, class_bits=self.class_bits, link_rate=link_rate, replace=replace))
        self.rate, self.link_rate = rate, link_rate

    def set_rate(self, rate_per_conn: float | None, link_rate: float | None = None) -> None:
        """Every class's rate changed in place (bytes/s per connection and for the whole link, each direction;
        None: uncapped); open connections keep their class."""
        self._shape(rate_per_conn, link_rate, replace=True)

    @contextlib.contextmanager
    def uncapped(self) -> Iterator[None]:
        """Set-up traffic (uploading the inputs) at full speed, the caps back afterwards."""
        rate, link = self.rate, self.link_rate
        self.set_rate(None)
        try:
            yield
        finally:
            self.set_rate(rate, link)

    def _start_server(self, js: str) -> None:
        assert self.data_dir is not None
        out = None if self.verbose else subprocess.DEVNULL
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "node", js, "-d", self.data_dir, "-a", self.server_ip, "-p",
             str(self.port), "--silent", "--no-vhost-buckets"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, preexec_fn=_set_pdeathsig)
        with open(self._pidfile, "w") as fh:
            fh.write(str(self.server.pid))
        deadline = time.time() + 30
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"s3rver exited at start ({self.server.returncode})")
            try:
                with socket.create_connection((self.server_ip, self.port), timeout=0.5):
                    return
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"s3rver does not answer on {self.endpoint}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Server, link, namespace, data (if the rig made the directory), reaper: each even if another failed."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(5)
        for pid in run(["ip", "netns", "pids", self.ns], check=False).stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "link", "del", self.host_link], check=False)
        run(["ip", "netns", "del", self.ns], check=False)
        if self.reaper is not None and self.reaper.poll() is None:
            os.killpg(self.reaper.pid, signal.SIGTERM)
            self.reaper.wait(5)
        if self.data_dir and not self._data_dir_given:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(self._pidfile)
        self._client = None

    def __enter__(self) -> S3Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- using it ---

    def env(self, base: dict | None = None) -> dict[str, str]:
        """Environment for a process that talks to the rig (graft's CLI)."""
        env = dict(os.environ if base is None else base)
        env.update(GRAFT_S3_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
        env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY", ""), self.server_ip]))
        return env

    def client(self):
        """A boto3 client configured as graft's (path style, no extra checksums, a pool for every lane)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(max_pool_connections=128, connect_timeout=30, read_timeout=60,
                            retries={"max_attempts": 2, "mode": "standard"},
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required", s3={"addressing_style": "path"})
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, config=config, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_dir(self, local: str, bucket: str, prefix: str) -> int:
        """Every file of `local` (not recursive) under s3://bucket/prefix/; bytes uploaded."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_chunksize=16 * MiB, max_concurrency=16)
        total = 0
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if os.path.isfile(path):
                self.client().upload_file(path, bucket, f"{prefix.strip('/')}/{name}", Config=config)
                total += os.path.getsize(path)
        return total

    def objects(self, bucket: str, prefix: str, suffix: str = ".safetensors") -> list[tuple[str, str, int]]:
        """(bucket, key, size) of the objects under a prefix whose key ends with `suffix`, sorted by key."""
        found = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.strip("/") + "/")
        for page in pages:
            found += [(bucket, o["Key"], o["Size"]) for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return sorted(found)

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        for _bucket, key, _size in self.objects(bucket, prefix, suffix=""):
            self.client().delete_object(Bucket=bucket, Key=key)

    def client_ports(self) -> list[int]:
        """Local ports of this machine's open TCP connections to the server."""
        out = run(["ss", "-Htn", "state", "established", "dst", self.server_ip], check=False).stdout
        ports = []
        for line in out.splitlines():
            cols = line.split()
            local = next((c for c in cols if c.startswith(self.host_ip + ":")), None)
            if local:
                ports.append(int(local.rsplit(":", 1)[1]))
        return ports

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of this process and of the server."""
        usage = os.times()
        server = 0.0
        if self.server is not None:
            with contextlib.suppress(OSError), open(f"/proc/{self.server.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
                server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return usage.user + usage.system, server

    def watch(self) -> _ConnWatch:
        """`with rig.watch() as w:` ... w.most, w.sharing: connections seen, and sharing a class."""
        return _ConnWatch(self)

    def class_bytes(self) -> dict[str, dict[int, int]]:
        """Bytes sent so far through each bucket's class: {'up': {bucket: bytes}, 'down': {...}}."""
        out = {}
        for side, cmd in (("up", ["tc", "-s", "class", "show", "dev", self.host_link]),
                          ("down", ["tc", "-n", self.ns, "-s", "class", "show", "dev", self.ns_link])):
            counts, current = {}, None
            for line in run(cmd).stdout.splitlines():
                words = line.split()
                if words[:2] == ["class", "htb"]:
                    minor = int(words[2].split(":")[1], 16)
                    current = minor - 1 if 1 <= minor <= 1 << self.class_bits else None
                elif words[:1] == ["Sent"] and current is not None:
                    counts[current] = int(words[1])
            out[side] = counts
        return out

    # --- the floors ---

    def read_floor(self, groups: list[list[tuple[str, str, int]]], lanes: int, *, window: int = 16 * MiB,
                   trace: bool = False) -> Floor:
        """Every object of every group read once, all groups at once; each group (an input of graft: its
        objects front to back) by `lanes` ranged GETs of `window` bytes in flight, as graft's lanes
        (GRAFT_REMOTE_LANES per input, GRAFT_REMOTE_WINDOW_BYTES) fetch it. What graft cannot beat."""
        client = self.client()
        t0 = time.perf_counter()
        requests: list[Request] = []
        group_seconds = [0.0] * len(groups)
        lock = threading.Lock()

        def lane(g: int, i: int, todo: Iterator[tuple[str, str, int, int]]) -> None:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                bucket, key, start, length = item
                r = Request(g, i, key, start, length, time.perf_counter() - t0)
                body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"]
                got = 0
                for chunk in body.iter_chunks(MiB):
                    if not got:
                        r.t_first = time.perf_counter() - t0
                    got += len(chunk)
                if got != length:
                    raise RuntimeError(f"{key} [{start}, +{length}): {got} bytes came")
                r.t_end = time.perf_counter() - t0
                with lock:
                    requests.append(r)
                    group_seconds[g] = max(group_seconds[g], r.t_end)

        work: list[Callable[[], None]] = []
        for g, objects in enumerate(groups):
            todo = iter([(b, k, s, min(window, size - s)) for b, k, size in objects for s in range(0, size, window)])
            work += [lambda g=g, i=i, todo=todo: lane(g, i, todo) for i in range(lanes)]
        cpu0 = self.cpu()
        with self.watch() as w:
            _in_threads(work)
        seconds = time.perf_counter() - t0
        cpu = [b - a for a, b in zip(cpu0, self.cpu(), strict=True)]
        total = sum(size for objects in groups for _b, _k, size in objects)
        return Floor(seconds, total, group_seconds, requests if trace else [], w.most, w.sharing, *cpu)

    def upload_floor(self, bucket: str, key: str, size: int, parts_in_flight: int, *, part_bytes: int = 16 * MiB,
                     trace: bool = False, keep: bool = False) -> Floor:
        """One object of `size` bytes uploaded by multipart, `parts_in_flight` parts of `part_bytes` at once (graft's
        GRAFT_S3_PARTS_IN_FLIGHT and GRAFT_S3_PART_BYTES): from the create to the complete's answer."""
        client = self.client()
        payload = os.urandom(part_bytes)
        parts = [(i + 1, i * part_bytes, min(part_bytes, size - i * part_bytes))
                 for i in range(-(-size // part_bytes))]
        t0, cpu0 = time.perf_counter(), self.cpu()
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        etags: dict[int, str] = {}
        requests: list[Request] = []
        lock = threading.Lock()
        todo = iter(parts)

        def lane(i: int) -> None:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                number, start, length = item
                r = Request(0, i, key, start, length, time.perf_counter() - t0)
                body = payload if length == part_bytes else payload[:length]
                etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                          Body=body)["ETag"]
                r.t_end = r.t_first = time.perf_counter() - t0
                with lock:
                    etags[number] = etag
                    requests.append(r)

        try:
            with self.watch() as w:
                _in_threads([lambda i=i: lane(i) for i in range(parts_in_flight)])
                client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={
                    "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]})
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        seconds = time.perf_counter() - t0
        cpu = [b - a for a, b in zip(cpu0, self.cpu(), strict=True)]
        if not keep:
            client.delete_object(Bucket=bucket, Key=key)
        return Floor(seconds, size, [seconds], requests if trace else [], w.most, w.sharing, *cpu)


def _in_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # raised below, once every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def write_trace(path: str, floors: dict[str, Floor]) -> None:
    with open(path, "w") as fh:
        json.dump({name: [r.__dict__ for r in f.requests] for name, f in floors.items()}, fh)


# --- CLI ---

def terminate_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, through every `finally` and the rig's stop()."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


def _floors_cmd(args) -> int:
    size = parse_size(args.size)
    with S3Rig(class_bits=args.class_bits, verbose=args.verbose) as rig:
        endpoint = rig.start(args.rate * MB, args.link_rate * MB or None)
        rig.create_bucket("rig")
        groups = []
        with rig.uncapped():
            for g in range(args.inputs):
                blob = os.urandom(16 * MiB)
                with tempfile.TemporaryDirectory(dir=BENCH) as tmp:
                    with open(os.path.join(tmp, "model.safetensors"), "wb") as fh:
                        for start in range(0, size, len(blob)):
                            fh.write(blob[: min(len(blob), size - start)])
                    rig.upload_dir(tmp, "rig", f"in/{g}")
                groups.append(rig.objects("rig", f"in/{g}"))
        link = f", {args.link_rate:g} MB/s for the whole link" if args.link_rate else ""
        print(f"rig: s3rver {S3RVER_VERSION} at {endpoint} (namespace {rig.ns}), {args.rate:g} MB/s per connection "
              f"and direction{link}; {args.inputs} objects of {size / MB:.0f} MB")
        floors = {}
        for r in range(args.repeat):
            a = rig.read_floor(groups, args.lanes, trace=bool(args.trace))
            b = rig.upload_floor("rig", "floor/upload", args.upload_size and parse_size(args.upload_size) or size,
                                 args.parts, trace=bool(args.trace))
            floors[f"read-{r}"], floors[f"upload-{r}"] = a, b
            for what, f in ((f"(a) read, {args.lanes} lanes per object", a),
                            (f"(b) upload, {args.parts} parts in flight", b)):
                print(f"  round {r + 1}: {what:32} {f.seconds:6.2f} s {f.mb_per_s:6.1f} MB/s   CPU-s: "
                      f"{f.cpu_client:.1f} here, {f.cpu_server:.1f} s3rver   {f.connections} connections, "
                      f"{f.sharing} sharing a class")
        if args.trace:
            write_trace(args.trace, floors)
    return 0


def _check_cmd(args) -> int:
    """One connection, then `conns` at once, each reading 8 s worth of the rate: each must take ~8 s."""
    with S3Rig(class_bits=args.class_bits, verbose=args.verbose) as rig:
        rig.start(args.rate * MB, args.link_rate * MB or None)
        rig.create_bucket("rig")
        size = int(args.rate * MB * 8)
        with rig.uncapped():
            rig.client().put_object(Bucket="rig", Key="blob", Body=os.urandom(size))
        obj = [("rig", "blob", size)]
        for conns in (1, args.conns):
            f = rig.read_floor([obj] * conns, 1, window=size)
            per = [g for g in f.group_seconds]
            print(f"{conns:3} connection(s) reading {size / MB:.0f} MB each: {f.seconds:.2f} s, "
                  f"{f.mb_per_s:.1f} MB/s in all, {size / max(per) / MB:.2f}-{size / min(per) / MB:.2f} MB/s each "
                  f"(cap {args.rate:g}); {f.sharing} of {f.connections} connections sharing a class")
        up = rig.upload_floor("rig", "up", size, 1, part_bytes=size)
        print(f"  1 connection uploading {size / MB:.0f} MB: {up.seconds:.2f} s, {up.mb_per_s:.2f} MB/s")
        used = rig.class_bytes()
        print(f"  classes that carried > 1 MB: {sum(v > MB for v in used['down'].values())} down, "
              f"{sum(v > MB for v in used['up'].values())} up")
    return 0


def _serve_cmd(args) -> int:
    with S3Rig(class_bits=args.class_bits, verbose=args.verbose) as rig:
        endpoint = rig.start(args.rate * MB if args.rate else None, args.link_rate * MB or None)
        buckets = set()
        for local, uri in args.upload or []:
            bucket, _, prefix = uri.removeprefix("s3://").partition("/")
            if bucket not in buckets:
                rig.create_bucket(bucket)
                buckets.add(bucket)
            with rig.uncapped():
                rig.upload_dir(local, bucket, prefix)
        for bucket in args.bucket or []:
            rig.create_bucket(bucket)
        print(f"GRAFT_S3_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
              flush=True)
        print("serving; Ctrl-C (or SIGTERM) stops it and removes everything", flush=True)
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="let s3rver's output through")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fl = sub.add_parser("floors", help="the read and upload floors on synthetic objects")
    fl.add_argument("--rate", type=float, default=5.0, help="MB/s per connection and direction")
    fl.add_argument("--inputs", type=int, default=3, help="objects read at once (graft's inputs)")
    fl.add_argument("--size", default="360MB", help="bytes of each object")
    fl.add_argument("--upload-size", help="bytes of the uploaded object (default --size)")
    fl.add_argument("--lanes", type=int, default=8, help="ranged GETs in flight per object (GRAFT_REMOTE_LANES)")
    fl.add_argument("--parts", type=int, default=8, help="parts in flight (GRAFT_S3_PARTS_IN_FLIGHT)")
    fl.add_argument("--repeat", type=int, default=2)
    fl.add_argument("--trace", help="write every request's start, first byte, end and bytes here (JSON)")
    ch = sub.add_parser("check", help="is every connection capped at the rate, in both directions?")
    ch.add_argument("--rate", type=float, default=5.0)
    ch.add_argument("--conns", type=int, default=8)
    sv = sub.add_parser("serve", help="run a rig until interrupted")
    sv.add_argument("--rate", type=float, default=5.0, help="MB/s per connection (0: uncapped)")
    sv.add_argument("--upload", nargs=2, action="append", metavar=("DIR", "S3_URI"))
    sv.add_argument("--bucket", action="append", help="a bucket to create")
    for p in (fl, ch, sv):
        p.add_argument("--link-rate", type=float, default=0.0,
                       help="MB/s of the whole link in each direction, shared by the connections (0: none)")
        p.add_argument("--class-bits", type=int, default=CLASS_BITS, help="2^bits HTB classes (8: the low byte)")
    sub.add_parser("cleanup", help="remove the rigs whose owner process is gone")
    sub.add_parser("kernel", help="what this kernel has of what the rig needs")
    args = ap.parse_args(argv)
    if args.cmd == "cleanup":
        print("\n".join(cleanup_stale()) or "nothing to clean")
        return 0
    if args.cmd == "kernel":
        print(json.dumps(kernel_support()))
        return 0
    terminate_on_signals()
    try:
        return {"floors": _floors_cmd, "check": _check_cmd, "serve": _serve_cmd}[args.cmd](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
