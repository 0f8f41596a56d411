"""The package's shape: the light side stays light, wings import only downwards, the public
surface is exactly what the README documents."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import farm

ROOT = Path(__file__).resolve().parents[1]

WINGS = [
    {"farm.errors", "farm.settings", "farm.keys"},
    {"farm.jobs"},
    {"farm.storage", "farm.queue"},
    {"farm.state"},
    {"farm.inputs"},
    {"farm.submit", "farm.client", "farm.remote"},
    {"farm.batches"},
    {"farm.local"},
    {"farm.api"},
    {"farm.cli"},
]
"""farm's wings, lowest first: a module may import its own wing and the wings below it."""

SURFACE = {
    "Batch",
    "Box",
    "Farm",
    "FarmError",
    "FarmSettings",
    "Finetune",
    "Full",
    "Img2Img",
    "Inpaint",
    "InvalidJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "LoraRef",
    "ObjectNotFound",
    "StaleAttempt",
    "StorageError",
    "Strokes",
    "Style",
    "TransientError",
    "Txt2Img",
    "WaitTimeout",
    "fetch_dataset",
    "submit_batch",
}
"""`from farm import ...`: the names README.md's "Use it from Python" documents."""


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def rank(module: str) -> int | None:
    for i, wing in enumerate(WINGS):
        if any(module == w or module.startswith(w + ".") for w in wing):
            return i
    return None


def test_every_farm_module_imports_without_the_heavy_side():
    names = [dotted(p) for p in modules("farm") if p.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'peft', 'workers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {"FARM_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]


def test_wings_import_only_their_own_and_lower_wings():
    wrong = []
    for path in modules("farm"):
        me = dotted(path)
        if me in ("farm", "farm.__main__"):
            continue  # the package's face and entry point sit above every wing
        for target in imported(path):
            if target == "workers" or target.startswith("workers."):
                wrong.append(f"{me} imports {target}: farm never imports workers")
            mine, theirs = rank(me), rank(target)
            if theirs is not None and mine is not None and theirs > mine:
                wrong.append(f"{me} (wing {mine}) imports {target} (wing {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    names = {dotted(p): p for p in [*modules("farm"), *modules("workers")]}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level: what runs at import
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in names and d != name}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_every_wing_says_what_lives_there_and_what_it_may_import():
    for init in (ROOT / "farm").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init.relative_to(ROOT)}: no word on what the wing may import"
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init.relative_to(ROOT)} does not name {module.name}"


def test_public_surface_is_exactly_the_documented_one():
    assert set(farm.__all__) == SURFACE
    assert len(farm.__all__) == len(SURFACE)
    readme = (ROOT / "README.md").read_text()
    for name in SURFACE:
        assert hasattr(farm, name), name
        assert f"`{name}`" in readme, f"README.md does not document farm.{name}"
