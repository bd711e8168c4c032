"""`make run`: generate three small related models and graft them, printing where the result is."""

from __future__ import annotations

import os
import sys
import tempfile

from .engine import GraftOptions, GraftRequest, run_graft
from .sample_models import make_trio


def main() -> int:
    root = tempfile.mkdtemp(prefix="graft-demo-")
    paths = make_trio(os.path.join(root, "models"))
    output = os.path.join(root, "grafted")
    request = GraftRequest(paths["source_base"], paths["source_finetuned"], paths["target_base"], output,
                           GraftOptions())
    result = run_graft(request)
    print(f"grafted {result.stats['tensors']} tensors; result: {result.output_uri}")
    print(f"manifest: {result.manifest_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
