"""Docs cannot go stale: every command, module, link and code path the README and docs/ show is checked.

* Every fenced shell block (```bash, ```sh, ```shell, ```console) of README.md and docs/**/*.md is read line
  by line (continuation lines joined, ``# comments`` dropped, ``&&`` / ``;`` / ``|`` split): each
  ``pipeline ...`` command (also ``python -m pipeline.cli ...`` and ``torchrun ... -m pipeline.cli ...``) is
  resolved on the real CLI (``typer.main.get_command(pipeline.cli.app)``, command groups such as
  ``pipeline recipe init`` included); every ``--option`` must exist on that command and take a value exactly
  when the CLI option does (``--no-x`` forms of boolean flags count), a value must be of the option's kind
  (``<int>``, ``<float>``, a choice, JSON), and the command must not get more arguments than it takes.
  Placeholders (``NAME``, ``PATH/TO/DIR``, ``models/NAME/bundle``, ``...``) count as values of any kind;
  ``...`` where an option or argument would be ends the check of that command.
* ``python -m bench...`` modules exist; ``dvc repro STAGE`` names a stage of dvc.yaml; ``dvc exp run -S
  section.key=...`` names a params key.
* Every relative link of README.md, CHANGELOG.md and docs/ resolves to an existing file (the part before
  ``#``; ``mkdocs build --strict`` checks anchors); a docs page links only inside docs/ (what mkdocs can build).
* Code paths in inline code (``pipeline/serve/app.py``) exist, and dotted names (``pipeline.serve.settings.
  ServeSettings``) name a module and a top-level name in it (read with :mod:`ast`, nothing imported).
* mkdocs.yml's nav lists every page of docs/, and docs/architecture.md names every module of pipeline/,
  stages/ and cache/.

The checker is tested too: lines that are wrong in each way are reported.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock
from urllib.parse import unquote

import pytest
import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SEPARATORS = {"&&", "||", ";", "|", "&"}
ELLIPSIS = ("...", "…")
PLACEHOLDER_WORD = re.compile(r"(?<![A-Za-z])[A-Z][A-Z0-9_]*[A-Z0-9](?![a-z])")  # NAME, PATH, SRC, FLICKR8K
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "0", "1"}
PYTHONS = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
CODE_PATH = re.compile(r"^(?:pipeline|stages|cache|tests|bench|recipes|docs)/[\w./-]*[\w/]$")
DOTTED = re.compile(r"^(?:pipeline|stages|cache|bench)(?:\.\w+)+")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --------------------------------------------------------------------------- reading the shell blocks
@dataclass(frozen=True)
class ShellLine:
    where: str  # file:line of the command's first line
    text: str  # the command, continuation lines joined, comment dropped


def strip_comment(text: str) -> str:
    """``text`` without a trailing shell comment: a ``#`` that starts a word, outside quotes."""
    quote, previous = None, " "
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and previous.isspace():
            return text[:i].rstrip()
        previous = ch
    return text


def shell_lines(text: str, name: str) -> list[ShellLine]:
    """The commands of ``text``'s fenced shell blocks (``console`` blocks: only ``$ `` lines)."""
    out: list[ShellLine] = []
    block: Optional[tuple[str, str]] = None
    pending: Optional[tuple[int, str]] = None
    for number, raw in enumerate(text.splitlines(), 1):
        match = FENCE.match(raw)
        if block is None:
            if match:
                block = (match["fence"], match["lang"].lower())
            continue
        fence, language = block
        stripped = raw.strip()
        if stripped.startswith(fence) and not stripped.strip(fence[0]):
            block, pending = None, None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        line = stripped
        if language == "console" and pending is None:
            if not line.startswith("$ "):
                continue  # the output a console block shows
            line = line[2:]
        line = strip_comment(line)
        start = number
        if pending is not None:
            start, line = pending[0], f"{pending[1]} {line}"
        if line.endswith("\\"):
            pending = (start, line[:-1].rstrip())
            continue
        pending = None
        if line:
            out.append(ShellLine(f"{name}:{start}", line))
    return out


def split_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line as word lists (``a && b; c | d`` gives four)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def is_placeholder(value: str) -> bool:
    return any(e in value for e in ELLIPSIS) or "<" in value or "$" in value or bool(PLACEHOLDER_WORD.search(value))


# --------------------------------------------------------------------------- the CLI
@lru_cache(maxsize=1)
def cli_root() -> Any:
    import typer

    import pipeline.cli

    return typer.main.get_command(pipeline.cli.app)


@cache
def _resolved(path: tuple[str, ...]) -> tuple[Any, Any]:
    """(command, context) of ``pipeline`` + ``path``; lazily built commands (``caption``) are built here."""
    command = cli_root()
    ctx = command.context_class(command, info_name="pipeline")
    for name in path:
        _, command, _ = ctx.command.resolve_command(ctx, [name])
        ctx = command.context_class(command, info_name=name, parent=ctx)
    return command, ctx


def _options(command: Any, ctx: Any) -> dict[str, tuple[Any, bool]]:
    """``{option string: (parameter, takes a value)}``, ``--no-x`` forms included."""
    table = {}
    for param in command.get_params(ctx):
        if param.param_type_name != "option":
            continue
        takes_value = not (param.is_flag or param.count)
        for opt in param.opts:
            table[opt] = (param, takes_value)
        for opt in param.secondary_opts:
            table[opt] = (param, False)
    return table


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _value_problem(param: Any, ctx: Any, option: str, value: str) -> Optional[str]:
    """Why ``value`` is not a value of ``param`` (by its metavar: ``<int>``, ``<float>``, ``[a|b]``, ``<json>``,
    ``<int>|all``), or None."""
    if is_placeholder(value):
        return None
    if "'none' clears it" in (param.help or "") and value.strip().lower() in ("none", "null", ""):
        return None
    metavar = param.metavar
    if metavar is None:  # an option typer types itself (e.g. `download --retries`): let it convert
        if getattr(getattr(param, "type_descriptor", None), "annotation", None) not in (int, float):
            return None
        try:
            param.process_value(ctx, value)
        except Exception as e:  # noqa: BLE001 - the CLI's own conversion error is the message
            return f"{option} {value!r}: {e}"
        return None
    alternatives = [metavar] if metavar.startswith("[") else metavar.split("|")

    def accepts(kind: str) -> bool:
        if kind.startswith("[") and kind.endswith("]"):
            return value in kind[1:-1].split("|")
        converters = {"<int>": int, "<float>": float, "<json>": json.loads}
        if kind in converters:
            try:
                converters[kind](value)
            except ValueError:
                return False
            return True
        if kind.startswith("<"):
            return True  # <path>, <str>, <dir>, <url>, ...: any text
        return value == kind  # a literal alternative, e.g. `all` of <int>|all

    if any(accepts(kind) for kind in alternatives):
        return None
    return f"{option} takes {metavar}, got {value!r}"


def check_pipeline_args(args: list[str]) -> list[str]:
    """What is wrong with ``pipeline ARGS`` as a command line of the real CLI (empty: nothing)."""
    path: list[str] = []
    command, ctx = _resolved(())
    i = 0
    while hasattr(command, "commands"):  # a group: its own options, then a subcommand
        table = _options(command, ctx)
        while i < len(args) and args[i].startswith("-"):
            if args[i] not in table:
                return [f"`{' '.join(['pipeline', *path])}` has no option {args[i]}{_suggest(args[i], list(table))}"]
            i += 1
        if i >= len(args) or is_placeholder(args[i]):
            return []  # `pipeline`, `pipeline recipe`: the help; `pipeline STAGE ...`: any command
        name = args[i]
        names = list(command.list_commands(ctx))
        if name not in names:
            return [f"`{' '.join(['pipeline', *path, name])}`: no such command{_suggest(name, names)}"]
        path.append(name)
        command, ctx = _resolved(tuple(path))
        i += 1
    rest = args[i:]
    problems = _check_command_args(command, ctx, "pipeline " + " ".join(path), rest)
    if not problems and len(path) == 1 and "--help" not in rest and not any(e in w for w in rest for e in ELLIPSIS):
        problems = _config_problems(path[0], command, ctx, rest, args)
    return problems


class _Chdir:
    """Run in ``folder`` (params files and DVC's lock are read relative to it)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.old = folder, Path.cwd()

    def __enter__(self) -> None:
        os.chdir(self.folder)

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.old)


@cache
def _lock_outputs(root: Path, read: Any) -> tuple[Any, ...]:
    """What ``read`` (``pipeline.tracked.tracked_outputs``) finds in ``root``'s dvc.lock, read once per run."""
    return tuple(read(root))


def _config_problems(name: str, command: Any, ctx: Any, rest: list[str], argv: list[str]) -> list[str]:
    """For a stage command: its options resolved as the CLI resolves them (params file, then the command line,
    validated by the stage's config model), and its outputs checked against what DVC tracks for *another*
    command (:mod:`pipeline.tracked`): a hand-run example that would be refused is a wrong example."""
    from pipeline import tracked
    from pipeline.cli.options import config_options, parse_overrides
    from pipeline.config import SECTIONS, load_config, load_train_config
    from pipeline.errors import UserError

    section = name.replace("-", "_")
    if section not in SECTIONS or section == "decoders":
        return []  # a tool, not a stage (caption, serve, convert-weights, ...)
    shown = f"`pipeline {name}`"
    with _Chdir(REPO):
        try:
            parsed = command.make_context(name, list(rest), parent=ctx.parent)
        except Exception as e:  # noqa: BLE001 - click's usage errors: the CLI would refuse the line
            return [f"{shown}: the CLI refuses it: {e}"]
        _, kinds = config_options(SECTIONS[section])
        values = {k: v for k, v in parsed.params.items() if k in kinds}
        if any(is_placeholder(str(v)) for v in values.values() if v is not None):
            return []  # a placeholder where a value goes: nothing to resolve
        try:
            overrides = parse_overrides(values, kinds, parsed)
            params_file = parsed.params["params"]
            cfg = (load_train_config(params_file, overrides) if section == "train"
                   else load_config(section, params_file, overrides))
            read = tracked.tracked_outputs
            with mock.patch.object(tracked, "tracked_outputs", lambda root: list(_lock_outputs(root, read))):
                tracked.check_outputs(cfg.outputs(), argv, cwd=REPO, running_stage="")
        except (UserError, ValueError) as e:
            return [f"{shown}: {e}"]
    return []


def _check_command_args(command: Any, ctx: Any, shown: str, args: list[str]) -> list[str]:
    table = _options(command, ctx)
    arguments = [p for p in command.get_params(ctx) if p.param_type_name == "argument"]
    most = None if any(p.nargs == -1 for p in arguments) else sum(p.nargs for p in arguments)
    problems, positional, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token in ELLIPSIS:
            break  # the rest is elided
        if token == "--":
            positional.extend(args[i + 1:])
            break
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-[\d.]+(e-?\d+)?", token):
            name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
            if name not in table:
                problems.append(f"`{shown}` has no option {name}{_suggest(name, list(table))}")
                i += 1
                continue
            param, takes_value = table[name]
            if takes_value:
                if not eq:
                    following = args[i + 1] if i + 1 < len(args) else None
                    if following is None or (following.startswith("--") and following not in ELLIPSIS):
                        problems.append(f"`{shown}`: {name} needs a value")
                        i += 1
                        continue
                    value = following
                    i += 1
                if (problem := _value_problem(param, ctx, name, value)) is not None:
                    problems.append(f"`{shown}`: {problem}")
            elif eq:
                problems.append(f"`{shown}`: {name} is a flag and takes no value (got {name}={value})")
            elif i + 1 < len(args) and args[i + 1].lower() in BOOL_WORDS and (most is not None or not arguments):
                problems.append(f"`{shown}`: {name} is a flag and takes no value (got {name} {args[i + 1]})")
                i += 1
        else:
            positional.append(token)
        i += 1
    if most is not None and len(positional) > most:
        problems.append(f"`{shown}` takes {most} argument(s), got {len(positional)}: {' '.join(positional)}")
    return problems


# --------------------------------------------------------------------------- other commands docs show
@lru_cache(maxsize=1)
def dvc_stages() -> set[str]:
    return set(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


def _params_key_problem(assignment: str) -> Optional[str]:
    from pipeline.config import SECTIONS

    key = assignment.split("=", 1)[0]
    section, _, field = key.partition(".")
    if section == "decoders":
        return None  # decoders.<family>.options/train: the families' own options
    if section not in SECTIONS:
        return f"-S {key}: no params section {section!r}{_suggest(section, list(SECTIONS))}"
    fields = SECTIONS[section].model_fields
    name = field.split(".")[0]
    if name and name not in fields:
        return f"-S {key}: section {section!r} has no key {name!r}{_suggest(name, list(fields))}"
    return None


def check_command(words: list[str], after_cd: bool = False) -> list[str]:
    """What is wrong with one simple command of a docs shell block (empty: nothing, or not checked)."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return []
    program = words[0]
    if program == "pipeline":
        return check_pipeline_args(words[1:])
    if PYTHONS.match(program) or program == "torchrun":
        if "-m" not in words[1:-1]:
            return []
        module = words[words.index("-m") + 1]
        if module == "pipeline.cli":
            return check_pipeline_args(words[words.index("-m") + 2:])
        if (module == "bench" or module.startswith("bench.")) and importlib.util.find_spec(module) is None:
            return [f"python -m {module}: no such module"]
        return []
    if program == "dvc" and not after_cd:  # the default project's stages and params
        rest = words[1:]
        if rest[:1] == ["repro"]:
            targets = [w for w in rest[1:] if not w.startswith("-") and not is_placeholder(w)]
            return [f"dvc repro {t}: no stage {t.split('@')[0]!r} in dvc.yaml" for t in targets
                    if t.split("@")[0] not in dvc_stages()]
        if rest[:2] == ["exp", "run"]:
            sets = [rest[i + 1] for i, w in enumerate(rest[:-1]) if w in ("-S", "--set-param")]
            return [p for p in map(_params_key_problem, sets) if p is not None]
    return []


def check_shell_line(line: str) -> list[str]:
    try:
        commands = split_commands(line)
    except ValueError as e:
        return [f"cannot split {line!r} into words: {e}"]
    problems, after_cd = [], False
    for words in commands:
        problems += check_command(words, after_cd)
        after_cd = after_cd or words[0] == "cd"
    return problems


# --------------------------------------------------------------------------- links and code references
def prose(text: str) -> str:
    """``text`` without its fenced code blocks (their lines kept empty, so line numbers stay)."""
    out, fence = [], None
    for raw in text.splitlines():
        match = FENCE.match(raw)
        if fence is None and match:
            fence = match["fence"]
            out.append("")
        elif fence is not None:
            if raw.strip().startswith(fence) and not raw.strip().strip(fence[0]):
                fence = None
            out.append("")
        else:
            out.append(raw)
    return "\n".join(out)


def link_problems(path: Path) -> list[str]:
    problems = []
    for number, line in enumerate(prose(path.read_text(encoding="utf-8")).splitlines(), 1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address, mailto:, or an anchor of this page
            where = f"{rel(path)}:{number}"
            if target.startswith("/"):
                problems.append(f"{where}: absolute link {target} (links are relative to the page)")
                continue
            resolved = (path.parent / unquote(target.split("#", 1)[0])).resolve()
            if not resolved.exists():
                problems.append(f"{where}: link {target} -> {rel(resolved)}: no such file")
            elif path.is_relative_to(DOCS) and not resolved.is_relative_to(DOCS):
                problems.append(f"{where}: link {target} leaves docs/ (the site has only docs/; name the file "
                                "in `code` instead)")
    return problems


@cache
def _top_level_names(file: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def dotted_name_problem(name: str) -> Optional[str]:
    """Why ``pipeline.x.y.Name`` names no module and top-level name of this repository (None: it does)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if file.is_file():
            rest = parts[cut:]
            if rest and rest[0] not in _top_level_names(file) and not (base / rest[0]).exists():
                return f"{name}: {'.'.join(parts[:cut])} has no {rest[0]!r}"
            return None
    return f"{name}: no such module"


def code_reference_problems(path: Path) -> list[str]:
    problems = []
    for number, line in enumerate(prose(path.read_text(encoding="utf-8")).splitlines(), 1):
        for code in INLINE_CODE.findall(line):
            code = code.strip()
            where = f"{rel(path)}:{number}"
            if CODE_PATH.match(code) and not is_placeholder(code) and "*" not in code:
                if not (REPO / code).exists():
                    problems.append(f"{where}: `{code}`: no such file or folder")
            elif (match := DOTTED.match(code)) and not is_placeholder(code) \
                    and (problem := dotted_name_problem(match.group(0))) is not None:
                problems.append(f"{where}: {problem}")
    return problems


# --------------------------------------------------------------------------- the tests
def all_shell_lines() -> Iterator[ShellLine]:
    for path in doc_files():
        yield from shell_lines(path.read_text(encoding="utf-8"), rel(path))


def test_every_documented_command_matches_the_cli():
    lines = list(all_shell_lines())
    checked = [line for line in lines if re.search(r"(^|\s)(pipeline|pipeline\.cli|bench[\w.]*)(\s|$)", line.text)]
    assert len(checked) >= 20, f"the docs show only {len(checked)} pipeline/bench commands: is the parser blind?"
    problems = [f"{line.where}: {p}" for line in lines for p in check_shell_line(line.text)]
    assert problems == [], "\n".join(problems)


def test_every_relative_link_resolves():
    files = [*doc_files(), REPO / "CHANGELOG.md"]
    problems = [p for path in files for p in link_problems(path)]
    assert problems == [], "\n".join(problems)


def test_code_paths_and_names_in_the_docs_exist():
    problems = [p for path in doc_files() for p in code_reference_problems(path)]  # CHANGELOG.md names the past
    assert problems == [], "\n".join(problems)


def test_mkdocs_nav_lists_every_page_and_builds_offline():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    assert config["theme"]["font"] is False, "theme.font: false keeps Google Fonts out (the site works offline)"

    def pages(nav: Any) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from pages(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from pages(value)

    listed = list(pages(config["nav"]))
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == on_disk
    assert not [k for k in ("extra_javascript", "extra_css") if any(
        re.match(r"^(https?:)?//", str(u)) for u in config.get(k, []))], "no script or stylesheet from the network"


@pytest.mark.integration
def test_the_site_builds_strict_and_loads_nothing_from_the_network(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], check=False, cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > len(list(DOCS.rglob("*.md")))  # every page, plus 404.html
    remote = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.IGNORECASE)
    imports = re.compile(r"(?:@import|url\()\s*[\"']?(?:https?:)?//", re.IGNORECASE)
    found = [f"{p.relative_to(site)}: {m.group(0)}" for p in pages for m in remote.finditer(p.read_text(encoding="utf-8"))]
    found += [f"{p.relative_to(site)}: {m.group(0)}" for p in site.rglob("*.css") for m in imports.finditer(
        p.read_text(encoding="utf-8", errors="replace"))]
    assert found == [], "the site must work offline: " + "; ".join(found)


def test_the_architecture_page_maps_every_module():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(str(p.relative_to(REPO)) for top in ("pipeline", "stages", "cache")
                     for p in (REPO / top).rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert missing == [], f"docs/architecture.md does not map {missing}"


def test_the_readme_is_a_front_door():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "the README is the front door; the details belong in docs/"
    assert "../shared" not in text and not any("../shared" in p.read_text(encoding="utf-8")
                                               for p in DOCS.rglob("*.md"))


# --------------------------------------------------------------------------- the checker, checked
def test_the_checker_reports_each_kind_of_mistake():
    def problems(line: str) -> str:
        return "\n".join(check_shell_line(line))

    assert problems("pipeline trian --epochs 2") == "`pipeline trian`: no such command (did you mean train?)"
    assert "has no option --epoch (did you mean --epochs?)" in problems("pipeline train --epoch 2")
    assert "--blind is a flag and takes no value (got --blind=true)" in problems("pipeline train --blind=true")
    assert "--blind is a flag and takes no value (got --blind true)" in problems("pipeline train --blind true")
    assert "--epochs needs a value" in problems("pipeline train --epochs")
    assert "--epochs takes <int>, got 'many'" in problems("pipeline train --epochs many")
    assert "--amp takes [auto|none|bf16|fp16], got 'fast'" in problems("pipeline train --amp fast")
    assert "--sources takes <json>" in problems("pipeline prepare --sources '[{kind: table}]'")
    assert "takes 2 argument(s), got 3" in problems("pipeline recipe init flickr8k-cpu a b")
    assert "no such command (did you mean init?)" in problems("pipeline recipe int flickr8k-cpu runs/x")
    assert "has no option --nope" in problems("python -m pipeline.cli extract --nope")
    assert "has no option --nope" in problems("torchrun --nproc_per_node 2 -m pipeline.cli train --nope 1")
    assert "has no option --json-out" in problems("pipeline caption a.jpg --model m --json-out")
    assert problems("python -m bench.nothing_here --quick") == "python -m bench.nothing_here: no such module"
    assert problems("dvc repro filtr") == "dvc repro filtr: no stage 'filtr' in dvc.yaml"
    assert "section 'mix' has no key 'ration'" in problems("dvc exp run -S mix.ration=0.25")
    # a hand-run command over what dvc.lock tracks for another command is refused by the CLI, so it is wrong here
    assert "DVC tracks for stage 'vocab'" in problems("pipeline vocab")
    assert "DVC tracks for stage 'mix'" in problems("pipeline mix --ratio 0.25 --unit captions")
    assert "DVC tracks for stage 'train@transformer'" in problems("pipeline train --glove g.txt")
    assert "ratio: Input should be greater than or equal to 0" in problems("pipeline mix --ratio -1 --out-dir x")
    # and what is right passes: --no-x forms, placeholders, elisions, env prefixes, chains, comments
    for line in [
        "pipeline train --no-blind --decoder-options '{\"cell\": \"gru\"}' --out-dir experiments/x  # a comment",
        "HF_HUB_OFFLINE=0 pipeline filter --clip-threshold none --keep-fraction 0.115 --out-dir experiments/f",
        "pipeline finetune --unfreeze-stages all --out-dir experiments/ft",
        "pipeline caption NEW-PHOTOS/ 'shots/*.png' -m models/NAME/bundle --json --attention",
        "torchrun --nproc_per_node 4 -m pipeline.cli extract ...",
        "pipeline convert-weights SRC.pth DST.safetensors --backbone NAME --by-order",
        "cd runs/x && dvc repro && dvc exp run -S scst.epochs=3",
        "pipeline -q recipe init flickr8k-cpu runs/flickr8k-cpu --data PATH/TO/FLICKR8K",
        "python -m bench.quality DIR --recipe flickr8k-cpu --blind",
        "dvc repro train@transformer evaluate",
    ]:
        assert problems(line) == "", line


def test_the_reader_finds_commands_only_in_shell_blocks():
    text = "\n".join([
        "pipeline nothing  # prose is not a command",
        "```bash",
        "pipeline train \\",
        "  --epochs 2   # joined with the line above",
        "```",
        "```yaml",
        "pipeline: not a command",
        "```",
        "```console",
        "$ pipeline vocab --out-dir experiments/tok",
        "wrote experiments/tok  # output, not a command",
        "```",
    ])
    assert shell_lines(text, "x.md") == [ShellLine("x.md:3", "pipeline train --epochs 2"),
                                        ShellLine("x.md:10", "pipeline vocab --out-dir experiments/tok")]


def test_the_link_and_code_checks_see_what_is_missing(tmp_path, monkeypatch):
    page = DOCS / "index.md"
    assert link_problems(page) == []
    bad = tmp_path / "page.md"
    bad.write_text("See [a](missing.md#part), [b](https://example.org), [c](#here), `x` [d](./page.md).\n"
                   "```bash\n[e](in-code.md)\n```\n", encoding="utf-8")
    missing = f"link missing.md#part -> {tmp_path}/missing.md: no such file"
    assert [p.split(": ", 1)[1] for p in link_problems(bad)] == [missing]
    bad.write_text("`pipeline/nothing.py`, `pipeline/config.py`, `pipeline.config.NoSuchThing`, "
                   "`pipeline.config.load_config`, `pipeline.nothing_here`\n", encoding="utf-8")
    assert [p.split(": ", 1)[1] for p in code_reference_problems(bad)] == [
        "`pipeline/nothing.py`: no such file or folder",
        "pipeline.config.NoSuchThing: pipeline.config has no 'NoSuchThing'",
        "pipeline.nothing_here: pipeline has no 'nothing_here'",
    ]


@pytest.mark.parametrize("placeholder", ["NAME", "PATH/TO/DIR", "models/NAME/bundle", "...", "<dir>", "$HOME/x"])
def test_placeholders_are_values(placeholder):
    assert is_placeholder(placeholder)
    assert not is_placeholder("models/transformer/bundle") and not is_placeholder("ViT-B-32-quickgelu")
