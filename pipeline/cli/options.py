"""Turn a config model into typer options, so options, params keys and defaults never drift apart.

Every field of the model becomes ``--field-name`` with the field's description as
help and the field's default as the option's default (shown by ``--help``). An
option left out keeps the value from the params file (or the default); one given
on the command line overrides it: :func:`parse_overrides` with typer's (click) context
keeps only the options the command line gave. Lists and nested settings are taken
as JSON (``--sources '[{"kind": "synthetic"}]'``) or, for lists of scalars, by
repeating the option (``--out-indices 2 --out-indices 3``, ``--kinds word --kinds bpe``; a list of strings also
as JSON, ``--kinds '["word", "bpe"]'``).

Also here: :class:`LazyGroup`, a command group that builds a command whose options need a heavy
import (``caption``'s come from :class:`pipeline.inference.decoding.DecodingOptions`, which imports torch) only
when that command runs or shows its ``--help``, so ``pipeline --help`` and the other commands stay fast.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined, to_jsonable_python
from typer.core import TyperCommand, TyperGroup

_SCALARS = (str, int, float, bool, Path)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(type typer parses, whether the value arrives as JSON text)."""
    tp = _strip_optional(tp)
    if tp in _SCALARS:
        return tp, False
    if typing.get_origin(tp) is Literal:
        return str, False
    if typing.get_origin(tp) in (Union, types.UnionType) and all(
        a in _SCALARS or typing.get_origin(a) is Literal for a in typing.get_args(tp)
    ):
        return str, False  # e.g. int | Literal["all"]: the text as given, converted by the model ("2" -> 2)
    if typing.get_origin(tp) is list and _strip_optional(typing.get_args(tp)[0]) in (str, int, float, Path):
        return list[_strip_optional(typing.get_args(tp)[0])], False
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
        return list[str], False  # --kinds word --kinds bpe: each value checked against the choices by the model
    return str, True


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _metavar(tp: Any) -> str:
    """How ``--help`` names an option's value: ``<int>``, ``[a|b]`` (a Literal's choices), ``<json>``..."""
    tp = _strip_optional(tp)
    if typing.get_origin(tp) is Literal:
        return "[" + "|".join(map(str, typing.get_args(tp))) + "]"
    if tp in _SCALARS:
        return f"<{tp.__name__.lower()}>"
    if typing.get_origin(tp) in (Union, types.UnionType) and all(
        a in _SCALARS or typing.get_origin(a) is Literal for a in typing.get_args(tp)
    ):
        return "|".join(_metavar(a).strip("[]") if typing.get_origin(a) is Literal else _metavar(a)
                        for a in typing.get_args(tp))
    if typing.get_origin(tp) is list and _cli_type(tp)[0] is not str:
        return _metavar(typing.get_args(tp)[0])
    return "<json>"


def _cli_default(value: Any, cli_type: Any, is_json: bool) -> Any:
    """A field's default as the option's default: what the command line would say for it."""
    if value is None:
        return None
    if is_json:
        return json.dumps(to_jsonable_python(value))
    if cli_type is str and not isinstance(value, str):
        return str(value)  # e.g. an Optional[int] taken as text
    if cli_type == list[str]:
        return [str(v) for v in value]
    return value


def config_options(
    model: type[BaseModel], exclude: tuple[str, ...] = (), *, default_text: Optional[str] = None,
    file_values: Optional[dict[str, Any]] = None, file_label: str = "params.yaml",
) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """typer parameters for the model's fields, and for each field how its text is read ("json", "optional", "").

    Each option's default is the field's (``--help`` shows it). With ``default_text`` the options default to
    None instead and ``--help`` shows that text, for options whose value otherwise comes from elsewhere
    (e.g. ``caption``'s decoding options, from ``--mode``). ``file_values``: what the params file sets, shown
    beside the default as the value a run here uses (``[params.yaml: 4]``). Parse the values with
    :func:`parse_overrides`.
    """
    params, kinds = [], {}
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        cli_type, is_json = _cli_type(field.annotation)
        optional = _is_optional(field.annotation)
        if optional and cli_type in (int, float):
            cli_type = str  # taken as text so that 'none' can clear it; the model converts the number
        elif optional and cli_type in (list[int], list[float]):
            cli_type = list[str]
        kinds[name] = "json" if is_json else "optional" if optional and cli_type in (str, Path, list[str]) else ""
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + (" ('none' clears it)" if optional else "")  # JSON: the metavar says
        if typing.get_origin(cli_type) is list:
            help_text += " (repeat the option for several)"
        if file_values and name in file_values:
            help_text += f" [{file_label}: {_shown(file_values[name])}]"
        has_default = field.default is not PydanticUndefined or field.default_factory is not None
        if default_text is not None:
            default, show_default = None, default_text
        elif has_default:
            value = field.get_default(call_default_factory=True)
            # typer shows nothing for an empty list: say so
            default, show_default = _cli_default(value, cli_type, is_json), "none" if value == [] else True
        else:
            default, show_default = None, False
        if cli_type is bool:
            option = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=show_default)
        else:
            option = typer.Option(default, flag, help=help_text, show_default=show_default,
                                  metavar=_metavar(field.annotation))
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[cli_type])
        )
    return params, kinds


def _shown(value: Any) -> str:
    """A params-file value as the help text shows it (JSON for lists and mappings, cut to a line)."""
    text = value if isinstance(value, str) else json.dumps(to_jsonable_python(value))
    return text if len(text) <= 60 else text[:57] + "..."


def context_parameter() -> inspect.Parameter:
    """The click context, for :func:`parse_overrides` to tell options given from defaults (name ``ctx``)."""
    return inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)


def _left_out(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # by name: typer bundles its own click, whose enum this is
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def parse_overrides(
    values: dict[str, Any], kinds: dict[str, str], ctx: Optional[typer.Context] = None
) -> dict[str, Any]:
    """The options given on the command line, parsed; options left out are absent (not None).

    With ``ctx`` (the command's context) an option still at its default counts as left out.
    """
    out = {}
    for name, value in values.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if ctx is not None and _left_out(ctx, name):
            continue
        text = value[0] if isinstance(value, list) and len(value) == 1 else value
        if kinds.get(name) == "optional" and isinstance(text, (str, Path)) and str(text).strip().lower() in ("", "none", "null"):
            out[name] = None
            continue
        if kinds.get(name) == "json":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise typer.BadParameter(f"--{name.replace('_', '-')}: not valid JSON: {e}") from None
        elif isinstance(value, list) and len(value) == 1 and isinstance(text, (str, Path)) \
                and str(text).lstrip().startswith("["):
            # --kinds '["word", "bpe"]', --extra-manifests '["a.jsonl"]': the whole list as JSON, as in params files
            value = _json_list(name, str(text))
        out[name] = value
    return out


def _json_list(name: str, text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--{name.replace('_', '-')}: not a JSON list: {e}") from None
    if not isinstance(value, list):
        raise typer.BadParameter(f"--{name.replace('_', '-')}: not a JSON list: {text}")
    return value


def with_signature(fn: Callable, params: list[inspect.Parameter]) -> Callable:
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn


def validation_message(e: ValidationError) -> str:
    """A model's validation errors in the command line's words (``--max-batch-size: ... (got 0)``), one a line."""
    lines = []
    for err in e.errors():
        loc = err["loc"]
        if not loc:  # a check across fields
            lines.append(err["msg"])
        else:
            lines.append(f"--{str(loc[0]).replace('_', '-')}{''.join(f'.{p}' for p in loc[1:])}: {err['msg']} "
                         f"(got {err.get('input')!r})")
    return "\n".join(lines)


class LazyGroup(TyperGroup):
    """A typer command group whose commands named in ``builders`` are built on first use.

    Register such a command with a cheap stand-in (its name and help, no options) so that it is listed in
    its place; ``builders[name]()`` returns the full click command (see :func:`typer_command`), built when
    the command runs or shows its ``--help``: ``pipeline --help`` lists it without paying its imports.
    """

    builders: dict[str, Callable[[], TyperCommand]] = {}

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if name in self.builders:
            command = self.commands[name] = self.builders[name]()
        return name, command, rest


def typer_command(name: str, fn: Callable, params: list[inspect.Parameter], help: Optional[str] = None,
                  **typer_options: Any) -> TyperCommand:
    """The click command typer makes of ``fn`` with signature ``params`` (for :class:`LazyGroup` builders)."""
    one = typer.Typer(**typer_options)
    one.command(name, help=help)(with_signature(fn, params))
    return typer.main.get_command(one)
