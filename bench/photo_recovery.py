"""The noisy-caption recovery experiment on real photos, read through img2dataset shards.

    python -m bench.photo_recovery FLICKR8K-DIR                                  # the whole experiment
    python -m bench.photo_recovery FLICKR8K-DIR --shards-only --work-dir DIR     # only the converter
    python -m bench.photo_recovery --quick                                       # smoke run on toy data

``FLICKR8K-DIR`` is a folder in the Flickr8k importer's layout (``captions.txt``, ``images/``, the split lists).
The training photos are cut in two halves by a seeded permutation. The **clean half** keeps its captions: it
trains the domain CLIP and is the clean-only cell. The **noisy half** is converted into img2dataset-layout
shards (:func:`pipeline.data.img2dataset.write_shard`), one sample per (photo, caption), as a photo posted five
times would be, with a share ``--noise`` of the captions replaced the way social media captions are: half by
another photo's caption (``mismatched``), half by chatter (hashtags, emoji, "link in bio": ``social``);
``labels.jsonl`` beside the shards holds the truth of every sample. Then, as a user runs them:

    prepare (Flickr8k: clean manifest) -> prepare (the shards) -> extract (one cache for both) ->
    clip-train (clean half) -> filter (the shards' samples, with the labels: precision/recall) ->
    mix (cells: noisy, filtered, filtered + clean, clean) -> vocab (clean half) -> train x 4 -> evaluate x 4

Every cell is evaluated on the clean test split. Backbone: ImageNet EfficientNet-Lite0 at 224 px (its weights
ship in a pip package, no augmented views); each cell trains with the flickr8k-cpu recipe's settings (a 512-wide
Transformer, ``--epochs`` to shorten) and is scored greedy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchRun, base_parser, log, markdown_table

NAME = "photo_recovery"
CHATTER = ("#nofilter #instagood", "link in bio 👆", "so blessed today 🙏🙏", "#tbt #squad #goals",
           "follow for more 🔥", "omg cannot even 😂😂", "weekend vibes #happy #sun", "check out my page!!",
           "new post, who dis 💯", "best day ever #love #life")
SOURCE_NAME = "social"
CELLS = {"noisy": "noisy captions, unfiltered", "filtered": "noisy captions, CLIP-filtered",
         "mixed": "CLIP-filtered + clean", "clean": "clean only"}
METRICS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flickr8k-cpu.yaml"  # the cells' training settings


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, nargs="?", help="A Flickr8k-layout folder (not needed with --quick).")
    p.add_argument("--noise", type=float, default=0.5, help="share of the noisy half's captions replaced")
    p.add_argument("--shards-only", action="store_true", help="write the shards and labels, run nothing")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of each cell")
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="warm-up of each cell (the recipe's 400 suit 2,000 photos, not the half of them)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="filter by keeping this top fraction of pairs (default: the clip threshold chosen on the "
                        "filter's own val labels, as the synthetic experiment does)")
    return p


# --------------------------------------------------------------------------- the converter
def read_flickr8k(dataset: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``(captions by image file name, split by image file name)`` of a Flickr8k-layout folder, read with the
    project's importer (every caption and split rule of `prepare` applies)."""
    from pipeline.config import Flickr8kSource
    from pipeline.data.importers import import_flickr8k
    from pipeline.data.manifest import RejectsReport

    dataset = dataset.resolve()
    src = Flickr8kSource(captions=dataset / "captions.txt", images=dataset / "images", split_lists=dataset)
    records = import_flickr8k(src, RejectsReport(), check_images="none")
    captions = {Path(r.path).name: r.captions for r in records}
    return captions, {Path(r.path).name: r.split for r in records}


def halves(train: list[str], seed: int) -> tuple[list[str], list[str]]:
    """The training photos cut in two by a seeded permutation: ``(clean half, noisy half)``, each sorted."""
    order = np.random.default_rng(seed).permutation(len(train))
    cut = len(train) // 2
    return sorted(train[i] for i in order[:cut]), sorted(train[i] for i in order[cut:])


def write_noisy_shards(dataset: Path, photos: list[str], captions: dict[str, list[str]], out: Path, noise: float,
                       seed: int, per_shard: int = 1000, name: str = SOURCE_NAME) -> dict[str, Any]:
    """img2dataset shards of ``photos`` (one sample per photo and caption) with a share ``noise`` of the captions
    replaced, and ``labels.jsonl`` (image_id as `prepare` will name it for a source called ``name``,
    caption_index 0, match, kind)."""
    from pipeline.data.img2dataset import sample_key, write_shard

    rng = np.random.default_rng(seed + 1)
    samples = [(photo, j, cap) for photo in photos for j, cap in enumerate(captions[photo])]
    labels, rows, kinds = [], [], {"match": 0, "mismatched": 0, "social": 0}
    for k, (photo, j, cap) in enumerate(samples):
        kind = "match"
        if rng.random() < noise:
            if rng.random() < 0.5:
                other = photos[int(rng.integers(len(photos)))]
                while other == photo:
                    other = photos[int(rng.integers(len(photos)))]
                cap, kind = captions[other][int(rng.integers(len(captions[other])))], "mismatched"
            else:
                cap, kind = CHATTER[int(rng.integers(len(CHATTER)))], "social"
        kinds[kind] += 1
        shard, index = divmod(k, per_shard)
        labels.append({"image_id": f"{name}/{shard:05d}/{sample_key(index, shard, per_shard)}", "caption_index": 0,
                       "match": kind == "match", "kind": kind, "photo": photo, "caption": cap})
        data = (dataset / "images" / photo).read_bytes()
        rows.append({"url": f"https://social.example.com/{photo}?post={j}", "caption": cap, "image": data,
                     "width": None, "height": None})
    out.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        write_shard(out, shard, rows[start:start + per_shard], samples_per_shard=per_shard)
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for row in labels:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"photos": len(photos), "samples": len(samples), "kinds": kinds}


# --------------------------------------------------------------------------- the experiment
class Steps:
    """Runs `pipeline` commands in the work folder, timing each."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.seconds: dict[str, float] = {}

    def __call__(self, label: str, stage: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "pipeline.cli", "-q", stage, *args]
        log(f"[{NAME}] {label}: pipeline {stage} {' '.join(args)[:200]}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.work, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                              stderr=subprocess.PIPE)
        self.seconds[label] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench.{NAME}: `pipeline {stage}` failed ({label}, exit {proc.returncode})")
        log(f"[{NAME}] {label}: {self.seconds[label]:.0f} s")


def run_experiment(args, work: Path, dataset: Path) -> dict[str, Any]:
    from pipeline.data.manifest import read_manifest, write_manifest

    step = Steps(work)
    quick = args.quick
    if quick and not args.keep_fraction:
        args.keep_fraction = 0.6  # a toy val split is too small to choose a threshold on
    captions, splits = read_flickr8k(dataset)
    train = sorted(p for p, s in splits.items() if s == "train")
    clean_half, noisy_half = halves(train, args.seed)
    shards = work / "shards"
    # the noisy half is the training side; the val photos, made noisy the same way, are the filter's val split
    # (the best-F1 threshold is chosen on their labels); the cells' val and test images stay the clean ones
    val = sorted(p for p, s in splits.items() if s == "val")
    per_shard = 40 if quick else 1000
    conversion = write_noisy_shards(dataset, noisy_half, captions, shards / "train", args.noise, args.seed, per_shard)
    held = write_noisy_shards(dataset, val, captions, shards / "val", args.noise, args.seed + 7, per_shard,
                              name=f"{SOURCE_NAME}-val")
    with open(shards / "labels.jsonl", "w", encoding="utf-8") as f:
        for part in ("train", "val"):
            f.write((shards / part / "labels.jsonl").read_text(encoding="utf-8"))
    conversion["val"] = held
    log(f"[{NAME}] {conversion['samples']} samples of {conversion['photos']} photos -> {shards / 'train'} "
        f"({conversion['kinds']}); {held['samples']} of the {held['photos']} val photos -> {shards / 'val'}")
    if args.shards_only:
        return {"conversion": conversion}

    source = [{"kind": "flickr8k", "captions": str(dataset / "captions.txt"), "images": str(dataset / "images"),
               "split_lists": str(dataset)}]
    step("prepare photos", "prepare", "--sources", json.dumps(source), "--out-dir", "photos")
    keep = set(clean_half)
    records = [r for r in read_manifest(work / "photos/manifest.jsonl")
               if r.split != "train" or Path(r.path).name in keep]
    write_manifest(work / "clean/manifest.jsonl", [_rebase(r, work / "photos", work / "clean") for r in records])
    step("prepare shards", "prepare", "--sources",
         json.dumps([{"kind": "img2dataset", "path": str(shards / "train"), "name": SOURCE_NAME, "split": "train"},
                     {"kind": "img2dataset", "path": str(shards / "val"), "name": f"{SOURCE_NAME}-val",
                      "split": "val"}]),
         "--out-dir", "social", "--duplicates", "bytes")
    size = ["--image-size", "64", "--batch-size", "16", "--num-shards", "1"] if quick else \
           ["--image-size", "224", "--batch-size", "32", "--num-shards", "4"]
    weights = [] if quick else ["--weights", "package:efficientnet_lite0"]
    step("extract", "extract", "--manifest", "clean/manifest.jsonl", "--extra-manifests",
         "social/manifest.jsonl", "--out-dir", "features",
         "--backbone", "test_efficientnet" if quick else "tf_efficientnet_lite0", *weights, *size)
    clip_quick = ["--epochs", "1", "--batch-size", "16", "--val-max-images", "4"] if quick else []
    step("clip-train", "clip-train", "--manifest", "clean/manifest.jsonl", "--out-dir", "clip", *clip_quick)
    # only the shards' train split is trained on; the threshold is the best F1 on their val split's labels, as in
    # the synthetic experiment
    select = ["--keep-fraction", str(args.keep_fraction)] if args.keep_fraction else []
    step("filter", "filter", "--manifest", "social/manifest.jsonl", "--labels", str(shards / "labels.jsonl"),
         "--clip-model", "synthetic-clip-tiny", "--clip-pretrained", "clip/open_clip_model.safetensors",
         "--embeddings-dir", "embeddings", "--out-dir", "filtered", *select)
    retention = json.loads((work / "filtered/retention.json").read_text(encoding="utf-8"))
    if not args.keep_fraction and "labels" in retention:  # refilter at the best-F1 threshold of the labels
        best = retention["labels"]["suggested_threshold"]
        step("filter at best F1", "filter", "--manifest", "social/manifest.jsonl", "--labels",
             str(shards / "labels.jsonl"), "--clip-model", "synthetic-clip-tiny", "--clip-pretrained",
             "clip/open_clip_model.safetensors", "--embeddings-dir", "embeddings", "--out-dir", "filtered",
             "--clip-threshold", str(best), "--threshold-tuned-for", "synthetic-clip-tiny")
        retention = json.loads((work / "filtered/retention.json").read_text(encoding="utf-8"))
    step("mix noisy", "mix", "--clean", "clean/manifest.jsonl", "--filtered", "social/manifest.jsonl",
         "--no-clean-train", "--out-dir", "cells/noisy")
    step("mix filtered", "mix", "--clean", "clean/manifest.jsonl", "--filtered", "filtered/manifest.jsonl",
         "--no-clean-train", "--out-dir", "cells/filtered")
    step("mix filtered + clean", "mix", "--clean", "clean/manifest.jsonl", "--filtered", "filtered/manifest.jsonl",
         "--out-dir", "cells/mixed")
    step("vocab", "vocab", "--manifest", "clean/manifest.jsonl", "--out-dir", "tokenizers", "--kinds", "word",
         "--min-freq", "1" if quick else "3", "--max-length", "24")
    cell_manifests = {"noisy": "cells/noisy/manifest.jsonl", "filtered": "cells/filtered/manifest.jsonl",
                      "mixed": "cells/mixed/manifest.jsonl", "clean": "clean/manifest.jsonl"}
    train_opts = (["--epochs", "1", "--batch-size", "32", "--val-max-images", "4", "--decoder-options",
                   json.dumps({"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64})] if quick else
                  ["--params", str(RECIPE), "--epochs", str(args.epochs), "--warmup-steps", str(args.warmup_steps)])
    cells = {}
    for cell, manifest in cell_manifests.items():
        step(f"train {cell}", "train", "--manifest", manifest, "--features", "features", "--tokenizer",
             "tokenizers/word", "--decoder", "transformer", "--out-dir", f"models/{cell}", "--max-caption-length",
             "24", "--device", "cpu", *train_opts)
        step(f"evaluate {cell}", "evaluate", "--model", f"models/{cell}/bundle", "--manifest", "clean/manifest.jsonl",
             "--features", "features", "--decoding", "greedy", "--gallery-size", "0", "--out-dir", f"reports/{cell}")
        metrics = json.loads((work / f"reports/{cell}/metrics.json").read_text(encoding="utf-8"))
        train_rows = [r for r in read_manifest(work / manifest) if r.split == "train"]
        cells[cell] = {"label": CELLS[cell], "train_images": len(train_rows),
                       "train_captions": sum(len(r.captions) for r in train_rows),
                       "scores": {m: metrics.get(m) for m in METRICS}}
    labels = retention.get("labels", {})
    return {"conversion": conversion, "filter": {"threshold": retention.get("threshold"),
                                                 "at_threshold": labels.get("at_threshold"),
                                                 "by_kind": labels.get("kept_by_kind"),
                                                 "val_best_f1": labels.get("val_best_f1"),
                                                 "pairs": retention.get("pairs")},
            "cells": cells, "seconds": step.seconds}


def _rebase(record, old: Path, new: Path):
    from pipeline.data.manifest import rebased

    return rebased(record, old / "manifest.jsonl", new)


def report(results: dict, run: BenchRun) -> str:
    f = results["filter"]
    at = f.get("at_threshold") or {}
    header = ["cell", "train images", "train captions", *METRICS]
    rows = [[c["label"], c["train_images"], c["train_captions"], *[f"{c['scores'][m]:.4f}" for m in METRICS]]
            for c in results["cells"].values()]
    caption = (f"Recovery on real photos through img2dataset shards: {results['conversion']['samples']:,} noisy "
               f"samples ({results['conversion']['kinds']}); filter threshold {f['threshold']:.4f}: precision "
               f"{at.get('precision', float('nan')):.3f}, recall {at.get('recall', float('nan')):.3f} (best F1 on the "
               f"shards' val split); every cell evaluated on the clean test "
               f"split, greedy. {run.machine_note()}")
    return markdown_table(header, rows) + "\n\n" + caption


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if not args.quick and args.dataset is None:
        raise SystemExit(f"bench.{NAME}: give a Flickr8k-layout folder (or --quick)")
    run = BenchRun(NAME, args)
    with run.work_folder(f"bench-{NAME}-") as work:
        dataset = args.dataset.resolve() if args.dataset else None
        if args.quick:
            from bench.quality import make_quick_dataset

            dataset = make_quick_dataset(work / "toy", n=64, seed=args.seed)
        results = run_experiment(args, work, dataset)
    if args.shards_only:
        return run.publish(results)
    return run.publish(results, report(results, run))


if __name__ == "__main__":
    main()
