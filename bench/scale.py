"""How each stage's cost grows with the data: img2dataset shards -> prepare -> extract -> filter -> vocab ->
one training epoch, at each size asked for.

    python -m bench.scale --samples 10000 100000 1000000
    python -m bench.scale --quick          # smoke run: 300 and 600 samples

For each size it writes img2dataset-layout shards (:func:`pipeline.data.img2dataset.write_shard`, 10,000
rows a shard, 2 % of them failed downloads) of small synthetic photos (64 px JPEGs: a shape on a background)
with noisy captions (a share replaced by another photo's caption or by hashtag chatter), then runs each stage
as the `pipeline` command a user types, in a process of its own, and records:

* seconds per 1,000 samples (the process's wall time, start-up included; the marginal cost between two
  sizes is printed too, which leaves the fixed start-up out);
* peak RSS (the process's ``ru_maxrss``, from ``wait4``: its own memory and the pages of the files it maps,
  the LMDB cache among them) and peak anonymous RSS (``RssAnon`` sampled every 50 ms: its own memory only);
* bytes on disk per sample of what the stage wrote;
* the no-op ``dvc status`` of a DAG over that data (its stages recorded by ``dvc commit``, nothing run).

The models are the smallest that exercise the real code: timm's ``test_efficientnet`` (random init, 2x2
tokens of 256 channels at 64 px), an untrained ``synthetic-clip-tiny`` (its scores rank nothing; the cost is
the point) with ``--keep-fraction 0.7``, and a 32-wide one-layer Transformer decoder. Targets, from the
smallest size to the largest run: seconds per 1,000 samples within 1.25x and peak RSS within 1.5x, per stage;
no-op ``dvc status`` <= 3 s at 100,000 samples. Disk: about 10 KB a sample in all (shards 4.3 KB, cache 4 KB,
embeddings 0.8 KB, manifests); 1,000,000 samples took 34 min on 2 cores (with the two smaller sizes).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchRun, base_parser, log, markdown_table

NAME = "scale"
SAMPLES_PER_SHARD = 10_000
TARGETS = {"seconds_per_1k_growth": 1.25, "peak_rss_growth": 1.5, "dvc_status_s_at_100k": 3.0}
STAGES = ("prepare", "extract", "filter", "vocab", "train")
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40),
           "white": (235, 235, 235), "black": (20, 20, 20), "purple": (130, 50, 160), "orange": (240, 140, 30)}
SHAPES = ("square", "bar", "stripe", "block")
CHATTER = ("#nofilter #instagood", "link in bio", "so blessed today", "#tbt with the crew", "follow for more",
           "omg cannot even", "weekend vibes #happy", "check out my page")
DECODER = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64}


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000],
                   help="sizes to run, smallest first (1000000 needs ~10 GB of disk and ~25 min on 2 cores)")
    p.add_argument("--noise", type=float, default=0.4, help="share of captions replaced by noise")
    p.add_argument("--keep", action="store_true", help="keep each size's data under --work-dir")
    return p


# --------------------------------------------------------------------------- data
def photo(rng: np.random.Generator) -> tuple[bytes, str]:
    """A 64-px JPEG of a coloured shape on a coloured background, and its true caption."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = COLOURS[names[bg]]
    h, w = {"square": (32, 32), "bar": (16, 48), "stripe": (48, 12), "block": (24, 40)}[shape]
    top, left = int(rng.integers(0, 64 - h)), int(rng.integers(0, 64 - w))
    img[top:top + h, left:left + w] = COLOURS[names[fg]]
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue(), f"a {names[fg]} {shape} on a {names[bg]} background"


def write_shards(folder: Path, n: int, noise: float, seed: int) -> dict[str, Any]:
    """``n`` rows of img2dataset shards in ``folder``; returns counts (rows, failed, noisy captions)."""
    from pipeline.data.img2dataset import write_shard

    rng = np.random.default_rng(seed)
    failed = noisy = 0
    previous = "a photo"
    for shard, start in enumerate(range(0, n, SAMPLES_PER_SHARD)):
        rows = []
        for i in range(start, min(n, start + SAMPLES_PER_SHARD)):
            url = f"https://img.example.com/{seed}/{i}.jpg"
            if rng.random() < 0.02:
                failed += 1
                rows.append({"url": url, "caption": "lost", "status": "failed_to_download",
                             "error_message": ["HTTP Error 404: Not Found", "timed out"][i % 2]})
                continue
            image, truth = photo(rng)
            caption, r = truth, rng.random()
            if r < noise / 2:
                caption, noisy = previous, noisy + 1  # another photo's caption
            elif r < noise:
                caption, noisy = CHATTER[int(rng.integers(len(CHATTER)))], noisy + 1
            previous = truth
            rows.append({"url": url, "caption": caption, "image": image, "width": 64, "height": 64})
        write_shard(folder, shard, rows)
    return {"rows": n, "failed": failed, "noisy_captions": noisy}


# --------------------------------------------------------------------------- measuring one stage
# A small interpreter forks and execs the stage and reports its rusage: Linux carries a process's peak RSS
# over exec, so a stage started straight from this (torch-holding) process would report this process's peak.
# ru_maxrss counts the pages of files the stage maps (the LMDB cache it writes or reads) as well as its own
# memory, so the launcher also samples the stage's anonymous RSS (RssAnon: what it allocates itself) every
# 50 ms and reports the largest value seen.
LAUNCHER = """
import json, os, sys, time
pid = os.fork()
if pid == 0:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.execv(sys.argv[1], sys.argv[1:])
anon = 0
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            anon = max(anon, next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")))
    except (OSError, StopIteration):
        pass
    time.sleep(0.05)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss, "anon_kb": anon}))
"""


def run_stage(argv: list[str], cwd: Path, env: dict) -> dict[str, Any]:
    """Run one `pipeline` command in its own process: wall seconds and peak RSS (MB) of that process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=cwd, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    try:
        child = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        child = {"exit": proc.returncode, "maxrss_kb": 0}
    if child["exit"] != 0:
        tail = proc.stderr.decode(errors="replace")[-3000:]
        raise SystemExit(f"bench.scale: `{' '.join(Path(a).name for a in argv[:2])}` failed (exit {child['exit']}):\n{tail}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(child["maxrss_kb"] / 1024, 1),
            "peak_anon_mb": round(child.get("anon_kb", 0) / 1024, 1)}


def folder_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*"))
               if f.is_file())


def stage_commands(work: Path, clip_ckpt: Path, n: int) -> dict[str, tuple[list[str], list[Path]]]:
    """Each stage's command line (run in ``work``) and the outputs it writes."""
    source = json.dumps([{"kind": "img2dataset", "path": "shards"}])
    batch = 64 if n >= 1000 else 16
    return {
        "prepare": (["prepare", "--sources", source, "--check-images", "header", "--duplicates", "bytes",
                     "--out-dir", "prepared"], [work / "prepared"]),
        "extract": (["extract", "--manifest", "prepared/manifest.jsonl", "--out-dir", "features", "--backbone",
                     "test_efficientnet", "--image-size", "64", "--batch-size", str(batch), "--num-shards", "4",
                     "--device", "cpu"], [work / "features"]),
        "filter": (["filter", "--manifest", "prepared/manifest.jsonl", "--out-dir", "filtered", "--clip-model",
                    "synthetic-clip-tiny", "--clip-pretrained", str(clip_ckpt), "--embeddings-dir", "embeddings",
                    "--keep-fraction", "0.7", "--batch-size", str(batch), "--device", "cpu"],
                   [work / "filtered", work / "embeddings"]),
        "vocab": (["vocab", "--manifest", "filtered/manifest.jsonl", "--out-dir", "tokenizers", "--kinds", "word"],
                  [work / "tokenizers"]),
        "train": (["train", "--manifest", "filtered/manifest.jsonl", "--features", "features", "--tokenizer",
                   "tokenizers/word", "--out-dir", "model", "--decoder", "transformer", "--decoder-options",
                   json.dumps(DECODER), "--epochs", "1", "--batch-size", "256", "--warmup-steps", "0",
                   "--val-max-images", "256", "--max-caption-length", "16", "--device", "cpu"], [work / "model"]),
    }


def dvc_status_seconds(work: Path, commands: dict, env: dict, dvc: str) -> float:
    """The no-op `dvc status` of a DAG over ``work``'s data: the stages are written to dvc.yaml with their
    deps and outs, recorded with `dvc commit` (nothing reruns), then `dvc status` is timed (best of 3)."""
    deps = {"prepare": ["shards"], "extract": ["prepared/manifest.jsonl"],
            "filter": ["prepared/manifest.jsonl"], "vocab": ["filtered/manifest.jsonl"],
            "train": ["filtered/manifest.jsonl", "features", "tokenizers/word"]}
    outs = {"prepare": ["prepared"], "extract": ["features"], "filter": ["filtered", "embeddings"],
            "vocab": ["tokenizers"], "train": ["model"]}
    stages = {name: {"cmd": "pipeline " + " ".join(f"'{a}'" if " " in a or "{" in a else a for a in argv),
                     "deps": deps[name], "outs": [{o: {"cache": False}} for o in outs[name]]}
              for name, (argv, _) in commands.items()}
    import yaml

    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run([dvc, "init", "--no-scm", "-q", "-f"], cwd=work, env=env, check=True)
    subprocess.run([dvc, "commit", "-f", "-q"], cwd=work, env=env, check=True)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([dvc, "status"], cwd=work, env=env, capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - start)
    if "up to date" not in out.stdout:
        raise SystemExit(f"bench.scale: the recorded DAG is not up to date:\n{out.stdout[-2000:]}")
    return round(best, 2)


# --------------------------------------------------------------------------- the benchmark
def measure_size(work: Path, n: int, args, clip_ckpt: Path, env: dict, bin_dir: Path) -> dict[str, Any]:
    log(f"scale: {n:,} samples: writing shards ...", load=True)
    start = time.perf_counter()
    data = write_shards(work / "shards", n, args.noise, args.seed)
    data["write_seconds"] = round(time.perf_counter() - start, 1)
    data["shard_bytes_per_sample"] = round(folder_bytes(work / "shards") / n)
    commands = stage_commands(work, clip_ckpt, n)
    stages = {}
    for name in STAGES:
        argv, outputs = commands[name]
        log(f"scale: {n:,} samples: {name} ...", load=True)
        result = run_stage([str(bin_dir / "pipeline"), *argv], work, env)
        result["seconds_per_1k"] = round(1000 * result["seconds"] / n, 3)
        result["bytes_per_sample"] = round(folder_bytes(*outputs) / n, 1)
        stages[name] = result
        log(f"scale: {n:,} samples: {name}: {result['seconds']} s, {result['seconds_per_1k']} s/1k, "
            f"peak RSS {result['peak_rss_mb']} MB (anonymous {result['peak_anon_mb']} MB), "
            f"{result['bytes_per_sample']} B/sample")
    manifest_rows = sum(1 for _ in open(work / "prepared" / "manifest.jsonl", encoding="utf-8"))
    status = dvc_status_seconds(work, commands, env, str(bin_dir / "dvc"))
    log(f"scale: {n:,} samples: no-op dvc status {status} s")
    return {"samples": n, "data": data, "imported": manifest_rows, "stages": stages, "dvc_status_s": status}


def growth(sizes: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage, the largest size's seconds per 1k and peak RSS over the smallest size's."""
    first, last = sizes[0]["stages"], sizes[-1]["stages"]
    return {name: {"seconds_per_1k": round(last[name]["seconds_per_1k"] / first[name]["seconds_per_1k"], 2),
                   "peak_rss": round(last[name]["peak_rss_mb"] / first[name]["peak_rss_mb"], 2),
                   "peak_anon": round(last[name]["peak_anon_mb"] / max(first[name]["peak_anon_mb"], 1e-9), 2)}
            for name in STAGES}


def report(sizes: list[dict], ratios: dict, run: BenchRun) -> str:
    header = ["stage"] + [f"{s['samples']:,}: s/1k · RSS MB (anon) · B/sample" for s in sizes] + \
             (["marginal s/1k"] if len(sizes) > 1 else []) + (["growth s/1k · RSS (anon)"] if len(sizes) > 1 else [])
    rows = []
    for name in STAGES:
        row = [name] + [f"{s['stages'][name]['seconds_per_1k']:.3f} · {s['stages'][name]['peak_rss_mb']:.0f} "
                        f"({s['stages'][name]['peak_anon_mb']:.0f}) · {s['stages'][name]['bytes_per_sample']:,.0f}"
                        for s in sizes]
        if len(sizes) > 1:
            a, b = sizes[-2], sizes[-1]
            marginal = 1000 * (b["stages"][name]["seconds"] - a["stages"][name]["seconds"]) / (b["samples"] - a["samples"])
            r = ratios[name]
            row += [f"{marginal:.3f}", f"{r['seconds_per_1k']:.2f}x · {r['peak_rss']:.2f}x ({r['peak_anon']:.2f}x)"]
        rows.append(row)
    pad = [""] * (2 if len(sizes) > 1 else 0)
    rows.append(["no-op dvc status (s)"] + [f"{s['dvc_status_s']:.2f}" for s in sizes] + pad)
    rows.append(["shards (B/sample)"] + [f"{s['data']['shard_bytes_per_sample']:,}" for s in sizes] + pad)
    failed = sizes[0]["data"]["failed"]
    caption = (f"Cost per stage by size (img2dataset shards of 64-px JPEGs, {failed:,} failed downloads in the "
               f"smallest). Targets: growth <= {TARGETS['seconds_per_1k_growth']}x in s/1k and "
               f"<= {TARGETS['peak_rss_growth']}x in peak RSS (anonymous: what a stage allocates, the pages of the files "
               f"it maps left out); no-op dvc status <= {TARGETS['dvc_status_s_at_100k']} s "
               f"at 100k. {run.machine_note()}")
    return markdown_table(header, rows) + "\n\n" + caption


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.quick:
        args.samples = [300, 600]
    sizes = sorted(set(args.samples))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = BenchRun(NAME, args)
    results = []
    with run.work_folder("bench-scale-") as work:
        from pipeline.models import clip as clip_lib

        model, _, _ = clip_lib.create_untrained(clip_lib.TINY_ARCH, seed=args.seed)
        clip_lib.save_checkpoint(model.eval(), clip_lib.TINY_ARCH, work / "clip")
        clip_ckpt = work / "clip" / clip_lib.CHECKPOINT_FILE
        for n in sizes:
            folder = work / f"n{n}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            results.append(measure_size(folder, n, args, clip_ckpt, env, bin_dir))
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    ratios = growth(results) if len(results) > 1 else {}
    status_100k = next((s["dvc_status_s"] for s in results if s["samples"] >= 100_000), None)
    checks = {
        "seconds_per_1k_growth_ok": all(r["seconds_per_1k"] <= TARGETS["seconds_per_1k_growth"] for r in ratios.values()),
        "peak_rss_growth_ok": all(r["peak_rss"] <= TARGETS["peak_rss_growth"] for r in ratios.values()),
        "peak_anon_growth_ok": all(r["peak_anon"] <= TARGETS["peak_rss_growth"] for r in ratios.values()),
        "dvc_status_ok": None if status_100k is None else status_100k <= TARGETS["dvc_status_s_at_100k"],
    }
    return run.publish({"targets": TARGETS, "sizes": results, "growth": ratios, "checks": checks},
                       report(results, ratios, run))


if __name__ == "__main__":
    main()
