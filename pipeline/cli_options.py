"""Turn a stage's config model into typer options, so options and params keys never drift apart.

Every field of the model becomes ``--field-name`` with the field's description as
help. An option left out keeps the value from the params file (or the default);
one given on the command line overrides it. Lists and nested settings are taken
as JSON (``--sources '[{"kind": "synthetic"}]'``) or, for lists of scalars, by
repeating the option (``--out-indices 2 --out-indices 3``).
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import typer
from pydantic import BaseModel

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
    return str, True


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def config_options(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """typer parameters for the model's fields, and for each field how its text is read ("json", "optional", "")."""
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
        help_text = (field.description or "") + (" [JSON]" if is_json else "") + (" ('none' clears it)" if optional else "")
        if cli_type is bool:
            option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        else:
            option = typer.Option(None, flag, help=help_text, show_default=False)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[cli_type])
        )
    return params, kinds


def parse_overrides(values: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """The options given on the command line, parsed; options left out are absent (not None)."""
    out = {}
    for name, value in values.items():
        if value is None or (isinstance(value, list) and not value):
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
        out[name] = value
    return out


def with_signature(fn: Callable, params: list[inspect.Parameter]) -> Callable:
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn
