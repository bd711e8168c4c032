"""S3 -> S3 graft time vs. its parts alone, through a bandwidth-capped proxy in front of moto's S3 server.

Real object stores serve each connection at a capped rate (S3: roughly 50-100 MB/s) and charge a round
trip for each new one; worker/devtools/tcp_proxy.py (a subprocess) caps every connection at 25, 50 and 100 MB/s per
direction and adds 20 ms before each new connection is put through. At each cap:

    job          the S3 -> S3 graft (inputs through the lanes, output through parallel part uploads)
    read lanes   reading the three inputs alone, through the same lanes (the engine's S3Store)
    compute      a local -> local graft (no storage at all; the same at every cap)
    upload       uploading the output alone through the same sink (parts in flight)
    read 1-conn  reading the three inputs over one connection each (what the engine did before lanes)

and prints job / max(read lanes, compute, upload) (target <= 1.3: the parts overlap) and, at 25 MB/s,
job / read 1-conn (target <= 0.45). Each figure is the best of --repeat runs, with the range.

    .venv/bin/python bench/bench_s3_overlap.py [--hidden 768 --layers 8 --caps 25,50,100 --repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from worker.devtools.loopback import free_port, wait_port  # noqa: E402

MB = 1_000_000


class Proxy:
    """worker.devtools.tcp_proxy in a process of its own (it must not share this process's GIL with the engine)."""

    def __init__(self, upstream_port: int, latency: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.devtools.tcp_proxy", "--listen", str(self.port), "--upstream",
             f"127.0.0.1:{upstream_port}", "--latency", str(latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        wait_port(self.port)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "listening on ..."

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rate(self, bytes_per_second: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"rate {bytes_per_second} {bytes_per_second}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer.startswith("ok"):
            raise RuntimeError(f"the proxy refused the rate: {answer!r}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


class CpuMeter:
    """CPU seconds of this process, the emulator and the proxy: they share this machine's cores, so parts
    that each keep them busy cannot overlap below their summed CPU over the core count."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.runs: dict[str, list[tuple[float, list[float]]]] = {}  # what -> [(seconds, CPU-s per process)]

    def _now(self) -> list[float]:
        usage = os.times()
        out = [usage.user + usage.system]
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return out

    def timed(self, what: str, fn: Callable[[], object]) -> object:
        before, t = self._now(), time.perf_counter()
        value = fn()
        elapsed, after = time.perf_counter() - t, self._now()
        self.runs.setdefault(what, []).append((elapsed, [b - a for a, b in zip(before, after, strict=True)]))
        return value

    def best(self, what: str) -> float:
        return min(t for t, _ in self.runs[what])

    def line(self, what: str) -> str:
        times = [t for t, _ in self.runs[what]]
        cpu = min(self.runs[what])[1]  # of the best run
        split = " + ".join(f"{c:.1f}" for c in cpu)
        return f"{min(times):6.2f} s ({min(times):.2f}-{max(times):.2f})   {sum(cpu):5.1f} CPU-s ({split})"


def in_threads(fns: list[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:  # reported below, after every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def read_with_lanes(uris: list[str], endpoint: str, reads, chunk: int) -> int:
    """Every weight file of the three inputs, front to back, through the engine's S3Store (one thread per
    input, as the stream reads them), `chunk` bytes per read."""
    from worker.engine.storage.stores import open_store
    from worker.engine.storage.uris import parse_uri

    stores = [open_store(parse_uri(uri), endpoint, reads=reads) for uri in uris]
    total = 0

    def read_all(store) -> None:
        nonlocal total
        plan = [(name, start, min(chunk, size - start)) for name, size in sorted(store.files.items())
                if name.endswith(".safetensors") for start in range(0, size, chunk)]
        store.expect(plan)
        buf = bytearray(chunk)
        for name, start, length in plan:
            store.stream_into(name, start, memoryview(buf)[:length])
            total += length

    try:
        in_threads([lambda s=s: read_all(s) for s in stores])
    finally:
        for s in stores:
            s.close()
    return total


def read_one_connection_each(client, bucket: str, keys_by_input: list[list[str]]) -> None:
    def read_all(keys: list[str]) -> None:
        for key in keys:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            for _ in body.iter_chunks(1 << 20):
                pass

    in_threads([lambda k=k: read_all(k) for k in keys_by_input])


def upload_alone(local_out: str, uri: str, endpoint: str, settings) -> None:
    from worker.engine.storage.sinks import MANIFEST, open_sink
    from worker.engine.storage.uris import parse_uri

    sink = open_sink(parse_uri(uri), endpoint_url=endpoint, part_bytes=settings.s3_part_bytes,
                     parts_in_flight=settings.s3_parts_in_flight)
    for name in sorted(os.listdir(local_out)):
        if name == MANIFEST:
            continue
        path = os.path.join(local_out, name)
        writer = sink.open(name, os.path.getsize(path))
        with open(path, "rb") as fh:
            while chunk := fh.read(8 << 20):
                writer.write(chunk)
        writer.close()
    sink.commit(b"{}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-size", default="100MB", help="the output's shards")
    ap.add_argument("--input-shards", type=int, default=6,
                    help="shards per input model (moto reads the whole object for every ranged GET: shards near "
                         "the window size keep its cost per byte near what S3's is, whatever the lanes do)")
    ap.add_argument("--caps", default="25,50,100", help="MB/s per connection and direction, comma-separated")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each new connection")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is reported")
    ap.add_argument("--lanes", type=int, help="GRAFT_REMOTE_LANES (default: the setting's)")
    ap.add_argument("--parts", type=int, help="GRAFT_S3_PARTS_IN_FLIGHT (default: the setting's)")
    ap.add_argument("--reversed-target", action="store_true",
                    help="save the target's tensors in the reverse order of the sources' (the sources are then "
                         "read back to front)")
    args = ap.parse_args()

    from worker.devtools.sample_models import LlamaShape, make_trio
    from worker.engine import GraftOptions, GraftRequest, run_graft
    from worker.engine.pipeline.resolve import remote_reads
    from worker.engine.storage.s3 import s3_client
    from worker.service.settings import Settings

    overrides = {k: v for k, v in (("remote_lanes", args.lanes), ("s3_parts_in_flight", args.parts)) if v}
    tmp = tempfile.mkdtemp(prefix="graft-bench-s3-")
    port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    proxy = None
    try:
        wait_port(port)
        direct = f"http://127.0.0.1:{port}"
        proxy = Proxy(port, args.latency)
        settings = Settings(s3_endpoint_url=proxy.endpoint, cache_dir="", hash_inputs=False, **overrides)
        local_settings = Settings(cache_dir="", hash_inputs=False, **overrides)
        s3_client(direct).create_bucket(Bucket="bench")
        shape = LlamaShape(vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                           intermediate=args.hidden * 11 // 4, heads=8, kv_heads=4)
        paths = make_trio(os.path.join(tmp, "models"), shape=shape, reverse_target=args.reversed_target,
                          shards=(args.input_shards,) * 3)
        uris, keys, input_bytes = {}, [], 0
        for role, path in paths.items():
            keys.append([])
            for name in sorted(os.listdir(path)):
                s3_client(direct).upload_file(os.path.join(path, name), "bench", f"in/{role}/{name}")
                if name.endswith(".safetensors"):
                    keys[-1].append(f"in/{role}/{name}")
                    input_bytes += os.path.getsize(os.path.join(path, name))
            uris[role] = f"s3://bench/in/{role}"
        options = GraftOptions(shard_size=args.shard_size)
        reads = remote_reads(settings)
        print(f"inputs: 3 models, {input_bytes / MB:.0f} MB of weights on moto behind the proxy "
              f"({args.latency * 1000:.0f} ms per new connection); {reads.lane_count} lanes x "
              f"{reads.window_bytes >> 20} MiB windows per input ({reads.memory_bytes / MB:.0f} MB held each), "
              f"{settings.s3_parts_in_flight} parts of {settings.s3_part_bytes >> 20} MiB in flight")

        meter = CpuMeter([moto.pid, proxy.proc.pid])
        local_out = os.path.join(tmp, "local-out")
        for r in range(args.repeat):
            out = os.path.join(tmp, f"local-{r}")
            meter.timed("compute", lambda out=out: run_graft(GraftRequest.single(
                paths["source_base"], paths["source_finetuned"], paths["target_base"], out, options),
                settings=local_settings))
            if r == 0:
                os.rename(out, local_out)
            else:
                shutil.rmtree(out)
        out_bytes = sum(os.path.getsize(os.path.join(local_out, n)) for n in os.listdir(local_out))
        print(f"output: {out_bytes / MB:.0f} MB. Times: best (range) of {args.repeat}; CPU-s of the best run "
              "(this process + the S3 emulator + the proxy)\n")

        proxied = s3_client(proxy.endpoint)
        rows = []
        for cap in [float(c) for c in args.caps.split(",")]:
            proxy.rate(int(cap * MB))
            best_job = None
            for r in range(args.repeat):
                meter.timed(f"lanes{cap}", lambda: read_with_lanes(list(uris.values()), proxy.endpoint, reads,
                                                                   settings.block_bytes))
                meter.timed(f"upload{cap}", lambda up=f"s3://bench/up-{cap:g}-{r}": upload_alone(local_out, up,
                                                                     proxy.endpoint, settings))
                meter.timed(f"one{cap}", lambda: read_one_connection_each(proxied, "bench", keys))
                result = meter.timed(f"job{cap}", lambda out=f"s3://bench/out-{cap:g}-{r}": run_graft(
                    GraftRequest.single(
                    uris["source_base"], uris["source_finetuned"], uris["target_base"], out, options),
                    settings=settings))
                if best_job is None or meter.runs[f"job{cap}"][-1][0] <= meter.best(f"job{cap}"):
                    best_job = result.stats
            job = meter.best(f"job{cap}")
            bound = max(meter.best(f"lanes{cap}"), meter.best("compute"), meter.best(f"upload{cap}"))
            ratio, vs_one = job / bound, job / meter.best(f"one{cap}")
            rows.append((cap, ratio, vs_one))
            print(f"cap {cap:g} MB/s per connection")
            for label, what, nbytes in (("S3 -> S3 job", f"job{cap}", input_bytes),
                                        ("read alone, lanes", f"lanes{cap}", input_bytes),
                                        ("compute alone", "compute", input_bytes),
                                        ("upload alone", f"upload{cap}", out_bytes),
                                        ("read, 1 conn/input", f"one{cap}", input_bytes)):
                print(f"  {label:20} {meter.line(what)}   {nbytes / meter.best(what) / MB:5.0f} MB/s")
            print(f"  job / max(parts) = {ratio:.2f} (target <= 1.3);  job / read over 1 conn each = {vs_one:.2f}"
                  + ("  (target <= 0.45)" if cap == 25 else ""))
            st, ct = best_job, best_job["compute_thread"]
            print(f"  best job: resolve {st['seconds_resolving']:.2f} s, stream {st['seconds_streaming']:.2f} s, "
                  f"until commit {st['seconds_total']:.2f} s; compute thread {ct['computing_s']:.2f} s computing, "
                  f"{ct['waiting_reads_s']:.2f} s waiting for reads, {ct['waiting_writer_s']:.2f} s for the writer")
        print("\ncap MB/s   job/max(parts)   job/read-1-conn")
        for cap, ratio, vs_one in rows:
            print(f"{cap:8g}   {ratio:14.2f}   {vs_one:15.2f}")
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
