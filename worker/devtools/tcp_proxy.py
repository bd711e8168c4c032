"""A TCP proxy on 127.0.0.1 whose faults a test switches at run time, put in front of a storage emulator.

Modes: `passthrough` forwards bytes; `refuse` closes the listening socket (new connections get ECONNREFUSED)
and resets every open connection; `reset` accepts new connections and resets them at once, and resets every
open one; `stall` accepts but forwards nothing (new and open connections alike), so clients run into their
read timeouts; `stall_open` freezes only the connections open now and lets new ones through (one stalled
request among healthy ones). Independently of the mode: a byte-rate cap per connection in each direction, and a latency
added before each new connection is put through.

In-process (tests):

    with FaultProxy(("127.0.0.1", 9000)) as proxy:
        client = make_client(proxy.endpoint)
        proxy.refuse(); ...; proxy.passthrough()

Standalone: `python -m worker.devtools.tcp_proxy --listen PORT --upstream HOST:PORT`; it reads commands from stdin,
one a line: `pass`, `refuse`, `reset`, `stall`, `stall-open`, `rate UP DOWN` (bytes/s, 0 = unlimited),
`latency SECONDS`.

Only loopback addresses: it listens on 127.0.0.1 and refuses an upstream that resolves elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

PASS, REFUSE, RESET, STALL = "pass", "refuse", "reset", "stall"
LISTEN_HOST = "127.0.0.1"
CHUNK = 256 << 10  # bytes forwarded per read at most: larger reads cost the proxy less CPU per byte
BURST_SECONDS = 0.05  # a capped direction may run this far ahead of its rate, never more


def _loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: what a crashed or rebooted server looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Limiter:
    """One direction of one connection: at most `rate` bytes per second. A connection that was idle saves
    no credit beyond BURST_SECONDS of its rate: a pooled connection reused after a pause is as slow as a
    busy one (a link's rate does not grow while it is unused)."""

    def __init__(self, proxy: FaultProxy, direction: str) -> None:
        self.proxy, self.direction = proxy, direction
        self.free_at = 0.0  # when the bytes sent so far would have left at `rate`
        self.rate = 0

    def chunk(self) -> int:
        rate = self.proxy.rates[self.direction]
        if rate != self.rate:  # a new cap counts from now
            self.rate, self.free_at = rate, 0.0
        return max(1024, min(CHUNK, int(rate * BURST_SECONDS))) if rate else CHUNK

    async def account(self, n: int) -> None:
        if self.rate:
            now = time.monotonic()
            self.free_at = max(self.free_at, now - BURST_SECONDS) + n / self.rate
            if self.free_at > now:
                await asyncio.sleep(self.free_at - now)


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task] = []
        self.open = asyncio.Event()  # cleared: this connection alone forwards nothing
        self.open.set()

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """The proxy runs an asyncio loop on a thread of its own; every control method returns once the change
    is in effect (the listener closed, the connections reset)."""

    def __init__(self, upstream: tuple[str, int], listen_port: int = 0) -> None:
        host, port = upstream
        if not _loopback(host):
            raise ValueError(f"upstream {host} is not a loopback address")
        self.upstream = (host, int(port))
        self.port = listen_port
        self.mode = PASS
        self.rates = {"up": 0, "down": 0}  # bytes/s, client -> upstream and back; 0 = unlimited
        self.latency = 0.0
        self.accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Connection] = set()
        self._flowing: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._flowing = asyncio.Event()
            self._flowing.set()
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._thread is not None and self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{LISTEN_HOST}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- what a test switches --------------------------------------------------------------------------

    def passthrough(self) -> None:
        self._call(self._set_mode(PASS))

    def refuse(self) -> None:
        self._call(self._set_mode(REFUSE))

    def reset(self) -> None:
        self._call(self._set_mode(RESET))

    def stall(self) -> None:
        self._call(self._set_mode(STALL))

    def stall_open(self) -> int:
        """Freeze the connections open now (until passthrough); returns how many."""
        return self._call(self._freeze())

    def set_rate(self, up: int = 0, down: int = 0) -> None:
        """Bytes per second per connection, each direction; 0 lifts the cap."""
        self.rates = {"up": max(0, int(up)), "down": max(0, int(down))}

    def set_latency(self, seconds: float) -> None:
        self.latency = max(0.0, float(seconds))

    # --- inside the loop -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, LISTEN_HOST, self.port, reuse_address=True,
                                                      limit=CHUNK)
            self.port = self._server.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening socket closes now; connections are ours to end
            self._server = None

    async def _freeze(self) -> int:
        for conn in self._conns:
            conn.open.clear()
        return len(self._conns)

    async def _set_mode(self, mode: str) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == PASS:
            for conn in self._conns:
                conn.open.set()
        if mode == STALL:
            self._flowing.clear()
            return
        if mode in (REFUSE, RESET):
            if mode == REFUSE:
                self._close_listener()
            for conn in list(self._conns):
                conn.abort()
            self._conns.clear()
        if mode in (PASS, RESET):
            await self._listen()
        self._flowing.set()

    async def _shutdown(self) -> None:
        self._close_listener()
        conns, self._conns = list(self._conns), set()
        for conn in conns:
            conn.abort()
        tasks = [t for c in conns for t in c.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(writer)
        if self.mode in (RESET, REFUSE):
            _abort(writer)
            return
        self._conns.add(conn)
        conn.tasks.append(asyncio.current_task())
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            await self._flowing.wait()  # a stalled proxy holds new connections here
            if conn not in self._conns:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            conn.upstream = up_writer
            down = asyncio.ensure_future(self._pump(up_reader, writer, _Limiter(self, "down"), conn))
            conn.tasks.append(down)
            await self._pump(reader, up_writer, _Limiter(self, "up"), conn)
            await down
        except (OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn in self._conns:
                self._conns.discard(conn)
                for w in (writer, conn.upstream):
                    if w is not None:
                        w.close()
            for task in conn.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: _Limiter,
                    conn: _Connection) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                await conn.open.wait()
                data = await reader.read(limit.chunk())
                if not data:
                    break
                await self._flowing.wait()  # what was read when a stall began waits with the rest
                await conn.open.wait()
                writer.write(data)
                await writer.drain()
                await limit.account(len(data))
        except (OSError, asyncio.IncompleteReadError):
            return
        if writer.can_write_eof():
            try:
                writer.write_eof()  # half-close: the other direction may still carry the answer
            except OSError:
                pass


def _commands(proxy: FaultProxy, stop: threading.Event) -> None:
    actions = {PASS: proxy.passthrough, REFUSE: proxy.refuse, RESET: proxy.reset, STALL: proxy.stall,
               "stall-open": proxy.stall_open}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] in actions:
                actions[words[0]]()
            elif words[0] == "rate":
                proxy.set_rate(int(words[1]), int(words[2]))
            elif words[0] == "latency":
                proxy.set_latency(float(words[1]))
            else:
                raise ValueError(f"unknown command {words[0]!r}")
            print(f"ok {line.strip()}", flush=True)
        except (ValueError, IndexError) as exc:
            print(f"error {exc}", flush=True)
    stop.wait()  # stdin closed: keep serving until a signal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.tcp_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT, a loopback address")
    parser.add_argument("--rate-up", type=int, default=0, help="bytes/s per connection towards the upstream")
    parser.add_argument("--rate-down", type=int, default=0, help="bytes/s per connection back to the client")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added before each new connection")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--upstream must be HOST:PORT")
    try:
        proxy = FaultProxy((host.strip("[]"), int(port)), args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    proxy.set_rate(args.rate_up, args.rate_down)
    proxy.set_latency(args.latency)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with proxy.start():
        print(f"listening on {proxy.endpoint} -> {host}:{port}", flush=True)
        reader = threading.Thread(target=_commands, args=(proxy, stop), daemon=True)
        reader.start()
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
