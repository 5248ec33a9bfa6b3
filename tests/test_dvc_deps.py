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

import fnmatch
import inspect
import os
import shlex
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from pipeline.provenance import Project, Root  # the same function that fingerprints training runs
from tests.conftest import REPO

PROJECT = Project(REPO)


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """``path`` is a dep or lies in a folder that is one."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


# --------------------------------------------------------------------------- DVC's view of the stages
@cache
def dvc_stages() -> tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]:
    """``(name, cmd, deps, outs)`` of every stage in dvc.yaml, resolved by DVC; paths relative to the repo."""
    from dvc.repo import Repo

    def rel(path: str) -> str:
        return Path(os.path.relpath(path, REPO)).as_posix()

    with Repo(str(REPO)) as repo:
        stages = []
        for stage in repo.index.stages:
            if stage.path_in_repo != "dvc.yaml":
                continue
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            stages.append((stage.addressing, cmd, tuple(rel(d.fs_path) for d in stage.deps),
                           tuple(rel(o.fs_path) for o in stage.outs)))  # outs include metrics and plots
    assert stages, "dvc.yaml defines no stages"
    return tuple(stages)


# --------------------------------------------------------------------------- stage command -> code
@cache
def cli_commands() -> dict[str, object]:
    from pipeline.cli import app

    return {info.name or info.callback.__name__.replace("_", "-"): info.callback for info in app.registered_commands}


def stage_code_roots(stage: str, cmd: str) -> list[Root]:
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
    info = PROJECT.info(PROJECT.module_file(callback.__module__))
    return [(m, names, [how, f"{PROJECT.rel(info.path)}:{d}"])
            for d in sorted(info.reachable({callback.__name__})) for m, names in info.lazy.get(d, [])]


def test_every_stage_depends_on_the_code_it_runs():
    problems = []
    for stage, cmd, deps, _ in dvc_stages():
        chains = PROJECT.closure(stage_code_roots(stage, cmd))
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
    assert "pipeline/models/backbones.py" in PROJECT.closure(roots["backbone_weights"])
    assert "pipeline/models/clip_configs" in PROJECT.closure(roots["clip_train"])


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
        name = PROJECT.module_name(path)
        for imported in sorted(set(PROJECT.info(path).imports())):
            if imported.startswith("stages.") and imported != name:
                problems.append(f"{PROJECT.rel(path)} imports {imported}")
    assert not problems, "stages import other stages (shared code belongs in pipeline/):\n" + "\n".join(problems)


# --------------------------------------------------------------------------- a recipe's own project
@pytest.mark.integration
def test_a_recipe_project_runs_its_recipe_apart_from_the_default_dag(tmp_path):
    """`pipeline recipe init`: a DVC project of its own whose every stage passes params.yaml (its recipe) and
    tracks that file's sections, depends on exactly the code its command runs (derived: a module the code
    imports tomorrow is a dep without editing a list) and on its data; the default project never lists it."""
    import subprocess
    import sys

    import yaml
    from dvc.repo import Repo

    data = tmp_path / "flickr8k"
    (data / "images").mkdir(parents=True)
    (data / "captions.txt").write_text("image,caption\n", encoding="utf-8")
    project = REPO / "runs" / f"test-{os.getpid()}"  # inside the repository: a DVC subproject
    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "recipe", "init", "flickr8k-cpu", str(project),
                              "--data", str(data)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert f"cd {project} && dvc repro" in res.stdout
        params = yaml.safe_load((project / "params.yaml").read_text())
        assert params["prepare"]["sources"][0]["captions"] == str(data / "captions.txt")
        with Repo(str(project)) as repo:
            stages = {s.name: s for s in repo.index.stages}
        assert set(stages) == {"prepare", "extract", "vocab", "train", "scst", "evaluate_train", "evaluate_scst"}
        for name, stage in stages.items():
            deps = {os.path.normpath(os.path.join(project, d.def_path)) for d in stage.deps}
            command = next(a for a in shlex.split(stage.cmd)[1:] if not a.startswith("-"))
            roots = stage_code_roots(name, stage.cmd)
            code = {str(REPO / p) for p in PROJECT.closure(roots)}
            assert code and code <= deps, (name, sorted(code - deps))
            assert not {d for d in deps if d.startswith(str(REPO / "pipeline"))} - code, name  # exactly its code
            if command != "convert-weights":
                assert "--params params.yaml" in stage.cmd and [p.def_path for p in stage.params] == ["params.yaml"]
        assert str(data) in {os.path.normpath(os.path.join(project, d.def_path)) for d in stages["prepare"].deps}
        assert {o.def_path for o in stages["train"].outs} >= {"models/flickr8k/transformer/bundle",
                                                              "models/flickr8k/transformer/metrics.json"}
        main = {s.addressing for s in Repo(str(REPO)).index.stages}
        assert not any(a.startswith("runs/") or "flickr8k" in a for a in main), main
    finally:
        import shutil

        shutil.rmtree(project, ignore_errors=True)
