"""The house's shape, as rules a change cannot break silently: no import circle among DrSpot's packages (imports
inside functions count: that is how circles hide), nothing below ``serving/`` or ``flows/`` imports upward, and the
configuration is loaded only where a run starts (the CLI, a flow's entry, the service's definition)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infra", "components", "flows", "serving")
# the layers, lowest first: a module may import its own layer and those below it, never one above
LAYERS = {"infra": 0, "components": 1, "serving": 2, "flows": 3}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = p
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported DrSpot module: first line}, every import statement anywhere in the module."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = m.split(".")[: len(m.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for target in names:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # a package's own __init__ importing its children is how packages are built, not a circle
                if target and target != m and not m.startswith(target + ".") and not target.startswith(m + "."):
                    edges[m].setdefault(target, node.lineno)
    return edges


def _circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_counting_imports_inside_functions():
    mods = _modules()
    edges = _edges(mods)
    lines = []
    for comp in _circles(edges):
        lines.append(f"import circle of {len(comp)} modules:")
        for a in comp:
            lines += [f"  {mods[a].relative_to(ROOT)}:{line} -> {b}" for b, line in edges[a].items() if b in comp]
    assert not lines, "\n".join(lines)


def test_no_module_imports_a_layer_above_its_own():
    mods = _modules()
    upward = [
        f"{mods[a].relative_to(ROOT)}:{line} imports {b}"
        for a, targets in _edges(mods).items()
        for b, line in targets.items()
        if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]
    ]
    assert not upward, "\n".join(upward)


# where a run starts, and so may load a configuration; everything below is handed the Config object
CONFIG_ENTRIES = {
    "flows/cli.py",  # the command line
    "flows/commands",  # its commands (drspot serve: the configuration a Bento was deployed with)
    "flows/policy.py",  # a flow's entry (run_config) and its failure hook
    "serving/app.py",  # the service's definition, in its own process
    "infra/config.py",  # where loading is defined
}


def test_the_configuration_is_loaded_only_where_a_run_starts():
    callers = []
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        if any(rel == e or rel.startswith(e + "/") for e in CONFIG_ENTRIES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in ("load_config", "load_resolved"):
                    callers.append(f"{rel}:{node.lineno} calls {name}")
    assert not callers, "below a run's entry the configuration is handed down, not re-loaded:\n" + "\n".join(callers)


def test_only_the_paths_object_spells_the_state_folder():
    """``<home>/.drspot/...`` is laid out in infra/state.py alone; everything else asks ``cfg.runtime``."""
    spelled = []
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        if rel == "infra/state.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(".drspot"):
                spelled.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not spelled, "\n".join(spelled)


def test_every_module_imports_in_a_fresh_process():
    """The quick loop's guard after a move or a rename: every module of the four packages imports on its own (a
    dangling import inside a module's top level, a name moved without its users, fails here in seconds)."""
    import os
    import subprocess
    import sys

    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        f"for m in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=dict(os.environ), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(names) >= 75
