"""The `graft` command's end (worker.cli.entry): a one-shot command leaves without the interpreter's teardown,
and still exits with its own code having printed all it had to; the service's commands end normally."""

from __future__ import annotations

import json
import subprocess
import sys

from worker import exit_codes
from worker.devtools.sample_models import make_trio

# The command as its console script runs it, with an atexit hook that tells whether the teardown ran.
ENTRY = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('TEARDOWN\\n')); "
         "sys.argv = ['graft', *sys.argv[1:]]; from worker.cli import entry; entry()")


def graft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=300)


def test_a_graft_run_ends_at_once_with_its_code_and_its_report(tmp_path):
    paths = make_trio(str(tmp_path / "models"))
    out = tmp_path / "out"
    proc = graft("run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
                 "--target-base", paths["target_base"], "--output", str(out), "--json")
    assert proc.returncode == exit_codes.OK, proc.stderr
    assert "TEARDOWN" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # the whole line: stdout was flushed
    manifest = json.loads((out / "graft-manifest.json").read_text())
    assert report["stats"]["bytes_written"] == manifest["stats"]["bytes_written"] > 0
    for record in manifest["output"]["files"]:
        assert (out / record["path"]).stat().st_size == record["size"]


def test_a_failed_run_keeps_its_exit_code_and_message(tmp_path):
    paths = make_trio(str(tmp_path / "models"))
    proc = graft("run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
                 "--target-base", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert proc.returncode == exit_codes.FAILED
    assert "graft: error [" in proc.stderr and "TEARDOWN" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_other_commands_end_through_the_teardown():
    proc = graft("jobs", "list", "--server", "http://127.0.0.1:1")  # a client command; nothing listens there
    assert proc.returncode == exit_codes.FAILED
    assert proc.stderr.rstrip().endswith("TEARDOWN")
