"""Bad input fails fast with a clear message and exit status 2, and leaves nothing that looks like a result
(no output directory, no hidden temporary directory next to it)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from graft_helpers import (
    copy_trio,
    data_region,
    graft,
    read_json,
    read_safetensors,
    set_element,
    shard_of,
    tensor_names_sorted_by_offset,
    write_safetensors,
)
from safetensors.torch import load_file, save_file

import worker.progress  # noqa: F401  see below
from worker.cli import main

# worker/progress.py binds `stream=sys.stderr` as a default argument, i.e. to whatever sys.stderr was when
# the module was first imported. Imported here, at collection, that is pytest's session-wide stream (kept
# open); imported first inside a capsys test it would be that test's stream, closed afterwards, and every
# later TerminalProgress() in the process would write to a closed file. Reported to the lead.

Q0 = "model.layers.0.self_attn.q_proj.weight"


def run_cli(capsys, paths: dict[str, str], output, *extra: str) -> tuple[int, str, str]:
    argv = ["run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
            "--target-base", paths["target_base"], "--output", str(output), *extra]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_failed(code: int, err: str, error_code: str, *needles: str) -> None:
    assert code == 2, err
    assert f"graft: error [{error_code}]" in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_no_result(parent, output_name: str = "out") -> None:
    names = os.listdir(parent)
    assert output_name not in names
    assert not [n for n in names if n.startswith(".")], names  # no hidden temporary directory


@pytest.fixture
def paths(trio, tmp_path):
    return copy_trio(trio, tmp_path / "in")


def test_missing_directory(capsys, paths, tmp_path):
    paths["source_base"] = str(tmp_path / "nowhere")
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "input_not_found", "nowhere")
    assert_no_result(tmp_path)


def test_missing_config(capsys, paths, tmp_path):
    os.remove(os.path.join(paths["target_base"], "config.json"))
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "input_not_found", "config.json", "target_base")
    assert_no_result(tmp_path)


def test_missing_shard_named_by_index(capsys, paths, tmp_path):
    index = read_json(os.path.join(paths["source_finetuned"], "model.safetensors.index.json"))
    missing = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(paths["source_finetuned"], missing))
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "input_not_found", missing, "source_finetuned")
    assert_no_result(tmp_path)


def test_no_weights_at_all(capsys, paths, tmp_path):
    os.remove(os.path.join(paths["source_base"], "model.safetensors"))
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "input_not_found", "model.safetensors")
    assert_no_result(tmp_path)


def _corrupt(path: str, how: str) -> str:
    """Damage one safetensors file; returns a string the error message must contain."""
    header, data = read_safetensors(path)
    names = tensor_names_sorted_by_offset(header)
    if how == "truncated_header":
        with open(path, "rb") as fh:
            blob = fh.read()
        (n,) = struct.unpack("<Q", blob[:8])
        with open(path, "wb") as fh:
            fh.write(blob[:8 + n // 2])
        return "truncated"
    if how == "short_file":
        with open(path, "wb") as fh:
            fh.write(b"\x01\x02\x03")
        return "shorter than"
    if how == "oversized_header":
        with open(path, "r+b") as fh:
            fh.write(struct.pack("<Q", 1 << 40))
        return "cap"
    if how == "malformed_json":
        raw = json.dumps(header).encode()
        write_safetensors(path, header, data, raw_header=b"{\"a\": [1, 2," + b" " * (len(raw) - 11))
        return "not valid JSON"
    if how == "overlapping_offsets":
        first, second = header[names[0]], header[names[1]]
        size = second["data_offsets"][1] - second["data_offsets"][0]
        begin = first["data_offsets"][0]
        second["data_offsets"] = [begin, begin + size]
        write_safetensors(path, header, data)
        return names[1] if size >= first["data_offsets"][1] - begin else names[0]
    if how == "out_of_range_offsets":
        last = header[names[-1]]
        shift = len(data)
        last["data_offsets"] = [o + shift for o in last["data_offsets"]]
        write_safetensors(path, header, data)
        return names[-1]
    if how == "unknown_dtype":
        header[names[0]]["dtype"] = "F12"
        write_safetensors(path, header, data)
        return "F12"
    if how == "shape_does_not_match_bytes":
        entry = header[names[0]]
        entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
        write_safetensors(path, header, data)
        return names[0]
    if how == "trailing_bytes":
        write_safetensors(path, header, data + b"\0" * 64)
        return "past the last tensor"
    raise AssertionError(how)


CORRUPTIONS = ["truncated_header", "short_file", "oversized_header", "malformed_json", "overlapping_offsets",
               "out_of_range_offsets", "unknown_dtype", "shape_does_not_match_bytes", "trailing_bytes"]


@pytest.mark.parametrize("role", ["source_finetuned", "target_base"])
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_safetensors(capsys, paths, tmp_path, how, role):
    directory = paths[role]
    victim = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[0]
    needle = _corrupt(os.path.join(directory, victim), how)
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "invalid_safetensors", victim, role, needle)
    assert_no_result(tmp_path)


def test_oversized_header_cap_is_configurable(paths, tmp_path):
    """A header longer than GRAFT_MAX_HEADER_BYTES is refused before it is read."""
    from graft_helpers import graft

    from worker.engine import GraftError

    start, _ = data_region(os.path.join(paths["source_base"], "model.safetensors"))
    with pytest.raises(GraftError) as info:
        graft(paths, tmp_path / "out", settings_overrides={"max_header_bytes": start - 16})
    assert info.value.code == "invalid_safetensors" and "cap" in info.value.message
    assert_no_result(tmp_path)


def test_sources_disagree_in_shape(capsys, paths, tmp_path):
    victim = shard_of(paths["source_finetuned"], Q0)
    state = load_file(victim)
    state[Q0] = torch.zeros(32, 64, dtype=torch.bfloat16)
    save_file(state, victim, metadata={"format": "pt"})
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "shape_conflict", Q0, "[32, 64]", "[64, 64]")
    assert_no_result(tmp_path)


def test_nan_in_output_names_the_tensor(capsys, paths, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    set_element(paths["source_finetuned"], name, (3, 7), float("inf"))
    code, out, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "nonfinite_output", name)
    assert out == ""
    assert_no_result(tmp_path)


def test_output_exists_and_is_not_empty(capsys, paths, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, paths, out)
    assert_failed(code, err, "output_exists", str(out))
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_output_is_an_empty_directory_is_fine(capsys, paths, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(capsys, paths, out)
    assert code == 0, err
    assert "graft-manifest.json" in os.listdir(out)


@pytest.mark.parametrize("args,error", [
    (["--alpha", "nan"], "invalid_option"),
    (["--shard-size", "lots"], "invalid_option"),
    (["--shard-size", "10"], "invalid_option"),
    (["--include", "("], "invalid_option"),
])
def test_bad_options(capsys, paths, tmp_path, args, error):
    code, _, err = run_cli(capsys, paths, tmp_path / "out", *args)
    assert_failed(code, err, error)
    assert_no_result(tmp_path)


def test_bad_uri(capsys, paths, tmp_path):
    paths["target_base"] = "ftp://example.com/model"
    code, _, err = run_cli(capsys, paths, tmp_path / "out")
    assert_failed(code, err, "invalid_uri", "ftp")
    assert_no_result(tmp_path)


def test_a_killed_local_graft_leaves_nothing_behind_after_the_next_run(trio, tmp_path):
    """A graft killed mid-write leaves its hidden temp directory; the next graft to that output removes it
    (its writer is dead) and never touches a live writer's directory."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / ".out.graft-tmp-deadbeef0000"
    orphan.mkdir()
    (orphan / ".graft-owner").write_text(f"{socket.gethostname()} {dead.pid}\n")
    (orphan / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / ".out.graft-tmp-live00000000"
    live.mkdir()
    (live / ".graft-owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    graft(trio, tmp_path / "out")
    assert not orphan.exists()
    assert live.exists()
    assert not (tmp_path / "out" / ".graft-owner").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [live.name]


def test_an_overlong_uri_in_the_three_fields_is_named(capsys, tmp_path):
    """The three-field form becomes a recipe at the CLI: a URI past the recipe's cap is an invalid option
    naming the field, not an internal error."""
    from worker.cli import main

    long = str(tmp_path / ("a" * 3000))
    assert main(["run", "--source-base", long, "--source-finetuned", str(tmp_path), "--target-base",
                 str(tmp_path), "--dry-run"]) == 2
    assert "graft: error [invalid_option]: source_base: String should have at most 2048 characters" in \
        capsys.readouterr().err
