"""The calibration example's tiny trained model family (examples/calibration/family.py) for the tests: the
"test" size, trained once per session into a temporary directory (a few seconds on one core).

A test module takes the fixture by importing it: `from tiny_family import tiny_family`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest

FAMILY_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "calibration",
                         "family.py")
# What the tests use: the near and the far continuation, the unrelated base, and v1 and ft (always trained).
TEST_MEMBERS = ("v2", "v2_far", "unrelated")


def family() -> ModuleType:
    """examples/calibration/family.py as a module (examples/ is not a package); loaded once."""
    name = "graft_calibration_family"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAMILY_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, str]:
    """{"v1", "v2", "v2_far", "unrelated", "ft"} -> checkpoint directory (float32 safetensors, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-family")
    return family().train_family(str(root), "test", members=TEST_MEMBERS)
