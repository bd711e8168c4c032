"""`graft run` end to end, as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import torch
from graft_helpers import copy_trio, load_dir, read_json, shard_of
from safetensors.torch import load_file, save_file

GRAFT = os.path.join(os.path.dirname(sys.executable), "graft")
EXTRA = "model.layers.0.self_attn.q_proj.bias"


def _argv(paths: dict[str, str], *extra: str) -> list[str]:
    return [GRAFT, "run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
            "--target-base", paths["target_base"], *extra]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _add_source_only(paths: dict[str, str]) -> None:
    for role, value in (("source_base", 0.0), ("source_finetuned", 0.25)):
        victim = shard_of(paths[role], "model.norm.weight")
        state = load_file(victim)
        state[EXTRA] = torch.full((64,), value, dtype=torch.bfloat16)
        save_file(state, victim, metadata={"format": "pt"})
        index = os.path.join(paths[role], "model.safetensors.index.json")
        if os.path.exists(index):
            data = read_json(index)
            data["weight_map"][EXTRA] = os.path.basename(victim)
            with open(index, "w") as fh:
                json.dump(data, fh)


def test_cli_run_quiet_one_line_summary(trio, tmp_path):
    paths = copy_trio(trio, tmp_path / "in")
    _add_source_only(paths)
    out = tmp_path / "out"
    proc = _run(_argv(paths, "--output", str(out), "--alpha", "0.5", "--shard-size", "100KB"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("grafted 22 tensors (1 copied, 19 transferred, 2 vocab_extended) into "
                               f"file://{out} in ")
    assert lines[0].endswith("warning(s)")
    # not a TTY: no progress bar, only the warning about the source-only tensor
    assert "\r" not in proc.stderr and "grafting" not in proc.stderr and "%|" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"graft: warning [source_only]: {EXTRA} is only in source_base, source_finetuned; not in the output"]
    manifest = read_json(out / "graft-manifest.json")
    assert manifest["source_only"] == [{"tensor": EXTRA, "in": ["source_base", "source_finetuned"]}]
    assert manifest["options"]["alpha"] == 0.5
    assert len(manifest["plan"]["shards"]) >= 2
    assert EXTRA not in load_dir(str(out))


def test_cli_json_summary(trio, tmp_path):
    out = tmp_path / "out"
    proc = _run(_argv(trio, "--output", str(out), "--json", "--vocab", "target", "--dtype", "float32"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["output"] == f"file://{out}"
    assert summary["manifest"] == f"file://{out}/graft-manifest.json"
    assert summary["stats"]["tensors"] == 22
    assert read_json(out / "config.json")["vocab_size"] == 256
    assert all(t.dtype == torch.float32 for t in load_dir(str(out)).values())


def test_cli_error_exit_code_and_nothing_left(trio, tmp_path):
    paths = dict(trio, source_finetuned=str(tmp_path / "missing"))
    proc = _run(_argv(paths, "--output", str(tmp_path / "out")))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("graft: error [input_not_found]: ")
    assert str(tmp_path / "missing") in proc.stderr
    assert os.listdir(tmp_path) == []
    proc = _run(_argv(trio))  # neither --output nor --dry-run
    assert proc.returncode == 2 and "graft: error [invalid_option]" in proc.stderr


def test_cli_dry_run_writes_nothing(trio, tmp_path):
    proc = _run(_argv(trio, "--dry-run", "--json", "--shard-size", "100KB", "--exclude", "mlp"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["actions"] == {"copied": 7, "transferred": 13, "vocab_extended": 2}
    assert len(plan["shards"]) >= 2 and plan["vocab"]["output_rows"] == 264
    assert os.listdir(tmp_path) == []


def test_cli_progress_bar_on_a_tty(trio, tmp_path):
    """On a terminal the bar is drawn on stderr; stdout still carries the one-line summary."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    try:
        proc = subprocess.run(_argv(trio, "--output", str(tmp_path / "out")), stdout=subprocess.PIPE,
                              stderr=slave, stdin=subprocess.DEVNULL, timeout=120, text=True)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    tty_err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "grafting" in tty_err and "tensors" in tty_err
    assert proc.stdout.startswith("grafted 22 tensors") and len(proc.stdout.splitlines()) == 1
