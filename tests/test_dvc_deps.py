"""dvc.yaml declares what each stage reads, so `dvc repro` reruns a stage whenever one of its inputs changes.

For every stage (as DVC resolves it: ``foreach`` expanded, ``${...}`` filled in from params.yaml):

* its code: the stage command's module (found through ``pipeline.cli``, not a table kept here) and every
  module of this project it imports, transitively (module-level and function-level imports, relative
  imports, parent packages, ``from package import submodule``), plus the package data a module names
  (e.g. ``pipeline/models/clip_configs``), must each be a dep of the stage or lie in a folder that is;
* `report` must depend on every file it reads besides its code: the evaluation reports, the training
  summaries ``models/<name>/metrics.json`` and the dvclive curves ``models/<name>/live/plots/metrics``
  that other stages write, as :class:`pipeline.config.ReportConfig`'s patterns select them.

Only reads the repository (no stage runs).
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import os
import shlex
from functools import cache
from pathlib import Path, PurePosixPath


from tests.conftest import REPO

PACKAGES = ("pipeline", "stages", "cache")  # the project's own top-level packages

# Modules that are never required as deps (nor followed to what they import):
EXEMPT = {
    # The CLI entry modules: every stage runs through them (`pipeline <command>` parses options, loads the
    # config, calls the stage's ``run``), so declaring them would rerun the whole DAG on any edit to any
    # command, which DVC's own guidance advises against for a shared CLI wrapper. What a stage computes
    # lives in the modules its command calls, and those are checked.
    "pipeline/cli.py": "CLI entry module shared by every stage",
    "pipeline/cli_options.py": "CLI option plumbing shared by every stage",
    # The user-facing error marker, imported by nearly every module and by the CLI: it only decides how a
    # failure is reported, never what a stage writes, so an edit to it cannot change any output.
    "pipeline/errors.py": "error marker shared by every module; cannot change a stage's outputs",
}
# Also exempt: package ``__init__.py`` files that hold only a docstring and constants (see ``_inert``);
# importing any submodule runs them, but they cannot change what a stage computes. One that gains code
# (imports, functions, classes) is checked like any module.


# --------------------------------------------------------------------------- DVC's view of the stages
@cache
def dvc_stages() -> tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]:
    """``(name, cmd, deps, outs)`` of every stage in dvc.yaml and in the recipes' pipelines
    (``recipes/*/dvc.yaml``), resolved by DVC; paths relative to the repo."""
    from dvc.repo import Repo

    def rel(path: str) -> str:
        return Path(os.path.relpath(path, REPO)).as_posix()

    with Repo(str(REPO)) as repo:
        stages = []
        for stage in repo.index.stages:
            if stage.path_in_repo != "dvc.yaml" and not stage.path_in_repo.startswith("recipes/"):
                continue
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            stages.append((stage.addressing, cmd, tuple(rel(d.fs_path) for d in stage.deps),
                           tuple(rel(o.fs_path) for o in stage.outs)))  # outs include metrics and plots
    assert stages, "dvc.yaml defines no stages"
    return tuple(stages)


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """``path`` is a dep or lies in a folder that is one."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


# --------------------------------------------------------------------------- project modules
ALL = None  # "every top-level function and class of the module may run" (``import m``, ``from m import *``)
Wanted = "frozenset[str] | None"


def _module_file(name: str) -> Path | None:
    """``pipeline.text.tokenizers`` -> its file (a package -> its ``__init__.py``); None outside the project."""
    if not name or name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[tuple[str, Wanted]]:
    """What one import statement runs: ``(module, names it takes from it)``; parent packages with no names."""
    def parents(name: str) -> list[tuple[str, Wanted]]:
        parts = name.split(".")
        return [(".".join(parts[:i]), frozenset()) for i in range(1, len(parts))]

    if isinstance(node, ast.Import):
        return [t for alias in node.names for t in [*parents(alias.name), (alias.name, ALL)]]
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    names = [a.name for a in node.names]
    out = [*parents(base), (base, ALL if "*" in names else frozenset(names))]
    out += [(f"{base}.{n}", ALL) for n in names if n != "*" and _module_file(f"{base}.{n}") is not None]  # submodules
    return out


class ModuleInfo:
    """One module's imports, split by when they run.

    ``eager``: imports run when the module is imported (module level, class bodies). ``lazy[name]``: imports
    inside the functions of top-level function or class ``name``, run only when it is used. ``refs[name]``:
    the module's other top-level functions and classes ``name`` mentions. ``at_import``: the ones module-level
    code calls or decorates with. ``if TYPE_CHECKING:`` blocks never run and are skipped.
    """

    def __init__(self, path: Path):
        self.path, self.name, self.is_package = path, _module_name(path), path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.eager: list[tuple[str, Wanted]] = []
        self.lazy: dict[str, list[tuple[str, Wanted]]] = {}
        self.defs: dict[str, ast.AST] = {}
        self.at_import: set[str] = set()
        self._visit(self.tree, owner=None, in_function=False)
        self.refs = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in self.defs} - {name}
                     for name, node in self.defs.items()}
        self.at_import &= set(self.defs)

    def _visit(self, node: ast.AST, owner: str | None, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                self._visit(child, owner, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = _targets(node, self.name, self.is_package)
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


@cache
def _info(path: Path) -> ModuleInfo:
    return ModuleInfo(path)


def _inert(info: ModuleInfo) -> bool:
    """A package ``__init__.py`` holding only a docstring and constant assignments."""
    if not info.is_package:
        return False
    for node in info.tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        return False
    return True


def _package_data(info: ModuleInfo) -> list[Path]:
    """Non-Python files and folders next to a module that it names in a string (``Path(__file__).with_name(...)``,
    ``resources.files(pkg) / "static"``). Subpackages are code, reached through imports, not data."""
    strings = {n.value for n in ast.walk(info.tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return [p for p in sorted(info.path.parent.iterdir())
            if p.name in strings and p.suffix != ".py" and p.name != "__pycache__" and not p.name.startswith(".")
            and not (p / "__init__.py").is_file()]


def closure(roots: list[tuple[str, Wanted, list[str]]]) -> dict[str, list[str]]:
    """Files of the project that running the roots may import -> the import chain that reaches each.

    ``roots``: ``(module, names used from it, how it was reached)``. A module's module-level imports count
    whenever it is imported; an import inside a function counts only when that function (or its class) may
    run: it is one of the names taken from the module, or one they mention, or one the module's own
    top-level code calls. (So `prepare` loading its config from pipeline/config.py does not depend on the
    decoders that only `load_train_config` imports.) Exempt modules are neither required nor followed.
    """
    chains: dict[str, list[str]] = {}
    used: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name, wanted, chain = todo.pop()
        path = _module_file(name)
        if path is None or _rel(path) in EXEMPT:
            continue
        rel, info = _rel(path), _info(path)
        if rel not in used:
            used[rel] = set()
            here = chain + [rel]
            if not _inert(info):
                chains[rel] = here
            for data in _package_data(info):
                chains.setdefault(_rel(data), here + [f"{_rel(data)} (package data)"])
            todo += [(m, names, here) for m, names in info.eager]
            todo.append((name, frozenset(info.at_import), chain))
        for d in sorted(info.reachable(wanted) - used[rel]):
            used[rel].add(d)
            todo += [(m, names, chain + [f"{rel}:{d}"]) for m, names in info.lazy.get(d, [])]
    return chains


def all_imports(info: ModuleInfo) -> list[str]:
    return [m for m, _ in info.eager] + [m for targets in info.lazy.values() for m, _ in targets]


# --------------------------------------------------------------------------- stage command -> code
@cache
def cli_commands() -> dict[str, object]:
    from pipeline.cli import app

    return {info.name or info.callback.__name__.replace("_", "-"): info.callback for info in app.registered_commands}


def stage_code_roots(stage: str, cmd: str) -> list[tuple[str, Wanted, list[str]]]:
    """What a stage's ``pipeline <command> ...`` runs: the ``run`` a ``stage_command`` registered (its
    ``"module:function"`` target), or, for a command defined in the CLI module itself, what that function
    (and the CLI module's helpers it calls) imports."""
    argv = shlex.split(cmd)
    assert argv and argv[0] == "pipeline", (
        f"stage {stage!r}: cmd {cmd!r} is not a `pipeline <command>`; this test cannot tell what code it runs")
    command = next((a for a in argv[1:] if not a.startswith("-")), None)
    callbacks = cli_commands()
    assert command in callbacks, f"stage {stage!r}: `pipeline {command}` is not a command of pipeline.cli"
    callback = callbacks[command]
    how = f"`pipeline {command}`"
    target = inspect.getclosurevars(callback).nonlocals.get("target")  # stage_command's "module:function"
    if isinstance(target, str) and ":" in target:
        module, func = target.split(":")
        return [(module, frozenset({func}), [how])]
    info = _info(_module_file(callback.__module__))
    return [(m, names, [how, f"{_rel(info.path)}:{d}"])
            for d in sorted(info.reachable({callback.__name__})) for m, names in info.lazy.get(d, [])]


def test_every_stage_depends_on_the_code_it_runs():
    problems = []
    for stage, cmd, deps, _ in dvc_stages():
        chains = closure(stage_code_roots(stage, cmd))
        assert chains, f"stage {stage!r}: found no project code behind {cmd!r}"
        for path, chain in sorted(chains.items()):
            if not covered(path, deps):
                problems.append(f"stage {stage!r} does not declare {path} (imported via {' -> '.join(chain)})")
    assert not problems, "dvc.yaml deps miss code the stages run:\n" + "\n".join(problems)


def test_the_mapping_finds_each_stage_module():
    """Guards the test itself: a stage command resolves to its own ``stages/<name>.py``."""
    roots = {stage: stage_code_roots(stage, cmd) for stage, cmd, _, _ in dvc_stages()}
    assert roots["report"] == [("stages.report", frozenset({"run"}), ["`pipeline report`"])]
    assert roots["evaluate@transformer"] == [("stages.evaluate", frozenset({"run"}), ["`pipeline evaluate`"])]
    assert roots["clip_train"] == [("stages.clip_train", frozenset({"run"}), ["`pipeline clip-train`"])]
    assert "pipeline/models/backbones.py" in closure(roots["backbone_weights"])
    assert "pipeline/models/clip_configs" in closure(roots["clip_train"])


# --------------------------------------------------------------------------- report's data inputs
def _glob_match(path: str, pattern: str) -> bool:
    """``glob.glob`` semantics on a relative path: ``*`` within one segment, ``**`` across any number."""
    def match(p: list[str], q: list[str]) -> bool:
        if not q:
            return not p
        if q[0] == "**":
            return any(match(p[i:], q[1:]) for i in range(len(p) + 1))
        return bool(p) and fnmatch.fnmatchcase(p[0], q[0]) and match(p[1:], q[1:])

    return match(path.split("/"), PurePosixPath(os.path.normpath(pattern)).as_posix().split("/"))


def report_inputs() -> dict[str, str]:
    """Outputs of other stages that `report` reads -> why."""
    from pipeline.config import load_config

    cfg = load_config("report", REPO / "params.yaml", {})
    outs = {o: stage for stage, _, _, stage_outs in dvc_stages() if stage != "report" for o in stage_outs}
    needed: dict[str, str] = {}
    for out, stage in outs.items():
        # evaluation reports: cfg.reports names metrics.json files or their folders
        if any(_glob_match(out, p) or _glob_match(out, f"{p}/metrics.json") for p in cfg.reports):
            needed[out] = f"{stage}'s evaluation report (report.reports={cfg.reports})"
        # dvclive folders: report plots <live>/plots/metrics/**/*.tsv and reads <live>/../metrics.json
        parts = out.split("/")
        for i in range(1, len(parts) + 1):
            live = "/".join(parts[:i])
            if any(_glob_match(live, p) for p in cfg.live):
                curves = f"{live}/plots/metrics"
                if covered(out, (curves,)) or covered(curves, (out,)):
                    needed[out] = f"{stage}'s dvclive curves (report.live={cfg.live})"
                summary = f"{PurePosixPath(live).parent}/metrics.json"
                if summary in outs:
                    needed[summary] = f"{outs[summary]}'s training summary, next to its dvclive folder {live}"
        # training summaries: report reads <bundle>/../metrics.json of each evaluated bundle (the main DAG's:
        # a recipe pipeline's evaluations lie outside report.reports, which the first rule checks)
        in_main_dag = ":" not in stage  # recipes/<name>/dvc.yaml:<stage> for the recipes' pipelines
        if in_main_dag and out.endswith("/bundle") and f"{PurePosixPath(out).parent}/metrics.json" in outs:
            summary = f"{PurePosixPath(out).parent}/metrics.json"
            needed[summary] = f"{outs[summary]}'s training summary, next to its bundle {out}"
    return needed


def test_report_depends_on_the_metrics_and_curves_it_reads():
    needed = report_inputs()
    assert any(p.startswith("models/") and p.endswith("/metrics.json") for p in needed), needed
    assert any(p.endswith("/live/plots/metrics") for p in needed), needed
    deps = next(deps for stage, _, deps, _ in dvc_stages() if stage == "report")
    missing = [f"stage 'report' does not declare {path} ({why})" for path, why in sorted(needed.items())
               if not covered(path, deps)]
    assert not missing, "dvc.yaml: report reads files it does not depend on:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- stages stay independent
# strict: once the refactor moves the shared code into the library this passes, and the marker must go
def test_no_stage_imports_another_stage():
    problems = []
    for path in sorted((REPO / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        name = _module_name(path)
        for imported in sorted(set(all_imports(_info(path)))):
            if imported.startswith("stages.") and imported != name:
                problems.append(f"{_rel(path)} imports {imported}")
    assert not problems, "stages import other stages (shared code belongs in pipeline/):\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the recipes' own pipelines
def test_recipe_pipelines_run_their_recipe_and_leave_the_default_dag_alone():
    """recipes/<name>/dvc.yaml: every stage passes one recipe file as ``--params`` and DVC tracks that
    same file's sections as its params, and none of its outputs is one of the default DAG's."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = [s for s in repo.index.stages if s.path_in_repo.startswith("recipes/")]
    assert {s.addressing.split(":")[-1] for s in stages} >= {"prepare", "extract", "vocab", "train", "scst",
                                                             "evaluate@scst"}
    main_outs = {o for stage, _, _, outs in dvc_stages() if ":" not in stage for o in outs}
    for stage in stages:
        params_files = {Path(os.path.relpath(p.fs_path, REPO)).as_posix() for p in stage.params}
        if stage.addressing.endswith(":backbone_weights"):
            assert not params_files
            continue
        argv = shlex.split(stage.cmd)
        recipe = argv[argv.index("--params") + 1]
        assert params_files == {recipe} and recipe.startswith("recipes/"), (stage.addressing, params_files)
        outs = {Path(os.path.relpath(o.fs_path, REPO)).as_posix() for o in stage.outs}
        assert not outs & main_outs, (stage.addressing, outs & main_outs)
