"""The checkpoint package imports none of the engine or optimizer modules (issue 16: no import cycle).

Every import of every module under ``microadam_dist/checkpoint`` is read with ``ast``, at any
level (inside functions and classes too), with relative imports resolved to absolute names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import microadam_dist

PACKAGE = Path(microadam_dist.__file__).parent
FORBIDDEN = {f"microadam_dist.{m}" for m in ("deepspeed_zero", "ds_native", "optimizer", "sharded", "fsdp", "fsdp1",
                                              "train", "cli")}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute names (``from X import y`` gives X and X.y)."""
    module = "microadam_dist." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_checkpoint_package_imports_no_engine_module():
    files = sorted((PACKAGE / "checkpoint").rglob("*.py"))
    assert files, "microadam_dist/checkpoint/ has no modules"
    bad = {}
    for path in files:
        hits = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
        if hits:
            bad[str(path.relative_to(PACKAGE))] = sorted(hits)
    assert not bad, f"checkpoint modules import engine or optimizer modules: {bad}"


def test_the_import_walk_resolves_relative_imports():
    """The check itself: a relative import two levels up resolves to the package's module."""
    resolved = imported_modules(PACKAGE / "checkpoint" / "base.py")
    assert "microadam_dist.state" in resolved and "microadam_dist.checkpoint" not in resolved
