"""What a result depends on, derived from the code and the data, never listed by hand.

:func:`code_closure` reads the project's own modules (``pipeline``, ``stages``, ``cache``) with
:mod:`ast` and follows every import that running an entry point may execute: module-level
imports whenever a module is imported; an import inside a function only when that function (or
its class, or a function it mentions) may run. Package data a module names (e.g.
``pipeline/models/clip_configs``) comes along. The same function answers two questions:

* which files a training checkpoint was computed with (:func:`code_digests`, recorded in its
  fingerprint by :mod:`pipeline.training.runs`: a checkpoint of other code is never resumed);
* which files a DVC stage must list as deps (``tests/test_dvc_deps.py`` checks ``dvc.yaml``),

so the two can never disagree, and a module added tomorrow is covered without editing a list.

Static, not ``sys.modules``: the answer is the same in every process, whatever else it imported.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import platform
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pipeline.files import write_json

log = logging.getLogger(__name__)

PACKAGES = ("pipeline", "stages", "cache")  # the project's own top-level packages
# Where they live: the repository in a development install, site-packages otherwise.
ROOT = Path(__file__).resolve().parents[1]

# Modules that are never part of a stage's code (nor followed to what they import):
EXEMPT = {
    # The CLI entry modules: every stage runs through them (`pipeline <command>` parses options, loads the
    # config, calls the stage's ``run``), so counting them would rerun the whole DAG on any edit to any
    # command, which DVC's own guidance advises against for a shared CLI wrapper. What a stage computes
    # lives in the modules its command calls, and those are counted.
    "pipeline/cli/__init__.py": "CLI package: re-exports the app",
    "pipeline/cli/__main__.py": "`python -m pipeline.cli`",
    "pipeline/cli/commands.py": "CLI entry module shared by every stage",
    "pipeline/cli/options.py": "CLI option plumbing shared by every stage",
    # The user-facing error marker, imported by nearly every module and by the CLI: it only decides how a
    # failure is reported, never what a stage writes, so an edit to it cannot change any output.
    "pipeline/errors.py": "error marker shared by every module; cannot change a stage's outputs",
    # The check that a command run by hand does not replace outputs DVC tracks for another: it decides whether
    # a command may run, never what it writes.
    "pipeline/tracked.py": "refuses hand-run commands over tracked outputs; cannot change a stage's outputs",
}
# Also exempt: package ``__init__.py`` files that hold only a docstring and constants (see ``_inert``);
# importing any submodule runs them, but they cannot change what a stage computes. One that gains code
# (imports, functions, classes) counts like any module.

ALL = None  # "every top-level function and class of the module may run" (``import m``, ``from m import *``)
Wanted = Optional[frozenset]
Root = tuple[str, Wanted, list[str]]  # (module, names used from it, how it was reached)


class Project:
    """The project's modules under one root folder (the repository, or a test's fake tree)."""

    def __init__(self, root: Path = ROOT, packages: Iterable[str] = PACKAGES, exempt: Iterable[str] = EXEMPT):
        self.root = Path(root)
        self.packages = tuple(packages)
        self.exempt = frozenset(exempt)
        self._infos: dict[Path, ModuleInfo] = {}

    def module_file(self, name: str) -> Optional[Path]:
        """``pipeline.text.tokenizers`` -> its file (a package -> its ``__init__.py``); None outside the project."""
        if not name or name.split(".")[0] not in self.packages:
            return None
        base = self.root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def module_name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def info(self, path: Path) -> "ModuleInfo":
        if path not in self._infos:
            self._infos[path] = ModuleInfo(self, path)
        return self._infos[path]

    def closure(self, roots: list[Root]) -> dict[str, list[str]]:
        """Files of the project that running ``roots`` may import -> the import chain that reaches each.

        A module's module-level imports count whenever it is imported; an import inside a function counts
        only when that function (or its class) may run: it is one of the names taken from the module, or one
        they mention, or one the module's own top-level code calls. (So `prepare` loading its config from
        pipeline/config.py does not depend on the decoders that only ``load_train_config`` imports.) Exempt
        modules are neither counted nor followed."""
        chains: dict[str, list[str]] = {}
        used: dict[str, set[str]] = {}
        todo = list(roots)
        while todo:
            name, wanted, chain = todo.pop()
            path = self.module_file(name)
            if path is None or self.rel(path) in self.exempt:
                continue
            rel, info = self.rel(path), self.info(path)
            if rel not in used:
                used[rel] = set()
                here = chain + [rel]
                if not info.inert():
                    chains[rel] = here
                for data in info.package_data():
                    chains.setdefault(self.rel(data), here + [f"{self.rel(data)} (package data)"])
                todo += [(m, names, here) for m, names in info.eager]
                todo.append((name, frozenset(info.at_import), chain))
            for d in sorted(info.reachable(wanted) - used[rel]):
                used[rel].add(d)
                todo += [(m, names, chain + [f"{rel}:{d}"]) for m, names in info.lazy.get(d, [])]
        return chains


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class ModuleInfo:
    """One module's imports, split by when they run.

    ``eager``: imports run when the module is imported (module level, class bodies). ``lazy[name]``: imports
    inside the functions of top-level function or class ``name``, run only when it is used. ``refs[name]``:
    the module's other top-level functions and classes ``name`` mentions. ``at_import``: the ones module-level
    code calls or decorates with. ``if TYPE_CHECKING:`` blocks never run and are skipped.
    """

    def __init__(self, project: Project, path: Path):
        self.project, self.path = project, path
        self.name, self.is_package = project.module_name(path), path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.eager: list[tuple[str, Wanted]] = []
        self.lazy: dict[str, list[tuple[str, Wanted]]] = {}
        self.defs: dict[str, ast.AST] = {}
        self.at_import: set[str] = set()
        self._visit(self.tree, owner=None, in_function=False)
        self.refs = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in self.defs} - {name}
                     for name, node in self.defs.items()}
        self.at_import &= set(self.defs)

    def imports(self) -> list[str]:
        """Every module this one imports, anywhere."""
        return [m for m, _ in self.eager] + [m for targets in self.lazy.values() for m, _ in targets]

    def _targets(self, node: ast.Import | ast.ImportFrom) -> list[tuple[str, Wanted]]:
        """What one import statement runs: ``(module, names it takes from it)``; parent packages with no names."""
        def parents(name: str) -> list[tuple[str, Wanted]]:
            parts = name.split(".")
            return [(".".join(parts[:i]), frozenset()) for i in range(1, len(parts))]

        if isinstance(node, ast.Import):
            return [t for alias in node.names for t in [*parents(alias.name), (alias.name, ALL)]]
        if node.level:
            package = self.name if self.is_package else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        names = [a.name for a in node.names]
        out = [*parents(base), (base, ALL if "*" in names else frozenset(names))]
        out += [(f"{base}.{n}", ALL) for n in names  # submodules taken by name
                if n != "*" and self.project.module_file(f"{base}.{n}") is not None]
        return out

    def _visit(self, node: ast.AST, owner: Optional[str], in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                self._visit(child, owner, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = self._targets(node)
            (self.lazy.setdefault(owner, []) if in_function else self.eager).extend(targets)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if owner is None:
                owner = node.name
                self.defs[owner] = node
            # decorators, bases and defaults run when the definition runs; a function's body only when called
            for expr in [*node.decorator_list, *getattr(node, "bases", []), *getattr(node, "keywords", [])]:
                self.at_import |= {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
                self._visit(expr, owner, in_function)
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    self._visit(child, owner, in_function)
            else:
                for expr in [*node.args.defaults, *node.args.kw_defaults]:
                    if expr is not None:
                        self._visit(expr, owner, in_function)
                for child in node.body:
                    self._visit(child, owner, True)
            return
        if isinstance(node, ast.Call) and not in_function:  # module-level or class-body code calling a def
            self.at_import |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        for child in ast.iter_child_nodes(node):
            self._visit(child, owner, in_function)

    def reachable(self, wanted: Wanted) -> set[str]:
        """Top-level functions and classes that may run when ``wanted`` (names taken from the module) are used."""
        todo = set(self.defs) if wanted is ALL else set(wanted) & set(self.defs)
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo |= self.refs[name]
        return seen

    def inert(self) -> bool:
        """A package ``__init__.py`` holding only a docstring and constant assignments."""
        if not self.is_package:
            return False
        for node in self.tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            return False
        return True

    def package_data(self) -> list[Path]:
        """Non-Python files and folders next to the module that it names in a string
        (``Path(__file__).with_name(...)``, ``resources.files(pkg) / "static"``). Subpackages are code, reached
        through imports, not data."""
        strings = {n.value for n in ast.walk(self.tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        return [p for p in sorted(self.path.parent.iterdir())
                if p.name in strings and p.suffix != ".py" and p.name != "__pycache__" and not p.name.startswith(".")
                and not (p / "__init__.py").is_file()]


# --------------------------------------------------------------------------- entry points
def entry_roots(entry: str) -> list[Root]:
    """``"stages.train:run"`` -> the closure's root: that function of that module."""
    module, _, function = entry.partition(":")
    return [(module, frozenset({function}) if function else ALL, [entry])]


def code_closure(entry: str, project: Optional[Project] = None) -> dict[str, list[str]]:
    """The project's files that calling ``entry`` ("module:function") may run -> how each is reached."""
    return (project or _project()).closure(entry_roots(entry))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and "__pycache__" not in p.parts)
    for p in files:
        if p != path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def code_digests(entry: str, project: Optional[Project] = None) -> dict[str, str]:
    """``{relative path: sha256}`` of every file :func:`code_closure` finds for ``entry`` (a folder of package
    data: over its files' names and bytes)."""
    project = project or _project()
    return {rel: _sha256_of(project.root / rel) for rel in sorted(code_closure(entry, project))}


@lru_cache(maxsize=1)
def _project() -> Project:
    return Project()


# --------------------------------------------------------------------------- checkpoints' fingerprints
# Options that do not change what a run computes: a checkpoint written under other values resumes.
RESUMABLE_ACROSS = ("out_dir", "device", "checkpoint_every", "workers", "threads")
# Libraries whose release changes the numbers a run computes (recorded in every fingerprint).
LIBRARIES = ("torch", "numpy", "timm", "transformers", "tokenizers", "open_clip_torch", "safetensors")


def files_sha256(paths: Sequence[Path], root: Optional[Path] = None) -> str:
    """sha256 over each file's name (relative to ``root``, else its base name) and bytes, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def tree_sha256(directory: Path) -> str:
    """sha256 of every file under ``directory`` (relative names and bytes, sorted): e.g. a bundle's content."""
    directory = Path(directory)
    return files_sha256(sorted(p for p in directory.rglob("*") if p.is_file()), directory)


def environment() -> dict[str, Optional[str]]:
    """Python's and :data:`LIBRARIES`' versions (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: installed(name) for name in LIBRARIES}}


def run_fingerprint(config: dict[str, Any], inputs: dict[str, Any], entry: str) -> dict[str, Any]:
    """Everything a checkpoint depends on: the config (a stage config's ``config_to_dict``, minus
    :data:`RESUMABLE_ACROSS`), the inputs' content hashes, the code that calling ``entry`` ("module:function",
    the stage's ``run``) may execute, each file by its sha256 (:func:`code_digests`: the function that also
    checks dvc.yaml's deps), and the libraries' versions."""
    return {
        "config": {k: v for k, v in config.items() if k not in RESUMABLE_ACROSS},
        "inputs": dict(inputs),
        "code": code_digests(entry),
        "environment": environment(),
    }


def fingerprint_changes(found: Any, wanted: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, as ``section.key`` names (``code.pipeline/training/optim.py``)."""
    if not isinstance(found, dict) or set(found) != set(wanted):
        return ["the fingerprint's format"]
    changes = []
    for section in wanted:
        old, new = found[section], wanted[section]
        if not isinstance(old, dict):
            changes.append(section)
            continue
        changes += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return changes


def discard_stale_checkpoints(directory: Path, wanted: dict[str, Any]) -> None:
    """Delete checkpoints written for other settings, inputs, code or libraries (one line says which); record
    ``wanted`` beside new ones."""
    marker = directory / "fingerprint.json"
    if directory.exists():
        try:
            found = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else None
        except json.JSONDecodeError:
            found = None
        if found != wanted:
            changes = fingerprint_changes(found, wanted) if found is not None else ["no fingerprint recorded"]
            shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
            log.warning("checkpoints in %s were computed from something else (%s): starting afresh", directory, shown)
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(marker, wanted)
