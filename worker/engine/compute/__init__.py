"""The arithmetic and the passes over the weights: block streaming, the graft's kernels (plain and merged),
whole-tensor statistics (rank selection). Imports planning, methods and storage."""
