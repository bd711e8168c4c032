"""S3 -> S3 graft time vs. its parts alone, against one moto S3 server (a subprocess, over HTTP).

    job time <= 1.3 x max(read the three inputs alone, compute locally alone, upload the output alone)

shows that reading, computing and uploading overlap instead of running one after another.

    .venv/bin/python bench/bench_s3_overlap.py [--hidden 512 --layers 8 --vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from worker.loopback import free_port, wait_port  # noqa: E402


class _CpuMeter:
    """CPU seconds used by this process and the emulator since the last lap: both share this machine's
    cores, so the parts cannot overlap below their summed CPU over the core count."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.last = self._now()

    def _now(self) -> float:
        usage = os.times()
        with open(f"/proc/{self.server_pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return usage.user + usage.system + server

    def lap(self) -> float:
        now = self._now()
        spent, self.last = now - self.last, now
        return spent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-size", default="24MB")
    ap.add_argument("--reversed-target", action="store_true",
                    help="save the target's tensors in the reverse order of the sources' (a stress case: the "
                         "sources are then read back to front)")
    args = ap.parse_args()

    from worker.engine import GraftOptions, GraftRequest, run_graft
    from worker.engine.s3 import s3_client
    from worker.engine.sinks import open_sink
    from worker.engine.uris import parse_uri
    from worker.sample_models import LlamaShape, make_trio
    from worker.settings import Settings

    tmp = tempfile.mkdtemp(prefix="graft-bench-s3-")
    port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        settings = Settings(s3_endpoint_url=endpoint, cache_dir="", hash_inputs=False)
        client = s3_client(endpoint)
        client.create_bucket(Bucket="bench")
        shape = LlamaShape(vocab=args.vocab, hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 11 // 4,
                           heads=8, kv_heads=4)
        paths = make_trio(os.path.join(tmp, "models"), shape=shape, reverse_target=args.reversed_target)
        uris, input_bytes = {}, 0
        for role, path in paths.items():
            for name in os.listdir(path):
                client.upload_file(os.path.join(path, name), "bench", f"in/{role}/{name}")
                input_bytes += os.path.getsize(os.path.join(path, name))
            uris[role] = f"s3://bench/in/{role}"
        options = GraftOptions(shard_size=args.shard_size)
        print(f"inputs: 3 models, {input_bytes / 1e6:.0f} MB on moto at {endpoint}")

        # 1. reading the three inputs alone (whole objects, 8 at a time)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix="in/")["Contents"]
                if o["Key"].endswith(".safetensors")]
        cpu = _CpuMeter(moto.pid)
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: client.get_object(Bucket="bench", Key=k)["Body"].read(), keys))
        t_read = time.perf_counter() - t
        c_read = cpu.lap()

        # 2. computing alone: local inputs to a local output
        local_out = os.path.join(tmp, "local-out")
        t = time.perf_counter()
        run_graft(GraftRequest(paths["source_base"], paths["source_finetuned"], paths["target_base"], local_out,
                               options), settings=settings)
        t_compute = time.perf_counter() - t
        c_compute = cpu.lap()
        out_files = sorted(os.listdir(local_out))
        out_bytes = sum(os.path.getsize(os.path.join(local_out, n)) for n in out_files)

        # 3. uploading the output alone, through the same sink (multipart, sha256 while streaming)
        t = time.perf_counter()
        sink = open_sink(parse_uri("s3://bench/upload-only"), endpoint_url=endpoint, part_bytes=settings.s3_part_bytes)
        for name in out_files:
            if name == "graft-manifest.json":
                continue
            with open(os.path.join(local_out, name), "rb") as fh:
                writer = sink.open(name, os.path.getsize(os.path.join(local_out, name)))
                while chunk := fh.read(8 << 20):
                    writer.write(chunk)
                writer.close()
        sink.commit(b"{}")
        t_upload = time.perf_counter() - t
        c_upload = cpu.lap()

        # 4. the S3 -> S3 job
        t = time.perf_counter()
        result = run_graft(GraftRequest(uris["source_base"], uris["source_finetuned"], uris["target_base"],
                                        "s3://bench/grafted", options), settings=settings)
        t_job = time.perf_counter() - t
        c_job = cpu.lap()
        bound = max(t_read, t_compute, t_upload)
        print(f"output: {out_bytes / 1e6:.0f} MB in {len(result.files)} files")
        cores = os.cpu_count() or 1
        print(f"read inputs alone   {t_read:7.2f} s   {c_read:6.2f} CPU-s (this process + the S3 server)")
        print(f"compute alone       {t_compute:7.2f} s   {c_compute:6.2f} CPU-s  (local -> local)")
        print(f"upload output alone {t_upload:7.2f} s   {c_upload:6.2f} CPU-s")
        parts_cpu = c_read + c_compute + c_upload
        print(f"sum of the parts    {t_read + t_compute + t_upload:7.2f} s   {parts_cpu:6.2f} CPU-s")
        print(f"S3 -> S3 job        {t_job:7.2f} s   {c_job:6.2f} CPU-s  = {t_job / bound:.2f} x max(parts)  "
              "(target <= 1.3)")
        print(f"  the parts' CPU over this machine's {cores} cores: at least "
              f"{parts_cpu / cores:.2f} s for any overlap of them")
        print(f"  job: {result.stats}")
        return 0
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
