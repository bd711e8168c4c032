"""Diff artifacts end to end: extracted once from a source pair, applied to a target as a recipe's diff. `exact`
writes byte for byte what the three-model graft writes (local and S3, both vocabulary policies, tied and
untied); a lossy encoding's graft is the target plus its decoded delta, checked against a float64 reference of
the encoding written here; a damaged or incomplete artifact is refused before anything is written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from graft_helpers import load_dir, settings

from worker.devtools.sample_models import make_trio
from worker.engine import GraftOptions, GraftRequest, run_graft
from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
from worker.engine.errors import GraftError
from worker.engine.pipeline.diff_extract import extract_diff
from worker.engine.planning.recipe import Recipe

SIDE = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "special_tokens_map.json", "chat_template.jinja")


def extract(trio: dict, out, encoding="exact", **overrides):
    spec = DiffExtract(source_base=trio["source_base"], source_finetuned=trio["source_finetuned"], encoding=encoding)
    return extract_diff(DiffExtractRequest(spec, str(out)), settings(**overrides))


def apply(diff: str, target: str, out, *, alpha: float = 1.0, **options):
    recipe = Recipe.single("", "", target, GraftOptions(alpha=alpha, **options), diff=diff)
    warnings: list[dict] = []
    result = run_graft(GraftRequest(recipe, str(out)), settings=settings(), warn=warnings.append)
    return result, warnings


def three_model(trio: dict, out, *, alpha: float = 1.0, **options):
    request = GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"], str(out),
                                  GraftOptions(alpha=alpha, **options))
    warnings: list[dict] = []
    return run_graft(request, settings=settings(), warn=warnings.append), warnings


def same_files(a: str, b: str) -> list[str]:
    """The checkpoint's files (shards, index, side files) that differ between two outputs."""
    names = sorted(n for n in os.listdir(a) if n.endswith(".safetensors") or n.endswith(".index.json")
                   or n in SIDE)
    assert names == sorted(n for n in os.listdir(b) if n in names or n.endswith(".safetensors"))
    differ = []
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                differ.append(name)
    return differ


@pytest.fixture(scope="module")
def tied_trio(tmp_path_factory):
    return make_trio(str(tmp_path_factory.mktemp("tied")), tied=(True, True, True), shards=(2, 1, 2))


@pytest.mark.parametrize("vocab", ["extend", "target"])
@pytest.mark.parametrize("tying", ["untied", "tied"])
def test_exact_artifact_writes_the_three_model_bytes(trio, tied_trio, tmp_path, vocab, tying, one_torch_thread):
    models = trio if tying == "untied" else tied_trio
    artifact = extract(models, tmp_path / "diff")
    assert os.path.exists(tmp_path / "diff" / "diff-manifest.json")
    applied, warned = apply(str(tmp_path / "diff"), models["target_base"], tmp_path / "applied", alpha=0.75,
                            vocab=vocab)
    reference, ref_warned = three_model(models, tmp_path / "ref", alpha=0.75, vocab=vocab)
    assert same_files(str(tmp_path / "applied"), str(tmp_path / "ref")) == []
    assert applied.manifest["plan"] == reference.manifest["plan"]
    assert {(w["code"], w.get("tensor")) for w in warned} >= {(w["code"], w.get("tensor")) for w in ref_warned
                                                               if w["code"] != "weak_connectivity"}
    totals = artifact.manifest["totals"]
    # Lossless, and no larger than the fine-tune's own weights (bf16 deltas in float32, shuffled and compressed).
    assert totals["rel_frobenius"] == 0.0 and totals["max_abs"] == 0.0
    assert totals["encoded_bytes"] <= totals["finetuned_bytes"]


def test_exact_artifact_on_s3_writes_the_three_model_bytes(trio, tmp_path, s3_bucket, s3_endpoint, one_torch_thread,
                                                          monkeypatch):
    from conftest import upload_dir

    monkeypatch.setenv("GRAFT_S3_ENDPOINT_URL", s3_endpoint)
    remote = {role: upload_dir(s3_endpoint, path, s3_bucket, role) for role, path in trio.items()}
    spec = DiffExtract(source_base=remote["source_base"], source_finetuned=remote["source_finetuned"])
    extract_diff(DiffExtractRequest(spec, f"s3://{s3_bucket}/diff"), settings())
    recipe = Recipe.single("", "", remote["target_base"], GraftOptions(alpha=1.0), diff=f"s3://{s3_bucket}/diff")
    run_graft(GraftRequest(recipe, str(tmp_path / "applied")), settings=settings())
    three_model(trio, tmp_path / "ref")
    assert same_files(str(tmp_path / "applied"), str(tmp_path / "ref")) == []


def _delta(trio: dict, name: str) -> np.ndarray:
    base, ft = load_dir(trio["source_base"]), load_dir(trio["source_finetuned"])
    rows = base[name].shape[0]
    return (ft[name][:rows].double() - base[name].double()).numpy()


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).float().to(torch.bfloat16).double().numpy()


def _int8(x: np.ndarray) -> np.ndarray:
    m = x.reshape(x.shape[0], -1)
    scale = np.abs(m).max(axis=1, keepdims=True) / 127.0
    scale32 = scale.astype(np.float32).astype(np.float64)
    q = np.clip(np.round(np.divide(m, scale32, out=np.zeros_like(m), where=scale32 > 0)), -127, 127)
    return (q * scale32).reshape(x.shape)


def _sparse(x: np.ndarray, density: float) -> np.ndarray:
    flat = x.reshape(-1)
    k = int(np.ceil(density * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    scale = np.abs(flat[keep]).mean() if k else 0.0
    out[keep] = np.sign(flat[keep]) * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("encoding,reference,tolerance", [
    ("bf16", _bf16, 0.0), ("int8", _int8, 1e-6), ({"encoding": "sparse", "density": 0.25},
                                                 lambda x: _sparse(x, 0.25), 1e-5)])
def test_lossy_artifact_grafts_the_target_plus_its_decoded_delta(trio, tmp_path, encoding, reference, tolerance,
                                                                  one_torch_thread):
    extract(trio, tmp_path / "diff", encoding)
    apply(str(tmp_path / "diff"), trio["target_base"], tmp_path / "out", vocab="target")
    out, target = load_dir(str(tmp_path / "out")), load_dir(trio["target_base"])
    name = "model.layers.0.mlp.down_proj.weight"
    expected = target[name].double().numpy() + reference(_delta(trio, name))
    got = out[name].double().numpy()
    ulp = np.abs(expected) * 2.0 ** -7 + 1e-30  # one rounding to bf16, plus the decoded delta's own float32
    assert np.all(np.abs(got - expected) <= ulp + tolerance * np.abs(expected).max())


def test_a_damaged_or_incomplete_artifact_is_refused_before_anything_is_written(trio, tmp_path, one_torch_thread):
    extract(trio, tmp_path / "diff")
    shard = next(n for n in os.listdir(tmp_path / "diff") if n.startswith("diff-") and n.endswith(".safetensors"))
    with open(tmp_path / "diff" / shard, "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(GraftError) as err:
        apply(str(tmp_path / "diff"), trio["target_base"], tmp_path / "out")
    assert err.value.code == "invalid_diff" and "sha256" in err.value.message
    assert not os.path.exists(tmp_path / "out")
    os.remove(tmp_path / "diff" / "diff-manifest.json")
    with pytest.raises(GraftError) as err:
        apply(str(tmp_path / "diff"), trio["target_base"], tmp_path / "out")
    assert err.value.code == "invalid_diff" and "diff-manifest.json" in err.value.message
    assert not os.path.exists(tmp_path / "out")


def test_an_artifact_manifest_records_provenance_and_errors(trio, tmp_path, one_torch_thread):
    result = extract(trio, tmp_path / "diff", {"encoding": "sparse", "density": 0.1})
    with open(tmp_path / "diff" / "diff-manifest.json") as fh:
        manifest = json.load(fh)
    assert manifest == result.manifest
    assert manifest["sources"]["source_base"]["uri"].endswith("source_base")
    assert all("sha256" in f for f in manifest["sources"]["source_finetuned"]["files"].values())
    name = "model.layers.0.mlp.down_proj.weight"
    entry = manifest["tensors"][name]
    d = _delta(trio, name)
    expected = np.linalg.norm(d - _sparse(d, 0.1)) / np.linalg.norm(d)
    assert entry["rel_frobenius"] == pytest.approx(expected, rel=1e-4)
    assert entry["norms"]["delta_sq"] == pytest.approx(float((d * d).sum()), rel=1e-6)
    assert manifest["content_address"].startswith("sha256:")
    # The same pair, the same encoding: the same content address.
    again = extract(trio, tmp_path / "again", {"encoding": "sparse", "density": 0.1})
    assert again.manifest["content_address"] == manifest["content_address"]


def test_an_encoding_parameter_out_of_range_is_refused():
    from pydantic import ValidationError

    for bad in ({"encoding": "sparse", "density": 0}, {"encoding": "sparse", "density": 1.5},
                {"encoding": "lowrank", "rank": 0}, {"encoding": "bf16", "density": 0.1}, {"encoding": "zip"}):
        with pytest.raises(ValidationError):
            DiffExtract(source_base="/a", source_finetuned="/b", encoding=bad)


def test_a_graft_from_an_artifact_is_evaluated_against_the_fine_tune_it_came_from(tmp_path, one_torch_thread):
    from checks_models import PROMPTS, checks_family

    from worker.engine.checks.checked_graft import Checks, run_checked_graft
    from worker.engine.checks.evaluation.spec import EvaluateSpec

    family = checks_family(str(tmp_path / "family"))
    pair = {"source_base": family["base"], "source_finetuned": family["finetuned"]}
    extract(pair, tmp_path / "diff")
    recipe = Recipe.single("", "", family["near"], GraftOptions(), diff=str(tmp_path / "diff"))
    spec = EvaluateSpec(prompts=PROMPTS, max_new_tokens=2)
    applied = run_checked_graft(GraftRequest(recipe, str(tmp_path / "applied")), Checks(evaluate=spec),
                                settings=settings())
    three = GraftRequest.single(family["base"], family["finetuned"], family["near"], str(tmp_path / "ref"))
    reference = run_checked_graft(three, Checks(evaluate=spec), settings=settings())
    got, want = applied.checks["evaluation"], reference.checks["evaluation"]
    assert "error" not in got, got
    assert got["probe"]["source_finetuned"] == want["probe"]["source_finetuned"]
    assert got["kl_to_finetuned"]["mean"] == pytest.approx(want["kl_to_finetuned"]["mean"], rel=1e-6, abs=1e-9)
    with open(tmp_path / "applied" / "README.md") as fh:
        assert f"`{tmp_path / 'diff'}`" in fh.read()


def test_inspecting_against_an_artifact_reads_the_target_alone(trio, tmp_path, one_torch_thread):
    """The weights level of a target and an artifact (the fine-tune with added rows): the target's bytes and the
    artifact's sketches are read, nothing else; each estimate within its interval of the three-model figure."""
    from worker.engine.checks.inspect import inspect_graft

    extract(trio, tmp_path / "diff", {"encoding": "sparse", "density": 0.1})
    recipe = Recipe.single("", "", trio["target_base"], GraftOptions(), diff=str(tmp_path / "diff"))
    sketched = inspect_graft(GraftRequest(recipe, ""), level="weights", settings=settings()).report
    three = inspect_graft(GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"],
                                              ""), level="weights", settings=settings()).report
    assert sketched["verdict"] == three["verdict"]
    # The headers level compares the source base's own tokenizer (the artifact keeps a copy) with the target's.
    assert [(r["code"], r["message"]) for r in sketched["reasons"] if r["level"] == "headers"] == \
        [(r["code"], r["message"]) for r in three["reasons"] if r["level"] == "headers"]
    assert sketched["weights"]["bytes_read"] * 3 <= three["weights"]["bytes_read"] * 1.05
    exact = {t["name"]: t for t in three["weights"]["diffs"][0]["tensors"]}
    for t in sketched["weights"]["diffs"][0]["tensors"]:
        lo, hi = t["estimated"]["bases_norm"]
        assert lo * (1 - 1e-6) <= exact[t["name"]]["bases_norm"] <= hi * (1 + 1e-6), t["name"]


def test_the_function_level_of_an_artifact_runs_the_source_base_it_records(tmp_path, one_torch_thread):
    from checks_models import PROBE, checks_family

    from worker.engine.checks.inspect import inspect_graft

    family = checks_family(str(tmp_path / "family"))
    extract({"source_base": family["base"], "source_finetuned": family["finetuned"]}, tmp_path / "diff")
    recipe = Recipe.single("", "", family["near"], GraftOptions(), diff=str(tmp_path / "diff"))
    sketched = inspect_graft(GraftRequest(recipe, ""), level="function", settings=settings(), probe_text=PROBE)
    three = inspect_graft(GraftRequest.single(family["base"], family["finetuned"], family["near"], ""),
                          level="function", settings=settings(), probe_text=PROBE)
    assert sketched.report["function"]["losses"] == three.report["function"]["losses"]
    assert sketched.report["verdict"] == three.report["verdict"]
    assert sketched.report["headers"]["tokenizer"] == three.report["headers"]["tokenizer"]
    assert sketched.report["headers"]["tokenizer"]
    os.rename(family["base"], str(tmp_path / "moved"))  # the recorded base gone: that level is not run
    gone = inspect_graft(GraftRequest(recipe, ""), level="function", settings=settings(), probe_text=PROBE).report
    assert "function_level_not_run" in {r["code"] for r in gone["reasons"]}
    assert "weights" in gone["levels_run"] and "function" not in gone["levels_run"]


def test_a_target_with_fewer_rows_than_the_source_base_is_refused_under_extend(trio, tmp_path, one_torch_thread):
    """The artifact holds the fine-tune's rows past its base's; the rows between a smaller target's and the base's
    it does not: refused before anything is read, and vocab: target does it."""
    from worker.devtools.sample_models import LlamaShape, save_checkpoint

    state = load_dir(trio["target_base"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:250].clone()
    state.pop("model.rotary_emb.inv_freq", None)
    small = save_checkpoint(str(tmp_path / "small"), state, LlamaShape().config(vocab=250))
    extract(trio, tmp_path / "diff")
    with pytest.raises(GraftError) as err:
        apply(str(tmp_path / "diff"), small, tmp_path / "out")
    assert err.value.code == "vocab_mismatch" and "vocab: target" in err.value.message
    assert not os.path.exists(tmp_path / "out")
    apply(str(tmp_path / "diff"), small, tmp_path / "out", vocab="target")
    three_model({**trio, "target_base": small}, tmp_path / "ref", vocab="target")
    assert same_files(str(tmp_path / "out"), str(tmp_path / "ref")) == []


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_applying_a_formed_delta_rounds_as_the_pair_does(whole, dtype):
    """The kernel from a delta (chunked on the CPU; whole pieces as on an accelerator) writes the pair kernel's
    bytes, and both are the float64 reference rounded once."""
    from worker.engine.compute.arithmetic import Arithmetic
    from worker.engine.compute.tensor_stats import TensorStats

    g = torch.Generator().manual_seed(7)
    n = 300_001
    t, s = (torch.randn(n, generator=g) * 0.02).to(dtype), (torch.randn(n, generator=g) * 0.02).to(dtype)
    f = (s.float() + torch.randn(n, generator=g) * 1e-3).to(dtype)
    kernel = Arithmetic(torch.device("cpu"), whole_pieces=whole)
    pair, formed = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    kernel.transfer(pair, t, s, f, 0.7, torch.float32, TensorStats())
    delta = f.float() - s.float()
    stats = TensorStats()
    kernel.apply_delta(formed, t, delta.clone(), 0.7, torch.float32, stats)
    assert torch.equal(pair.view(torch.uint8 if dtype != torch.float32 else torch.int32),
                       formed.view(torch.uint8 if dtype != torch.float32 else torch.int32))
    if not whole:  # alpha (as float32) times d and t + that, each rounded to float32, then to the stored dtype
        scaled = (float(torch.tensor(0.7, dtype=torch.float32)) * delta.double()).float()
        assert torch.equal(formed, (t.double() + scaled.double()).float().to(dtype))
    assert stats.delta_sq == pytest.approx(float((delta.double() ** 2).sum()), rel=1e-4)  # float32 dots


_EXTRACT_PEAK = """
import json, resource, sys
from worker.engine.config import EngineSettings
from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
from worker.engine.pipeline.diff_extract import extract_diff
base, ft, out, encoding = sys.argv[1:5]
extract_diff(DiffExtractRequest(DiffExtract(source_base=base, source_finetuned=ft, encoding=json.loads(encoding)),
                                out), EngineSettings(hash_inputs=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_extraction_memory_does_not_grow_with_the_number_of_tensors(tmp_path):
    """A deep model of ~360 matrices of 4,096+ elements (each sketched, ranked and encoded in three passes):
    what a tensor's extraction holds (its sketches, its encoder, its parts) must go with it, not stay to the
    end (8 MB a sketch was 5 GB here)."""
    encoding = {"encoding": "sparse", "density": 0.1}
    import subprocess
    import sys

    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    def peak(layers: int) -> int:
        shape = LlamaShape(layers=layers, hidden=64, intermediate=64, heads=2, kv_heads=1)
        base = llama_state(shape, seed=1)
        root = tmp_path / str(layers)
        paths = [save_checkpoint(str(root / n), st, shape.config()) for n, st in
                 (("base", base), ("ft", perturb(base, seed=2)))]
        done = subprocess.run([sys.executable, "-c", _EXTRACT_PEAK, *paths, str(root / "diff"), json.dumps(encoding)],
                              capture_output=True, text=True, timeout=300, check=True)
        return int(done.stdout.splitlines()[-1])

    small, deep = peak(4), peak(40)
    assert deep - small < 100 << 20, (small >> 20, deep >> 20)


def test_an_s3_artifact_is_hashed_once_per_version_and_a_rewritten_shard_is_refused(trio, tmp_path, s3_bucket,
                                                                                    s3_endpoint, one_torch_thread):
    """Applying one artifact to many bases verifies each shard once per version (its ETag): a second open reads
    no shard bytes, and a shard written again (new ETag) is read, hashed and refused when it no longer matches."""
    from conftest import upload_dir

    from worker.engine.diffs.artifact import read_manifest, verify_shards
    from worker.engine.storage.input_hashes import DigestCache
    from worker.engine.storage.s3 import s3_client
    from worker.engine.storage.stores import open_store
    from worker.engine.storage.uris import parse_uri

    extract(trio, tmp_path / "diff")
    uri = upload_dir(s3_endpoint, str(tmp_path / "diff"), s3_bucket, "once/diff")
    cache_dir = str(tmp_path / "digests")

    def verify(fail_reads: bool) -> None:
        store = open_store(parse_uri(uri), s3_endpoint)
        try:
            manifest = read_manifest(store, uri)
            if fail_reads:
                def no_read(*_args, **_kwargs):
                    raise AssertionError("a shard verified before, unchanged, was read again")
                store.read_range = no_read
            verify_shards(store, manifest, uri, DigestCache(cache_dir))
        finally:
            store.close()

    verify(fail_reads=False)
    verify(fail_reads=True)  # the digest remembered for this ETag
    shard = next(n for n in os.listdir(tmp_path / "diff") if n.startswith("diff-") and n.endswith(".safetensors"))
    data = bytearray((tmp_path / "diff" / shard).read_bytes())
    data[-3] ^= 0xFF
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"once/diff/{shard}", Body=bytes(data))
    with pytest.raises(GraftError) as err:
        verify(fail_reads=False)
    assert err.value.code == "invalid_diff" and "sha256" in err.value.message
