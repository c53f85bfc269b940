"""The tree's layering, from its imports (`ast`): `service/` and `worker/` never import each
other, `contract/` and `service/` never import torch, `vmoba/` never imports the service side,
and no package has an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "service", "worker", "vmoba")
HEAVY = ("torch", "triton", "diffusers", "transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports at run time (function-level imports
    included, `if TYPE_CHECKING:` blocks left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            # `from pkg import mod` imports the submodule `pkg.mod` when there is one.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def tree_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


MODULES = tree_modules()
GRAPH = {name: {m for m in imports_of(path) if m in MODULES} for name, path in MODULES.items()}


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("service", ("worker",) + HEAVY),
        ("worker", ("service",)),
        ("contract", ("service", "worker", "vmoba", "fastapi", "starlette") + HEAVY),
        ("vmoba", ("service", "worker", "contract", "fastapi", "rq", "redis")),
    ],
)
def test_package_imports_stay_in_their_layer(package, forbidden):
    bad = sorted(
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if top(name) == package
        for imported in imports_of(path)
        if top(imported) in forbidden
    )
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_no_import_cycles():
    """Depth-first search over the tree's own modules; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if dep == name or name.startswith(dep + "."):
                continue  # a package's own __init__ seen from inside: not a cycle
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_api_process_never_loads_torch():
    """What actually runs: importing the app, the CLI and `make serve` loads no heavy module."""
    code = (
        "import sys, service.app, service.cli, service.serve, contract.store; "
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_checks_see_a_planted_violation(tmp_path):
    """The import walker finds function-level and relative imports (so the tests above can
    fail)."""
    pkg = ROOT / "service"
    probe = pkg / "_layer_probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import diffusers\n"
        "def f():\n    from ..worker import jobs\n    import torch\n"
    )
    try:
        found = imports_of(probe)
    finally:
        probe.unlink()
    assert "worker.jobs" in found and "torch" in found and "diffusers" not in found
