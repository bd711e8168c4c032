"""Judging a graft: inspection (headers, weights, function levels), evaluation of an output with transformers,
and the checked graft (evaluate, require, sweep) built on the pipeline. The engine's top layer."""
