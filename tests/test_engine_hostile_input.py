"""Hostile input: user regexes that would backtrack for hours, malformed files built to crash the parser
(not just to be wrong), and symlinks that lead out of the allowed roots. Each ends in a GraftError with
a stable code (and, from the CLI, one line and exit 2); nothing is written."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from graft_helpers import (
    copy_trio,
    graft,
    read_json,
    read_safetensors,
    settings,
    tensor_names_sorted_by_offset,
    write_safetensors,
)

import worker.progress  # noqa: F401  bound to pytest's stderr at collection (see test_engine_bad_input.py)
from worker.cli import main
from worker.engine import GraftError, GraftOptions, GraftRequest, run_graft
from worker.engine.planning.patterns import MAX_PATTERN_LENGTH, MAX_PATTERNS
from worker.engine.storage.sinks import LocalSink
from worker.engine.storage.stores import Confinement, LocalStore
from worker.engine.storage.uris import parse_uri

INDEX = "model.safetensors.index.json"


@pytest.fixture
def paths(trio, tmp_path):
    return copy_trio(trio, tmp_path / "in")


def assert_nothing_written(parent, name: str = "out") -> None:
    names = os.listdir(parent)
    assert name not in names, names
    assert not [n for n in names if n.startswith(f".{name}.")], names  # no hidden temp directory either


# --- 1. user regexes -------------------------------------------------------------------------------------

def test_pathological_pattern_runs_in_linear_time(paths, tmp_path):
    # Under Python's re this pattern over a 30-character name already takes seconds (2^n paths).
    options = GraftOptions(include=["(.|.)*Z"], exclude=["(a*)*b", "(x+x+)+y"])
    t0 = time.perf_counter()
    for _ in range(20):
        assert not options.selects("a" * 20_000)
    assert time.perf_counter() - t0 < 0.5
    # and through a whole graft: nothing matches the include, so every tensor is copied from the target
    result, _ = graft(paths, tmp_path / "out", include=["(.|.)*Z"])
    assert set(result.manifest["plan"]["actions"]) == {"copied"}


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("pattern,needle", [
    (r"(a)\1", "backreferences"),  # RE2 has none
    ("(?=lm_head)", "lookaround"),
    ("(?<!x)y", "lookaround"),
    ("a{1001}", "1000"),
    ("a{99999999999}", "1000"),  # RE2 would read it as literal text; re raised OverflowError
    ("x{2,99999999999999999999999}", "1000"),
    ("a{,5}", "{0,5}"),  # Python reads {0,5}, RE2 literal text: refused rather than silently different
    ("(", "bad regular expression"),
    ("x" * (MAX_PATTERN_LENGTH + 1), f"limit is {MAX_PATTERN_LENGTH}"),
    ("\ud800", "not valid Unicode"),
])
def test_patterns_re2_cannot_run_are_refused(field, pattern, needle):
    with pytest.raises(GraftError) as info:
        GraftOptions(**{field: [pattern]})
    assert info.value.code == "invalid_option"
    assert info.value.message.startswith(f"{field}: ") and needle in info.value.message, info.value.message
    assert repr(pattern[:20])[1:-1] in info.value.message  # names the pattern


@pytest.mark.parametrize("value,needle", [
    (["x"] * (MAX_PATTERNS + 1), f"limit is {MAX_PATTERNS}"),
    ("norm", "list"),  # a bare string would otherwise be read as one pattern per character
    ([3], "strings"),
    (None, "list"),
])
def test_pattern_lists_are_checked(value, needle):
    with pytest.raises(GraftError) as info:
        GraftOptions(include=value)
    assert info.value.code == "invalid_option" and info.value.message.startswith("include: ")
    assert needle in info.value.message


def test_patterns_keep_search_semantics():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.10.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.1.input_layernorm.weight"]
    patterns = ["norm", r"^lm_head", r"layers\.[01]\.", r"proj\.weight$", r"(?i)EMBED", r"layers\.\d+\.mlp",
                "q_proj|up_proj", "[a-z]+_head", r"\bnorm\b", "x{0,3}norm", "(?P<n>q)_proj", "", "a{2}"]
    for pattern in patterns:
        want = [n for n in names if re.search(pattern, n)]
        got = [n for n in names if not GraftOptions(exclude=[pattern]).selects(n)]
        assert got == want, pattern
        assert [n for n in names if GraftOptions(include=[pattern]).selects(n)] == want, pattern


# --- 2. malformed files ----------------------------------------------------------------------------------

def _first_shard(directory: str) -> str:
    return os.path.join(directory, sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[0])


def _rewrite_header(directory: str, edit) -> None:
    path = _first_shard(directory)
    header, data = read_safetensors(path)
    raw = edit(header, tensor_names_sorted_by_offset(header))
    if isinstance(raw, bytes):
        write_safetensors(path, header, data, raw_header=raw)
    else:
        write_safetensors(path, header, data)


def _deep_header(header, names):
    return json.dumps(header)[:-1].encode() + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _list_dtype(header, names):
    header[names[0]]["dtype"] = ["F32"]


def _bool_shape(header, names):
    entry = header[names[0]]
    entry["shape"] = [True] * len(entry["shape"]) if entry["shape"] else [True]


def _bool_offsets(header, names):
    header[names[0]]["data_offsets"] = [False, header[names[0]]["data_offsets"][1]]


def _duplicate_key(header, names):
    # The same tensor named twice: a reader taking the first entry and one taking the last see different data.
    first = json.dumps({names[0]: header[names[0]]})[1:-1]
    text = json.dumps(header)
    return (text[:-1] + ", " + first + "}").encode()


def _metadata_not_strings(header, names):
    header["__metadata__"] = {"format": {"nested": [1, 2]}}


def _huge_empty_shape(header, names):
    header[names[0]]["shape"] = [2**62, 2**62, 0]
    header[names[0]]["data_offsets"] = [0, 0]


def _write(directory: str, name: str, raw: bytes) -> None:
    with open(os.path.join(directory, name), "wb") as fh:
        fh.write(raw)


def _deep_config(directory):
    _write(directory, "config.json", b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def _deep_index(directory):
    index = read_json(os.path.join(directory, INDEX))
    raw = json.dumps(index)[:-1].encode() + b', "deep": ' + b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000 + b"}"
    _write(directory, INDEX, raw)


def _index_omits_tensor(directory):
    index = read_json(os.path.join(directory, INDEX))
    index["weight_map"].pop(sorted(index["weight_map"])[0])
    _write(directory, INDEX, json.dumps(index).encode())
    return sorted(read_json(os.path.join(directory, INDEX))["weight_map"])


def _index_non_string_shard(directory):
    index = read_json(os.path.join(directory, INDEX))
    index["weight_map"][sorted(index["weight_map"])[0]] = ["model-00001-of-00003.safetensors"]
    _write(directory, INDEX, json.dumps(index).encode())


def _index_duplicate_key(directory):
    index = read_json(os.path.join(directory, INDEX))
    name, shard = sorted(index["weight_map"].items())[0]
    text = json.dumps(index["weight_map"])
    again = f", {json.dumps(name)}: {json.dumps(shard)}"
    _write(directory, INDEX, ('{"weight_map": ' + text[:-1] + again + "}}").encode())


def _empty_target_config(directory):
    _write(directory, "config.json", b"{}")


def _config_model_type_not_string(directory):
    config = read_json(os.path.join(directory, "config.json"))
    config["model_type"] = ["llama"]
    _write(directory, "config.json", json.dumps(config).encode())


def _big_int_in_config(directory):
    _write(directory, "config.json", b'{"model_type": "llama", "vocab_size": ' + b"9" * 5000 + b"}")


HEADER_CASES = {
    "deep_header": (_deep_header, "nested too deeply"),
    "list_dtype": (_list_dtype, "unknown dtype list"),
    "bool_shape": (_bool_shape, "malformed shape"),
    "bool_offsets": (_bool_offsets, "malformed data_offsets"),
    "duplicate_key": (_duplicate_key, "duplicate key"),
    "metadata_not_strings": (_metadata_not_strings, "__metadata__"),
    "huge_empty_shape": (_huge_empty_shape, "too large"),
}
FILE_CASES = {  # (edit, role, code, needle)
    "deep_config": (_deep_config, "source_base", "invalid_input", "nested too deeply"),
    "deep_index": (_deep_index, "source_finetuned", "invalid_input", "nested too deeply"),
    "index_omits_tensor": (_index_omits_tensor, "target_base", "invalid_input", "omits 1 tensor"),
    "index_non_string_shard": (_index_non_string_shard, "target_base", "invalid_input", "not a file name"),
    "index_duplicate_key": (_index_duplicate_key, "source_finetuned", "invalid_input", "duplicate key"),
    "empty_target_config": (_empty_target_config, "target_base", "invalid_input", "model_type"),
    "model_type_not_string": (_config_model_type_not_string, "target_base", "invalid_input", "model_type"),
    "big_int_in_config": (_big_int_in_config, "source_base", "invalid_input", "not valid JSON"),
}


def run_cli(capsys, paths: dict[str, str], output, *extra: str) -> tuple[int, str]:
    code = main(["run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
                 "--target-base", paths["target_base"], "--output", str(output), *extra])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, error_code: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith(f"graft: error [{error_code}]: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("role", ["source_finetuned", "target_base"])
@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_fails_cleanly(capsys, paths, tmp_path, case, role):
    edit, needle = HEADER_CASES[case]
    _rewrite_header(paths[role], edit)
    code, err = run_cli(capsys, paths, tmp_path / "out")
    assert_one_line_error(code, err, "invalid_safetensors", role, needle)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_malformed_config_and_index_fail_cleanly(capsys, paths, tmp_path, case):
    edit, role, error_code, needle = FILE_CASES[case]
    edit(paths[role])
    code, err = run_cli(capsys, paths, tmp_path / "out")
    assert_one_line_error(code, err, error_code, role, needle)
    assert_nothing_written(tmp_path)


def test_index_omitting_a_tensor_names_it(paths, tmp_path):
    index = read_json(os.path.join(paths["target_base"], INDEX))
    dropped = sorted(index["weight_map"])[0]
    _index_omits_tensor(paths["target_base"])
    with pytest.raises(GraftError) as info:
        graft(paths, tmp_path / "out")
    assert info.value.code == "invalid_input" and dropped in info.value.message


def test_only_the_target_needs_a_model_type(paths, tmp_path):
    """The output takes the target's config; a source's config is read for its vocab_size only."""
    _empty_target_config(paths["source_base"])
    result, _ = graft(paths, tmp_path / "out")
    assert read_json(os.path.join(tmp_path / "out", "config.json"))["model_type"] == "llama"
    assert result.stats["tensors"] > 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"alpha": "1"}, "alpha: "),
    ({"alpha": True}, "alpha: "),
    ({"alpha": float("inf")}, "alpha: "),
    ({"alpha": 10**400}, "alpha: "),
    ({"shard_size": 10**30}, "shard_size: "),
    ({"shard_size": "9" * 400}, "shard_size: "),
    ({"shard_size": "9" * 30 + "TB"}, "shard_size: "),
    ({"shard_size": True}, "shard_size: "),
    ({"shard_size": 0}, "shard_size: "),
    ({"shard_size": -1}, "shard_size: "),
    ({"shard_size": 1.5e9}, "shard_size: "),
    ({"shard_size": "6TB"}, "shard_size: "),
    ({"shard_size": "5 XB"}, "shard_size: "),
    ({"vocab": ["extend"]}, "vocab "),
])
def test_bad_option_values(kwargs, needle):
    with pytest.raises(GraftError) as info:
        GraftOptions(**kwargs)
    assert info.value.code == "invalid_option" and info.value.message.startswith(needle), info.value.message


def test_good_option_values():
    assert GraftOptions(alpha=2).alpha == 2.0 and isinstance(GraftOptions(alpha=2).alpha, float)
    assert GraftOptions(shard_size="1.5GiB").shard_size == 3 * 2**29
    assert GraftOptions(shard_size="5TB").shard_size == 5 * 10**12
    assert GraftOptions(shard_size=" 500 mb ").shard_size == 500 * 10**6
    assert GraftOptions(shard_size=4096).shard_size == 4096


def test_cli_bad_options_are_one_line(capsys, paths, tmp_path):
    for extra in (["--shard-size", "9" * 400], ["--shard-size", "0"], ["--alpha", "inf"],
                  ["--include", "a{99999999999}"], ["--exclude", r"(?<=x)y"]):
        code, err = run_cli(capsys, paths, tmp_path / "out", *extra)
        assert_one_line_error(code, err, "invalid_option")
    assert_nothing_written(tmp_path)


def test_cli_unexpected_exception_is_one_line_unless_debugging(capsys, paths, tmp_path, monkeypatch):
    import worker.engine.pipeline.resolve as engine_run

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(engine_run, "plan_graft", broken)
    monkeypatch.delenv("GRAFT_DEBUG", raising=False)
    argv = ["run", "--source-base", paths["source_base"], "--source-finetuned", paths["source_finetuned"],
            "--target-base", paths["target_base"], "--dry-run"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("graft: error [internal_error]: ZeroDivisionError: a bug of ours") and "Traceback" not in err
    monkeypatch.setenv("GRAFT_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "graft: error [internal_error]" in err


# --- 3. symlinks out of the allowed roots ----------------------------------------------------------------

@pytest.fixture
def jail(trio, tmp_path):
    """allowed/ holds the inputs; outside/ is what a link may try to reach."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"secret": "do not copy me"}')
    return copy_trio(trio, allowed / "in"), str(allowed), str(outside)


def _request(paths: dict[str, str], output, roots: list[str] | None) -> GraftRequest:
    return GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], str(output),
                        GraftOptions(), allowed_roots=roots)


def _refused(request: GraftRequest, outside: str) -> GraftError:
    with pytest.raises(GraftError) as info:
        run_graft(request, settings=settings())
    err = info.value
    assert err.code == "uri_not_allowed", err.to_dict()
    assert outside not in err.message and "secret" not in err.message  # where the link points is not said
    return err


def test_symlinked_tokenizer_file_is_refused(jail):
    paths, allowed, outside = jail
    victim = os.path.join(paths["source_finetuned"], "tokenizer_config.json")
    os.remove(victim)
    os.symlink(os.path.join(outside, "secret.json"), victim)
    out = os.path.join(allowed, "out")
    err = _refused(_request(paths, out, [allowed]), outside)
    assert "tokenizer_config.json" in err.message
    assert_nothing_written(allowed)
    # Unconfined (the CLI), the same layout works: the link is followed.
    run_graft(_request(paths, out, None), settings=settings())
    with open(os.path.join(out, "tokenizer_config.json")) as fh:
        assert "do not copy me" in fh.read()


def test_symlinked_shard_is_refused(jail):
    paths, allowed, outside = jail
    shard = os.path.join(paths["source_base"], "model.safetensors")
    moved = shutil.move(shard, os.path.join(outside, "model.safetensors"))
    os.symlink(moved, shard)
    _refused(_request(paths, os.path.join(allowed, "out"), [allowed]), outside)
    assert_nothing_written(allowed)


def test_symlinks_inside_the_roots_work_confined(jail, tmp_path):
    """The Hugging Face cache's layout: snapshot files are links to blobs elsewhere under the same root."""
    paths, allowed, outside = jail
    blobs = os.path.join(allowed, "blobs")
    os.mkdir(blobs)
    for role in ("source_base", "target_base"):
        for name in os.listdir(paths[role]):
            target = shutil.move(os.path.join(paths[role], name), os.path.join(blobs, f"{role}-{name}"))
            os.symlink(os.path.relpath(target, paths[role]), os.path.join(paths[role], name))
    out = os.path.join(allowed, "out")
    result = run_graft(_request(paths, out, [allowed]), settings=settings())
    assert os.path.exists(os.path.join(out, "graft-manifest.json")) and result.stats["tensors"] > 0


def test_file_swapped_for_a_symlink_after_listing_is_refused_on_open(jail):
    """The check is on the opened descriptor: a link planted between listing and opening is caught."""
    paths, allowed, outside = jail
    directory = paths["source_base"]
    store = LocalStore(parse_uri(directory), Confinement([allowed]))
    try:
        assert store.exists("config.json")  # listed while it was a plain file
        os.remove(os.path.join(directory, "config.json"))
        os.symlink(os.path.join(outside, "secret.json"), os.path.join(directory, "config.json"))
        with pytest.raises(GraftError) as info:
            store.read_range("config.json", 0, 4)
        assert info.value.code == "uri_not_allowed" and outside not in info.value.message
    finally:
        store.close()


def test_output_directory_through_a_symlink_is_refused(jail):
    paths, allowed, outside = jail
    os.symlink(outside, os.path.join(allowed, "escape"))
    _refused(_request(paths, os.path.join(allowed, "escape", "deeper", "out"), [allowed]), outside)
    assert os.listdir(outside) == ["secret.json"]  # not even the parent directories were made out there


def test_output_files_never_follow_a_planted_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    sink = LocalSink(parse_uri(str(tmp_path / "out")), Confinement([str(tmp_path)]))
    try:
        os.symlink(outside, os.path.join(sink.tmp, "config.json"))
        with pytest.raises(GraftError):
            sink.put("config.json", b"{}")
    finally:
        sink.abort()
    assert outside.read_text() == "keep"
    assert_nothing_written(tmp_path)


def test_denied_roots_carve_out_inside_allowed(tmp_path):
    shared, mine = tmp_path / "outputs", tmp_path / "outputs" / "tenant-a"
    confinement = Confinement([str(tmp_path), str(mine)], [str(shared)])
    assert confinement.admits(str(tmp_path / "models" / "x"))
    assert confinement.admits(str(mine / "job" / "model.safetensors"))
    assert not confinement.admits(str(shared / "tenant-b" / "model.safetensors"))
    assert not confinement.admits(str(tmp_path) + "-sibling/x")  # a prefix of the name is not a parent
    assert Confinement.of(None) is None


def test_a_failed_attempt_that_was_superseded_leaves_the_output_alone(tmp_path):
    """The fence is asked again before a failed attempt cleans up: when a newer attempt owns the output, the
    failure becomes GraftSuperseded and nothing is deleted (abandon, not abort)."""
    from worker.devtools.sample_models import make_trio
    from worker.engine import GraftRequest, run_graft
    from worker.engine.errors import GraftSuperseded
    from worker.service.settings import Settings

    paths = make_trio(str(tmp_path / "trio"))
    taken_over = []

    def should_cancel() -> bool:
        if taken_over:  # by the time the stream failed, a newer attempt had taken the output over
            raise GraftSuperseded("attempt 2 took over from attempt 1")
        return False

    def progress(p) -> None:
        if p.phase == "streaming" and p.bytes_written:
            taken_over.append(True)
            raise OSError("the disk went away")

    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"],
                           str(tmp_path / "out"))
    with pytest.raises(GraftSuperseded) as err:
        run_graft(request, settings=Settings(cache_dir="", block_bytes=4096), progress=progress,
                  should_cancel=should_cancel)
    assert isinstance(err.value.__cause__, OSError)
