"""The arithmetic and the passes over the weights: one pass runner (passes.py over blocks.py) whose visitors are
the graft's compute (stream.py: the plain kernel, arithmetic.py, or the merge kernel, merge_kernel.py), the
statistics passes a recipe's methods declare (statistics_pass.py) and the inspection's weights level; the
per-tensor sums they share (tensor_stats.py). Imports planning, methods and storage."""
