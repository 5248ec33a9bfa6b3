"""A dataset recipe as a DVC project of its own: ``pipeline recipe init NAME DIR``.

A recipe (``recipes/<NAME>.yaml``: a params file, e.g. ``flickr8k-cpu``) becomes a folder holding
``params.yaml`` (the recipe, its dataset paths pointed at ``--data``), ``dvc.yaml`` and ``.dvc/``.
``cd DIR && dvc repro`` then runs prepare → extract → vocab → train → scst (→ finetune) → evaluate, each a
`pipeline` command with ``--params params.yaml``, and reruns only what
a change reaches. It lives outside the default project's pipeline: the default project's
``dvc status`` never lists it (DVC leaves a folder with its own ``.dvc`` to that project).

Nothing in the generated ``dvc.yaml`` is listed by hand: each stage's inputs and outputs are the
paths its config resolves to, and its code deps are the files :func:`pipeline.provenance.code_closure`
finds behind the stage's command (the function that fingerprints training runs), as paths relative
to the project, so an edit to the pipeline's code reruns exactly the stages that run it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from pipeline.config import load_config, load_train_config, read_params
from pipeline.errors import ConfigError
from pipeline.files import write_text
from pipeline.provenance import ROOT, code_closure

RECIPES_DIR = ROOT / "recipes"  # the dataset recipes of a clone (params files)
PARAMS = "params.yaml"
# The paths a source kind reads its data from (prepare's sources): the stage depends on them.
SOURCE_PATH_KEYS = ("annotations", "captions", "images", "split_lists", "path", "karpathy")


def dataset_recipes() -> dict[str, Path]:
    """``{name: file}`` of the dataset recipes (``recipes/*.yaml``)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """A dataset recipe's one-line summary: its first comment line."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip()
    return ""


def recipe_file(name: str) -> Path:
    recipes = dataset_recipes()
    if name not in recipes:
        known = ", ".join(recipes) or f"none in {RECIPES_DIR}"
        raise ConfigError(f"unknown dataset recipe {name!r}; known: {known}")
    return recipes[name]


def _point_sources_at(params: dict[str, Any], data: Path) -> None:
    """Rewrite the recipe's dataset paths (``data/<folder>/...``) to lie in ``data`` instead."""
    for source in params.get("prepare", {}).get("sources", []):
        for key in SOURCE_PATH_KEYS:
            value = source.get(key)
            if isinstance(value, str):
                parts = Path(value).parts
                source[key] = str(data.joinpath(*parts[2:])) if len(parts) > 1 and parts[0] == "data" else value


class _Project:
    """The stages of one recipe project, written relative to its folder."""

    def __init__(self, directory: Path, params_file: Path) -> None:
        self.dir = directory.resolve()
        self.params_file = params_file
        self.stages: dict[str, dict[str, Any]] = {}

    def rel(self, path: Path | str) -> str:
        path = Path(path)
        return os.path.relpath(path if path.is_absolute() else self.dir / path, self.dir)

    def code(self, entry: str) -> list[str]:
        return sorted(self.rel(ROOT / f) for f in code_closure(entry))

    def add(self, name: str, cmd: str, entry: str, *, deps: list, outs: list, params: Optional[list[str]] = None,
            persist: tuple = (), metrics: tuple = (), plots: tuple = ()) -> None:
        data = {self.rel(d) for d in deps}
        data = {d for d in data if not any(Path(o) in Path(d).parents for o in data)}  # a folder covers its files
        stage: dict[str, Any] = {"cmd": cmd, "deps": self.code(entry) + sorted(data)}
        if params:
            stage["params"] = [{PARAMS: params}]
        stage["outs"] = [{self.rel(o): {"persist": True}} if o in persist else self.rel(o) for o in outs]
        if metrics:
            stage["metrics"] = [{self.rel(m): {"cache": False}} for m in metrics]
        if plots:
            stage["plots"] = [{self.rel(p): {"cache": False, "x": "step"}} for p in plots]
        self.stages[name] = stage


def _training_outputs(out: Path) -> dict[str, Any]:
    return dict(outs=[out / "bundle", out / "checkpoints"], persist=(out / "checkpoints",),
                metrics=(out / "metrics.json",), plots=(out / "live" / "plots" / "metrics",))


def init_recipe_project(name: str, directory: Path, data: Optional[Path] = None) -> Path:
    """Write the recipe ``name`` as a DVC project in ``directory`` (created; must not hold a dvc.yaml yet);
    ``data``: the dataset folder (default: the recipe's own ``data/...`` paths inside ``directory``).
    Returns the ``dvc.yaml`` written."""
    import yaml

    from pipeline.models.convert import PACKAGE_PREFIX

    directory = Path(directory)
    if (directory / "dvc.yaml").exists():
        raise ConfigError(f"{directory / 'dvc.yaml'} exists: choose an empty folder for the recipe's project")
    params = read_params(recipe_file(name))
    if data is not None:
        if not Path(data).is_dir():
            raise ConfigError(f"--data {data}: no such folder (the dataset in the {name} recipe's importer layout)")
        _point_sources_at(params, Path(data).resolve())
    directory.mkdir(parents=True, exist_ok=True)
    params_file = directory / PARAMS
    write_text(params_file, f"# The {name} recipe (recipes/{name}.yaml); `pipeline <stage> --help` documents each "
                            "key.\n" + yaml.safe_dump(params, sort_keys=False, allow_unicode=True))

    def config(section: str):
        cwd = Path.cwd()
        os.chdir(directory)  # the recipe's relative paths are the project's
        try:
            return load_train_config(Path(PARAMS)) if section == "train" else load_config(section, Path(PARAMS))
        finally:
            os.chdir(cwd)

    project = _Project(directory, params_file)
    run = f"--params {PARAMS}"
    prepare, extract, vocab = config("prepare"), config("extract"), config("vocab")
    sources = [Path(v) for s in params["prepare"]["sources"] for k, v in s.items()
               if k in SOURCE_PATH_KEYS and isinstance(v, str)]
    weights = extract.weights
    if weights is not None and str(weights).startswith(PACKAGE_PREFIX):
        weights = None  # weights a pip package ships (requirements.lock pins it): read in place, no file to track
    project.add("prepare", f"pipeline prepare {run}", "stages.prepare:run", deps=sources, outs=[prepare.out_dir],
                params=["prepare"])
    project.add("extract", f"pipeline extract {run}", "stages.extract:run",
                deps=[extract.manifest, *sources, *([weights] if weights else [])],
                outs=[extract.out_dir], persist=(extract.out_dir,), params=["extract"])
    project.add("vocab", f"pipeline vocab {run}", "stages.vocab:run", deps=[vocab.manifest], outs=[vocab.out_dir],
                params=["vocab"])
    train = config("train")
    project.add("train", f"pipeline train {run}", "stages.train:run",
                deps=[train.manifest, train.features, train.tokenizer], params=["train", f"decoders.{train.decoder}"],
                **_training_outputs(train.output_dir))
    evaluated = {"train": train.output_dir}
    if "scst" in params:
        scst = config("scst")
        project.add("scst", f"pipeline scst {run}", "stages.scst:run", deps=[scst.manifest, scst.features, scst.bundle],
                    params=["scst"], **_training_outputs(scst.out_dir))
        evaluated["scst"] = scst.out_dir
    if "finetune" in params:
        finetune = config("finetune")
        project.add("finetune", f"pipeline finetune {run}", "stages.finetune:run",
                    deps=[finetune.manifest, finetune.bundle, *sources], params=["finetune"],
                    **_training_outputs(finetune.out_dir))
        evaluated["finetune"] = finetune.out_dir
    evaluate = config("evaluate")
    for key, model in evaluated.items():
        reports = Path("reports") / key
        features = [] if key == "finetune" else [evaluate.features]
        flag = " --features none" if key == "finetune" else ""
        project.add(f"evaluate_{key}", f"pipeline evaluate {run} --model {model / 'bundle'} --out-dir {reports}"
                    f"{flag}", "stages.evaluate:run", deps=[model / "bundle", evaluate.manifest, *features, *sources],
                    params=["evaluate"], metrics=(reports / "metrics.json",),
                    outs=[reports / "results.json", reports / "per_image.json", reports / "config.json",
                          *([reports / "gallery"] if evaluate.gallery_size > 0 else [])])
    dvc_yaml = directory / "dvc.yaml"
    header = (f"# The {name} recipe as a DVC pipeline, written by `pipeline recipe init {name}`: run `dvc repro` here.\n"
              "# Every stage's code deps are the pipeline files its command runs (derived from the imports);\n"
              "# rerun `pipeline recipe init` in a new folder after pulling new pipeline code that adds modules.\n")
    write_text(dvc_yaml, header + yaml.safe_dump({"stages": project.stages}, sort_keys=False))
    _init_dvc(directory)
    return dvc_yaml


def _init_dvc(directory: Path) -> None:
    """``dvc init`` in ``directory`` (``--subdir`` inside a git repository, else, or where git ignores the folder,
    without git), analytics and update checks off (no network)."""
    from dvc.exceptions import InitError
    from dvc.repo import Repo

    if (directory / ".dvc").is_dir():
        return
    here = directory.resolve()
    in_git = any((folder / ".git").exists() for folder in [here, *here.parents])
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)  # DVC's "Initialized DVC repository" banner; the command says what it did
    try:
        try:
            repo = Repo.init(str(directory), subdir=in_git, no_scm=not in_git)
        except InitError:  # e.g. a folder git ignores (runs/): a project without git
            repo = Repo.init(str(directory), no_scm=True)
    finally:
        dvc_log.setLevel(level)
    with repo.config.edit() as conf:
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
    repo.close()
