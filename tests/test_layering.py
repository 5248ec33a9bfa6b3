"""The layers point one way: storage (``cache``) < library (``pipeline``) < stages < CLI.

* ``cache`` imports nothing from ``pipeline`` or ``stages`` (it is storage only);
* a stage never imports another stage (shared pieces live in the library);
* the library never imports ``stages`` or the CLI (``pipeline.cli``, ``pipeline.cli.options``).

Imports anywhere in a module count, inside functions too. The checker itself is tested on a
small fake tree, so a rule that stopped seeing imports would fail here rather than pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

CLI = ("pipeline.cli",)  # the package and its modules (pipeline.cli.commands, pipeline.cli.options)


def imported_modules(path: Path, package: str) -> set[str]:
    """Every absolute module name ``path`` imports (relative imports resolved against ``package``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0]
        if top not in ("cache", "pipeline", "stages"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for name in sorted(imported_modules(path, package.removesuffix(".__init__"))):
            first = name.split(".")[0]
            if top == "cache" and first in ("pipeline", "stages"):
                problems.append(f"{rel}: storage imports the library or a stage ({name})")
            elif top == "stages" and first == "stages" and name.split(".")[:2] != module.split(".")[:2] \
                    and name != "stages":
                problems.append(f"{rel}: a stage imports another stage ({name})")
            elif top == "pipeline" and (first == "stages" or any(name == c or name.startswith(c + ".")
                                                                 for c in CLI)) \
                    and not any(module == c or module.startswith(c + ".") for c in CLI):
                problems.append(f"{rel}: the library imports a stage or the CLI ({name})")
    return problems


def test_the_repository_keeps_its_layers():
    assert violations(REPO) == []


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    files = {
        "cache/__init__.py": "",
        "cache/reader.py": "def f():\n    from pipeline.errors import UserError\n",
        "stages/__init__.py": "",
        "stages/a.py": "from stages.b import run\n",
        "stages/b.py": "from . import a\n",
        "pipeline/__init__.py": "",
        "pipeline/lib.py": "import stages.a\nfrom pipeline.cli import app\n",
        "pipeline/cli/commands.py": "import stages.a\n",  # the CLI may import stages
        "pipeline/ok.py": "from pipeline import errors\nfrom cache import format\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path)
    assert found == [
        "cache/reader.py: storage imports the library or a stage (pipeline.errors)",
        "cache/reader.py: storage imports the library or a stage (pipeline.errors.UserError)",
        "pipeline/lib.py: the library imports a stage or the CLI (pipeline.cli)",
        "pipeline/lib.py: the library imports a stage or the CLI (pipeline.cli.app)",
        "pipeline/lib.py: the library imports a stage or the CLI (stages.a)",
        "stages/a.py: a stage imports another stage (stages.b)",
        "stages/a.py: a stage imports another stage (stages.b.run)",
        "stages/b.py: a stage imports another stage (stages.a)",
    ], found
