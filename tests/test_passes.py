"""The pass runner and the compute step's choice of kernel: a one-diff recipe plan (what every graft will
arrive as) streams to the plain plan's bytes on bf16, f16 and f32 models, a per-layer weight list included
(each tensor at its own alpha); the runner's pieces tile every tensor in order, hold whole rows where asked
and stop between blocks when cancelled; the statistics methods declare are scheduled in their order."""

from __future__ import annotations

import io
import os

import pytest
import torch
from safetensors.torch import load

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine.compute import merge_kernel
from worker.engine.compute.blocks import Visit, build_blocks, graft_groups
from worker.engine.compute.passes import Reading, run_pass
from worker.engine.compute.stream import stream_plan
from worker.engine.errors import GraftCancelled
from worker.engine.methods import MERGES, TRANSFORMS
from worker.engine.methods.base import Site, make_statistics, schedule
from worker.engine.pipeline.resolve import canonical_roles, close_models, resolve_inputs
from worker.engine.planning.options import GraftOptions, base_role, finetuned_role
from worker.engine.planning.plan import build_plan
from worker.engine.planning.recipe import load_recipe
from worker.engine.planning.recipe_plan import build_recipe_plan
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.sinks import FileWriter, Sink

LAYERS = 3
CPU = torch.device("cpu")


class MemorySink(Sink):
    """The files a stream writes, kept in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        sink = self

        class _Writer(FileWriter):
            def __init__(self) -> None:
                super().__init__(name)
                self.buf = io.BytesIO()

            def _write(self, data) -> None:
                self.buf.write(bytes(data))

            def _finish(self) -> None:
                sink.files[name] = self.buf.getvalue()

        return _Writer()

    def commit(self, manifest: bytes) -> str:
        raise AssertionError("not published here")

    def abort(self) -> None:
        pass

    def abandon(self) -> None:
        pass


def _models(root: str, dtype: torch.dtype) -> dict[str, str]:
    """A base, a fine-tune adding 8 vocabulary rows and a drifted target, matrices and norms in `dtype`."""
    shape = LlamaShape(layers=LAYERS)
    base = llama_state(shape, seed=40, dtype=dtype, norm_dtype=dtype)
    states = {"base": (base, 256), "ft": (perturb(base, seed=41, extra_rows=8), 264),
              "target": (perturb(base, seed=42, scale=0.2), 256)}
    return {n: save_checkpoint(os.path.join(root, n), st, shape.config(vocab=v)) for n, (st, v) in states.items()}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def family(request, tmp_path_factory) -> dict[str, str]:
    return _models(str(tmp_path_factory.mktemp("passes")), request.param)


def _stream(plan, models, alpha: float, block_bytes: int = 16 << 20) -> dict[str, bytes]:
    sink = MemorySink()
    reading = Reading({r: m.store for r, m in models.items()}, canonical_roles(models), CPU, block_bytes, 2, 2)
    stream_plan(plan, sink, reading, alpha=alpha)
    return sink.files


def _recipe(family: dict[str, str], weight, lam: float = 1.0):
    return load_recipe({"target_base": family["target"], "merge": {"method": "sum", "lambda": lam},
                        "diffs": [{"source_base": family["base"], "source_finetuned": family["ft"],
                                   "weight": weight}]})


def _resolved(recipe):
    """The recipe's models by role (the one diff's under both spellings, `source_base` and `source_base.0`, as a
    recipe plan reads them) and by URI."""
    request = GraftRequest(recipe, "")
    models = resolve_inputs(request)
    models[base_role(0)], models[finetuned_role(0)] = models["source_base"], models["source_finetuned"]
    return models, {uri: models[role] for role, uri in request.inputs().items()}


def _plain(models, alpha: float) -> dict[str, bytes]:
    plan = build_plan(models["target_base"], models["source_base"], models["source_finetuned"],
                      GraftOptions(alpha=alpha))
    return _stream(plan, models, alpha)


def _no_merge_kernel(monkeypatch) -> None:
    def refuse(self, piece):
        raise AssertionError(f"{piece.name} went to the merge kernel")

    monkeypatch.setattr(merge_kernel.MergeKernel, "piece", refuse)


@pytest.mark.parametrize("weight,lam", [(0.7, 1.0), (1.0, 1.0), (0.5, 1.5)])
def test_a_one_diff_recipe_plan_writes_the_plain_plans_bytes(family, monkeypatch, weight, lam):
    recipe = _recipe(family, weight, lam)
    models, by_uri = _resolved(recipe)
    try:
        plan, plan.merge = build_recipe_plan(recipe, by_uri)
        assert plan.merge.uses and all(s.op != "transfer" for t in plan.tensors for s in t.segments)
        _no_merge_kernel(monkeypatch)  # the compute step picks the plain kernel for every merged tensor
        as_recipe = _stream(plan, models, alpha=1.0)
        small = _stream(plan, models, alpha=1.0, block_bytes=4096)
        plain = _plain(models, weight * lam)
    finally:
        close_models(models)
    assert set(as_recipe) == set(plain) and as_recipe == plain
    assert small == plain
    # Every merged tensor is reported as the recipe's: the diff, its weight, all of it kept.
    for uses in plan.merge.uses.values():
        assert [u.to_dict()["kept_fraction"] for u in uses] == [1.0]


def test_a_per_layer_weight_list_takes_each_tensors_alpha(family, monkeypatch):
    weights = [0.25, 1.0, 0.5]
    recipe = _recipe(family, weights)
    models, by_uri = _resolved(recipe)
    try:
        plan, plan.merge = build_recipe_plan(recipe, by_uri)
        alphas = {name: uses[0].weight for name, uses in plan.merge.uses.items()}
        assert len(set(alphas.values())) == 3  # the layers', and the head's (graft's conventions: the last value)
        _no_merge_kernel(monkeypatch)
        got = _tensors(_stream(plan, models, alpha=1.0))
        plain = {alpha: _tensors(_plain(models, alpha)) for alpha in set(alphas.values())}
    finally:
        close_models(models)
    for name, tensor in got.items():
        want = plain[alphas.get(name, 1.0)][name]  # a copied tensor is the same at every alpha
        assert torch.equal(tensor.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name
    layer1 = "model.layers.1.mlp.up_proj.weight"
    assert alphas[layer1] == 1.0 and alphas["model.layers.0.mlp.up_proj.weight"] == 0.25
    assert alphas["model.layers.2.mlp.up_proj.weight"] == 0.5


def _tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    out = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            out.update(load(data))
    return out


def test_a_transform_or_two_diffs_take_the_merge_kernel(family, monkeypatch):
    """The plain kernel only where the merge is the plain transfer: one transform (or a second diff) sends the
    tensor to the merge kernel."""
    recipe = load_recipe({"target_base": family["target"], "diffs": [
        {"source_base": family["base"], "source_finetuned": family["ft"], "weight": 0.5,
         "transform": {"method": "dare", "drop": 0.5}}]})
    models, by_uri = _resolved(recipe)
    try:
        plan, plan.merge = build_recipe_plan(recipe, by_uri)
        assert all(plan.merge.plain_alpha(n) is None for n in plan.merge.uses)
        _no_merge_kernel(monkeypatch)
        with pytest.raises(AssertionError, match="went to the merge kernel"):
            _stream(plan, models, alpha=1.0)
    finally:
        close_models(models)


# --- the runner --------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.pieces = []

    def visit(self, piece, buffers, out) -> None:
        self.pieces.append((piece.tensor.name, piece.start, piece.stop, piece.last, out is None))


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, str]:
    return _models(str(tmp_path_factory.mktemp("runner")), torch.bfloat16)


def test_pieces_tile_every_tensor_in_order_and_hold_whole_rows_where_asked(bf16_family):
    recipe = _recipe(bf16_family, 1.0)
    models, by_uri = _resolved(recipe)
    try:
        plan, plan.merge = build_recipe_plan(recipe, by_uri)
        reading = Reading({r: m.store for r, m in models.items()}, canonical_roles(models), CPU, 3000, 1, 2)
        rows = {t.name: t.shape[-1] for t in plan.tensors if len(t.shape) == 2}
        for asked in ({}, rows):
            visits = [v for _h, group in graft_groups(plan, asked) for v in group]
            recorder = Recorder()
            run_pass(build_blocks([(None, visits)], 3000, reading.canon), reading, recorder)
            for visit in visits:
                mine = [p for p in recorder.pieces if p[0] == visit.tensor.name]
                spans = [(s.start, s.stop) for s in visit.segments if s.stop > s.start]
                covered = [(a, b) for _n, a, b, _l, _o in mine]
                assert _joined(covered) == _joined(spans), visit.tensor.name
                assert [p[3] for p in mine] == [False] * (len(mine) - 1) + [True]
                assert all(p[4] for p in mine)  # a pass that writes nothing gets no output buffer
                row = asked.get(visit.tensor.name)
                if row:
                    assert all(a % row == 0 and b % row == 0 for a, b in covered), visit.tensor.name
    finally:
        close_models(models)


def _joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(x) for x in out]


def test_the_runner_stops_between_blocks_when_cancelled(bf16_family):
    recipe = _recipe(bf16_family, 1.0)
    models, by_uri = _resolved(recipe)
    try:
        plan, plan.merge = build_recipe_plan(recipe, by_uri)
        asked = []

        def cancel() -> bool:
            asked.append(1)
            return len(asked) > 3

        reading = Reading({r: m.store for r, m in models.items()}, canonical_roles(models), CPU, 4096, 1, 2, cancel)
        blocks = build_blocks([(None, [Visit(t, t.segments) for t in plan.tensors])], 4096, reading.canon)
        recorder = Recorder()
        with pytest.raises(GraftCancelled):
            run_pass(blocks, reading, recorder)
        assert len(blocks) > 4 and len(asked) == 4
        assert {p[0] for p in recorder.pieces} == {p.tensor.name for b in blocks[:3] for p in b.pieces}
    finally:
        close_models(models)


# --- statistics as data ------------------------------------------------------------------------------------

def _passes(method, params: dict, numel: int = 1000, diffs: int = 2, shape=(10, 100)) -> int:
    if method in TRANSFORMS:
        m = TRANSFORMS[method]
        stats = [st for k in range(diffs) for st in make_statistics(
            m, m.Params(method=method, **params), Site(numel, shape, diffs, k)).values()]
    else:
        m = MERGES[method]
        stats = list(make_statistics(m, m.Params(method=method, **params), Site(numel, shape, diffs)).values())
    return schedule(stats)[1]


@pytest.mark.parametrize("method,params,passes", [
    ("magnitude", {"density": 0.3}, 2),  # the radix select's two reads
    ("magnitude", {"density": 0.3, "rescale": True}, 3),  # then the L1 norms of the trimmed delta
    ("magnitude", {"density": 1.0, "rescale": True}, 0),  # nothing trimmed: mergekit leaves it unscaled
    ("dare", {"drop": 0.5}, 0),  # a draw, no statistic
    ("dare", {"drop": 0.5, "rescale": True}, 1),  # mergekit's: to the L1 norm
    ("dare", {"drop": 0.5, "rescale": False}, 0),
    ("della", {"density": 0.5}, 1),  # whole rows (no read), then the L1 norms
    ("della", {"density": 0.5, "rescale": False}, 0),
    ("breadcrumbs", {"density": 0.3, "rescale": True}, 3),
    ("sce", {"select_topk": 0.3}, 3),  # the variance's two reads, then the weights' squares
    ("sce", {"select_topk": 1.0}, 1),  # the squares alone
])
def test_declared_statistics_are_scheduled_in_their_order(method, params, passes):
    assert _passes(method, params) == passes
