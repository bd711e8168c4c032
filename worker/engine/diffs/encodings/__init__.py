"""The registry of diff encodings: one module each, registered here (name -> Encoding).

A tensor an encoding does not store goes to FALLBACK (exact). The shape says it for most (`applies_to`: int8,
sign and lowrank take matrices, 2-D or more seen as shape[0] rows x the rest): the caller asks first and
records exact. Where the parameters decide too (lowrank at a rank that would not save bytes), the encoding's
own encoder is exact's and its meta (and extra) carry `stored: exact`; its decode_into reads it back so. An
encoder handed a shape its encoding does not apply to does the same, so asking first is never required.

`EncodingParams` is what requests and the command line take: one of the encodings' parameter models, by
its `encoding` field; a mapping without one, or nothing, is exact; a bare name (`"sparse"`) is that
encoding at its defaults. It and the parameter models are declared without torch in ../encoding_params.py
(the API's bodies take them), and re-exported here."""

from __future__ import annotations

from worker.engine.diffs.encoding_params import FALLBACK, PARAMS, EncodingParams
from worker.engine.diffs.encodings.base import Encoding
from worker.engine.diffs.encodings.bf16 import BF16
from worker.engine.diffs.encodings.exact import EXACT
from worker.engine.diffs.encodings.int8 import Int8
from worker.engine.diffs.encodings.lowrank import LowRank
from worker.engine.diffs.encodings.sign import Sign
from worker.engine.diffs.encodings.sparse import Sparse

ENCODINGS: dict[str, Encoding] = {e.name: e for e in (EXACT, BF16, Int8(), Sign(), Sparse(), LowRank())}
# The requests' union (EncodingParams) is declared torch-free beside the encodings: it must be theirs exactly.
if {name: e.Params for name, e in ENCODINGS.items()} != PARAMS:
    raise RuntimeError("the encodings' Params and worker/engine/diffs/encoding_params.PARAMS disagree")


__all__ = ["ENCODINGS", "FALLBACK", "Encoding", "EncodingParams"]
