# One virtualenv at .venv, rebuilt only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint bench bench-lora bench-diffs bench-s3-diffs bench-s3-graft bench-shard bench-writeback clean soak fuzz example

venv: $(STAMP)

# torch is pinned and installed first: left to the resolver it pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/python -m worker.devtools.demo

# Two test processes: the suite's time is mostly waits on its subprocesses (API, workers, evaluation children)
# and sockets; PYTEST_WORKERS=0 runs it in one.
PYTEST_WORKERS ?= 2

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

# Workers SIGKILLed at random points (a third with S3 outputs) and Redis outages: longer than `make test`.
soak: venv
	GRAFT_SOAK_TRIALS=$${GRAFT_SOAK_TRIALS:-20} $(BIN)/python -m pytest -q -s tests/test_faults_worker.py $(PYTEST_ARGS)

# The input parsers' fuzz tests with many more examples than `make test` runs (derandomized: reproducible).
fuzz: venv
	GRAFT_FUZZ_EXAMPLES=$${GRAFT_FUZZ_EXAMPLES:-5000} $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py

bench: venv
	$(BIN)/python bench/bench_engine.py

# LoRA export beside mergekit-extract-lora (its own venv under .bench/): per rank size, time, RSS, retained
# energy and the KL of target + adapter to the full graft.
bench-lora: venv
	$(BIN)/python bench/bench_lora.py $(BENCH_ARGS)

# Diff artifacts (issue 15): each encoding extracted and applied beside the three-model graft, then the quality
# each keeps; models generated under .bench/ (about 3 GB), CPU-heavy (an hour on two busy cores).
bench-diffs: venv
	$(BIN)/python bench/bench_diffs.py $(BENCH_ARGS)

# The same S3 -> S3 on a real S3 server (s3rver, installed under .bench/) in its own network namespace, every
# connection capped by the kernel (root, ip netns, tc htb/u32: bench/s3_rig.py); floors measured in the same run.
bench-s3-diffs: venv
	$(BIN)/python bench/bench_s3_diffs.py $(BENCH_ARGS)

# The whole `graft run` S3 -> S3 against the rig's read and upload floors, with the job's storage timeline.
bench-s3-graft: venv
	$(BIN)/python bench/bench_s3_rig_graft.py $(BENCH_ARGS)

# A graft split by output shard (issue 18): a simulated 405B plan from synthetic headers (no data), then one job
# on the S3 rig run by 1, 2 and 4 RQ workers, and one with a worker SIGKILLed mid-shard (root, as the rig).
bench-shard: venv
	$(BIN)/python bench/bench_shard_plan.py
	$(BIN)/python bench/bench_shard_rig.py $(BENCH_ARGS)

# Local output writeback on the disk: steady sync_file_range and the durable commit against the kernel's own.
bench-writeback: venv
	$(BIN)/python bench/bench_local_writeback.py $(BENCH_ARGS)

# The verdict calibrated on a tiny model family trained here (CPU, a few minutes): examples/calibration/.
example: venv
	$(BIN)/python examples/calibration/run_calibration.py $(EXAMPLE_ARGS)

clean:
	rm -rf $(VENV) .run .bench
