"""The package's module graph: no import cycle (imports inside functions included), a cheap import."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "microadam_dist"
# the installed layout: the top-level kernels/ folder is microadam_dist.kernels
SOURCES = {PACKAGE: ROOT / "microadam_dist", f"{PACKAGE}.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if not (prefix == PACKAGE and parts and parts[0] == "kernels"):
                out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (``from . import x`` names module x)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & set(modules)
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in target itself (its __init__)
                found.add(target)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "microadam_dist.state" in graph and "microadam_dist.kernels.triton_path" in graph
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_checkpoint_formats_import_no_engine():
    """The layering: checkpoint formats read and write files through the leaves (state, hyperparams,
    geometry, zero_layout), never through an engine, the optimizer or the jobs."""
    modules = _modules()
    engines = ("deepspeed_zero", "optimizer", "engine", "sharded", "dtensor", "fsdp1", "train", "cli", "demo")
    forbidden = {f"{PACKAGE}.{m}" for m in engines}
    bad = {}
    for name, path in modules.items():
        if name.startswith(f"{PACKAGE}.checkpoint"):
            hits = {m for m in _imports(name, path, modules) if any(m == f or m.startswith(f + ".") for f in forbidden)}
            if hits:
                bad[name] = sorted(hits)
    assert not bad, f"checkpoint modules import engine-level modules: {bad}"


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    """A function-level import counts (the test above would miss a cycle otherwise)."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from .state import StateLayout\n    from . import geometry\n")
    modules = {"microadam_dist.x": path, "microadam_dist.state": path, "microadam_dist.geometry": path}
    assert _imports("microadam_dist.x", path, modules) == {"microadam_dist.state", "microadam_dist.geometry"}


def test_import_is_cheap_and_registers_the_json_entry():
    code = (
        "import sys, torch, microadam_dist\n"
        "heavy = [m for m in ('deepspeed', 'triton', 'torch.distributed.tensor', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert torch.optim.MicroAdam is microadam_dist.DeepSpeedMicroAdam\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_import_never_raises_over_a_foreign_torch_optim_entry():
    code = (
        "import warnings, torch\n"
        "class Other(torch.optim.SGD): pass\n"
        "torch.optim.MicroAdam = Other\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import microadam_dist\n"
        "assert torch.optim.MicroAdam is Other\n"
        "assert any('already' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
