"""The layers README's architecture section draws, held by the imports themselves: lower layers never import
higher ones (function-level imports included), no module-level import circle, the engine imports nothing of the
service, the API or the dev tools, and no engine function grows past sixty lines or ten parameters."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Engine layers, lowest first. A module may import its own layer and any below it.
ENGINE_LAYERS = [
    ("worker.engine.errors", "worker.engine.config", "worker.engine.phases", "worker.engine.lazy",
     "worker.engine.verdict"),
    ("worker.engine.storage",),
    ("worker.engine.methods",),
    ("worker.engine.planning",),
    ("worker.engine.compute",),
    ("worker.engine.diffs",),
    ("worker.engine.pipeline",),
    ("worker.engine.checks",),
]
# Above the engine: who may import whom among the packages outside it.
OUTSIDE = {
    "worker.service": ("worker.engine", "worker.service"),
    # The command line is the top face: `graft serve` starts the API, `graft worker` the RQ worker.
    "worker.cli": ("worker.engine", "worker.service", "worker.progress", "worker.devtools", "worker.service_worker",
                   "worker.client", "worker.exit_codes", "app"),
    # The service's client (graft jobs|diffs|loras) speaks HTTP: of the project, only declarations without torch.
    "worker.client": ("worker.client", "worker.exit_codes", "worker.service.statuses"),
    "worker.exit_codes": (),
    "worker.service_worker": ("worker.engine", "worker.service"),
    "worker.progress": ("worker.engine",),
    "app": ("worker.engine", "worker.service", "app"),
    "worker.devtools": ("worker.engine", "worker.service", "worker.devtools", "worker.cli", "app"),
}
MAX_LINES, MAX_PARAMS = 60, 10


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for top in ("worker", "app"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _package(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]


def _imports(path: pathlib.Path, *, top_level_only: bool) -> set[str]:
    """The project modules a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(path) if path.is_relative_to(ROOT) else []
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES}


def _engine_layer(module: str) -> int | None:
    for i, layer in enumerate(ENGINE_LAYERS):
        if any(_within(module, prefix) for prefix in layer):
            return i
    return None


def test_the_engine_imports_only_its_own_layer_and_below():
    wrong = []
    for module, path in MODULES.items():
        if not _within(module, "worker.engine") or module == "worker.engine":
            continue
        mine = _engine_layer(module)
        assert mine is not None, f"{module} belongs to no layer: add it to ENGINE_LAYERS (and README's drawing)"
        for dep in _imports(path, top_level_only=False):
            if not _within(dep, "worker.engine"):
                wrong.append(f"{module} -> {dep} (the engine imports nothing outside it)")
            elif dep != "worker.engine" and _engine_layer(dep) > mine:
                wrong.append(f"{module} -> {dep} (reaches up)")
    assert not wrong, "\n".join(wrong)


def test_the_service_the_api_and_the_tools_import_as_drawn():
    wrong = []
    for module, path in MODULES.items():
        if _within(module, "worker.engine"):
            continue
        owner = next((p for p in sorted(OUTSIDE, key=len, reverse=True) if _within(module, p)), None)
        if owner is None:
            assert module == "worker", f"{module} is in no package the architecture names"
            continue
        for dep in _imports(path, top_level_only=False):
            if not any(_within(dep, allowed) for allowed in OUTSIDE[owner]) and dep != "worker":
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_at_module_level():
    graph = {m: _imports(p, top_level_only=True) for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_engine_functions_stay_small():
    big = []
    for module, path in MODULES.items():
        if not _within(module, "worker.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                args = node.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                count = len([a for a in params if a.arg not in ("self", "cls")]) + bool(args.vararg) + bool(args.kwarg)
                if lines > MAX_LINES or count > MAX_PARAMS:
                    big.append(f"{module}.{node.name}: {lines} lines, {count} parameters")
    assert not big, "\n".join(big)


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above can fail: an engine module importing the service is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from worker.service.settings import Settings\nimport worker.engine.checks.checked_graft\n")
    assert _imports(bad, top_level_only=False) == {"worker.service.settings", "worker.engine.checks.checked_graft"}
