"""Training-step overhead: `pipeline train`'s loop (``Trainer.fit``) vs a bare PyTorch loop, same model, same batches.

Both sides train the same decoder (one init, copied before the first step) on the same batches, read by
``CachedCaptionDataset.__getitems__`` from the same feature cache, on the same device:

* ``pipeline`` the code path of `pipeline train`: ``stages.train.run(cfg)`` builds everything as the
  command does (config from ``--params``, cache checks, tokenizer, decoder, ``TrainingForward``,
  dvclive ``TrainingRun``, validator, ``Trainer``); the bench hands it a ``Trainer`` subclass whose only
  change is that ``fit`` runs this measurement, calling the real ``Trainer.fit(stop_after_steps=N)``
  for each of its rounds: fetch hook, ``.to(device)``, autocast, ``caption_loss`` with label smoothing
  (+ aux loss), GradScaler calls, gradient clipping, AdamW, the warm-up/cosine schedule, the per-step
  loss read-back, the progress bar and its postfix, the checkpoint-every test;
* ``bare`` a hand-written loop: ``__getitems__`` -> autocast (when the run uses it) -> forward ->
  ``caption_loss`` (same label smoothing) -> ``zero_grad`` / ``backward`` / ``AdamW.step`` (the run's
  parameter groups, lr, betas and weight decay); no clipping, no schedule, no loss read-back, no bar.

What is timed: per round, ``--steps`` training steps on each side (wall clock around the whole call:
for the pipeline ``Trainer.fit(stop_after_steps=steps)`` itself, so its per-call set-up -- the epoch's
order, ``model.train()``, a new progress bar -- is counted in every round, where a real run pays it
once per epoch); the side that goes first alternates between rounds. Not timed: start-up (config,
cache opening, model build), ``--warmup-batches`` untimed steps on each side, a first read of every
training record (so neither side pays cold page-cache reads), and validation (never run: all timed
steps lie inside the first epoch, before the first checkpoint step). Also measured, after the
rounds, and added amortised into the second ratio: a checkpoint save (``Trainer.save``, paid every
``checkpoint_every`` steps) and the end-of-epoch bookkeeping without validation
(``Trainer._end_epoch`` with made-up validation scores: best-bundle save, dvclive step and log line,
checkpoint; paid once per epoch). Samples/s are totals over rounds; ratios pipeline/bare are medians of
per-round ratios. Target: pipeline/bare >= 0.95 (the bookkeeping costs under 5 %).

    python -m bench.train_step            # params.yaml and the synthetic DAG's cache (data/features, ...)
    python -m bench.train_step --params recipes/flickr8k-cpu.yaml --features /tmp/q-l2-224/features \\
        --manifest /tmp/q-l2-224/prepared/manifest.jsonl --tokenizer /tmp/q-l2-224/tokenizers/word --threads 1
                                          # the real workload: the Flickr8k recipe (EfficientNet-Lite2 7x7x1280
                                          # features of 2,000 train images, a cache bench.quality built)
    python -m bench.train_step --quick    # smoke run on a tiny generated world (seconds)

On a 2-core machine that other jobs load, ``--threads 1``: with two torch threads each step waits for
whichever thread the scheduler has just taken away (steps 3-6x slower, and their times vary several-fold
from one round to the next), which drowns a ratio of a few per cent; one thread measures the same
comparison with round-to-round noise of a few per cent.

Without ``--quick`` and without the params file's cache (a fresh clone before `dvc repro`), it
generates the tiny world too (and says so): numbers of that world are not representative.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import BenchRun, base_parser, jsonable, log, markdown_table, median

NAME = "train_step"
TARGET_RATIO = 0.95
REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "test_efficientnet"  # timm's tiny test model: random init, 2x2 tokens of 256 channels at 64 px
TINY_DECODER = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64}


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml",
                   help="params file or recipe: its train section and decoders.<family> options, as `pipeline train "
                        "--params` reads them (default: params.yaml, the synthetic DAG's)")
    p.add_argument("--features", type=Path, default=None, help="feature cache (default: the params file's)")
    p.add_argument("--manifest", type=Path, default=None, help="manifest (default: the params file's)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the params file's)")
    p.add_argument("--decoder", default=None, help="decoder family (default: the params file's)")
    p.add_argument("--device", default=None, help="device (default: the params file's)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--steps", type=int, default=15, help="timed training steps per side per round (default 15)")
    p.add_argument("--warmup-batches", type=int, default=3, help="untimed training steps per side first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: torch's own choice)")
    return p


# --------------------------------------------------------------------------- data and config
def build_tiny_world(root: Path, images: int) -> dict[str, Path]:
    """prepare (synthetic 64-px images) -> extract (timm's tiny random backbone) -> vocab (word), in ``root``."""
    from bench.extract import _quiet
    from pipeline.config import (
        ExtractConfig,
        PrepareConfig,
        SyntheticSource,
        VocabConfig,
    )
    from stages import extract, prepare, vocab

    log(f"[{NAME}] generating a tiny world in {root}: {images} synthetic 64-px images, {TINY_BACKBONE} features")
    with _quiet():
        prepare.run(PrepareConfig(sources=[SyntheticSource(num_images=images, noisy_images=0, image_size=64)],
                                  out_dir=root / "prepared", check_images="none"))
        extract.run(ExtractConfig(manifest=root / "prepared" / "manifest.jsonl", out_dir=root / "features",
                                  backbone=TINY_BACKBONE, image_size=64, num_shards=2, batch_size=32, workers=0,
                                  device="cpu"))
        vocab.run(VocabConfig(manifest=root / "prepared" / "manifest.jsonl", out_dir=root / "tokenizers",
                              kinds=["word"]))
    return {"manifest": root / "prepared" / "manifest.jsonl", "features": root / "features",
            "tokenizer": root / "tokenizers" / "word"}


def _in_repo(path: Path) -> Path:
    """A relative path of a params file is relative to the repository (where `pipeline` and DVC run)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO / path


def run_config(args, work: Path):
    """The `pipeline train` config of this run (``load_train_config``, as the CLI resolves it) and where its
    data comes from."""
    from pipeline.config import load_train_config

    overrides: dict[str, Any] = {"out_dir": work / "run"}
    for key in ("features", "manifest", "tokenizer", "decoder", "device"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.quick:
        cfg = load_train_config(None, {**overrides, **build_tiny_world(work / "world", 48), "decoder": "transformer",
                                       "decoder_options": TINY_DECODER, "batch_size": 8, "device": "cpu",
                                       "amp": "none", "val_max_images": 4})
        return cfg, "generated tiny world (--quick)"
    cfg = load_train_config(args.params, overrides)
    cfg = cfg.model_copy(update={k: _in_repo(getattr(cfg, k)) for k in ("features", "manifest", "tokenizer")})
    if (cfg.features / "meta.json").exists():
        return cfg, f"{cfg.features} (params {args.params})"
    log(f"[{NAME}] {cfg.features} not found (run `dvc repro`, or give --features/--manifest/--tokenizer): "
        "measuring on a generated tiny world instead; its numbers are not representative")
    world = build_tiny_world(work / "world", 200)
    cfg = load_train_config(args.params, {**overrides, **world})
    return cfg, f"generated tiny world ({cfg.features} absent)"


# --------------------------------------------------------------------------- the two sides
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The hand-written loop: same model init, batches, autocast, loss, optimiser settings; nothing else."""

    def __init__(self, model, dataset, cfg, device, amp_dtype, label_smoothing: float) -> None:
        import torch

        from pipeline.training.loop import epoch_order
        from pipeline.training.optim import decay_groups

        self.model, self.dataset, self.cfg, self.device = model, dataset, cfg, device
        self.amp_dtype, self.label_smoothing = amp_dtype, label_smoothing
        self.optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
        from pipeline.distributed import DistContext

        self.order = epoch_order(len(dataset), cfg.seed, 0, DistContext())  # the pipeline's first epoch
        self.batch = 0
        self.losses: list = []

    def run(self, steps: int) -> None:
        import torch

        from pipeline.training.loop import caption_loss

        model, opt, bs, dev = self.model, self.optimizer, self.cfg.batch_size, self.device
        model.train()
        for _ in range(steps):
            b = self.batch
            batch = self.dataset.__getitems__(self.order[b * bs : (b + 1) * bs])
            features, tokens, lengths = batch.features.to(dev), batch.tokens.to(dev), batch.lengths.to(dev)
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                logits, aux = model(features, tokens, lengths)
                loss = caption_loss(logits, tokens, lengths, self.label_smoothing)
            if aux is not None:
                loss = loss + aux.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.losses.append(loss.detach())
            self.batch += 1


class _Measured(Exception):
    """Raised by the bench's ``fit`` once measured: ends ``stages.train.run`` before its final export."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("measured")
        self.result = result


def _timed_block(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    _sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w, time.process_time() - c


def warm_page_cache(dataset) -> float:
    """Read every training record once (one-off, untimed), so neither side pays cold page-cache reads."""
    t = time.perf_counter()
    captions = dataset.captions
    ids = sorted({captions.image_id(i) for i in range(captions.num_images)})
    for i in range(0, len(ids), 256):
        dataset.cache.get_batch(ids[i : i + 256], raw=True)
    return time.perf_counter() - t


def measure(trainer, bare_model, args) -> dict[str, Any]:
    """The rounds: the real ``Trainer.fit(stop_after_steps=...)`` vs :class:`BareLoop`, alternating."""
    from pipeline.training.loop import Trainer

    cfg, st, device = trainer.cfg, trainer.state, trainer.device
    needed = args.warmup_batches + args.rounds * args.steps
    limit = min(trainer.batches_per_epoch, cfg.checkpoint_every)
    if needed >= limit:
        raise SystemExit(f"bench.{NAME}: {args.warmup_batches} + {args.rounds} x {args.steps} steps must stay below "
                         f"{limit} (the first epoch has {trainer.batches_per_epoch} batches, checkpoint_every is "
                         f"{cfg.checkpoint_every}): lower --steps or --rounds")
    bare = BareLoop(bare_model, trainer.dataset, cfg, device, trainer.amp_dtype, trainer.label_smoothing)
    warm_s = warm_page_cache(trainer.dataset)
    log(f"[{NAME}] page cache warmed ({warm_s:.2f} s); warm-up: {args.warmup_batches} untimed steps per side")

    def pipeline_steps(n: int) -> None:
        before = st.global_step
        Trainer.fit(trainer, stop_after_steps=n)
        assert st.global_step - before == n and st.epoch == 0, "Trainer.fit left the first epoch"

    pipeline_steps(args.warmup_batches)
    bare.run(args.warmup_batches)
    sides = {"pipeline": pipeline_steps, "bare": bare.run}
    rounds: dict[str, list[dict[str, float]]] = {"pipeline": [], "bare": []}
    for r in range(args.rounds):
        for side in (("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")):
            wall, cpu = _timed_block(lambda s=side: sides[s](args.steps), device)
            rounds[side].append({"seconds": wall, "cpu_seconds": cpu})
            log(f"[{NAME}] round {r + 1}/{args.rounds} {side:>8}: {args.steps * cfg.batch_size / wall:8.1f} samples/s "
                f"({wall / args.steps:.3f} s/step, {cpu / args.steps:.3f} CPU-s/step)", load=True)
    assert bare.batch == st.batch_in_epoch, "the two sides drifted apart in the epoch's batches"
    bare_losses = [float(x) for x in bare.losses]
    pipeline_mean_loss = st.epoch_loss_sum / max(st.batch_in_epoch, 1)  # before _end_epoch resets the sums

    # Per-checkpoint and per-epoch bookkeeping, outside the rounds (each step of the rounds would otherwise
    # carry a whole save or none).
    saves = []
    for _ in range(3):
        saves.append(_timed_block(trainer.save, device)[0])
    metrics = {"epoch": st.epoch + 1, "train_loss": pipeline_mean_loss,
               "lr": trainer.optimizer.param_groups[0]["lr"], "samples_per_s": 0.0, "val_loss": 0.0,
               f"val_{cfg.val_metric}": 0.0}
    end_epoch_s = _timed_block(lambda: trainer._end_epoch(metrics), device)[0]
    return {
        "rounds": rounds, "steps_per_round": args.steps, "warmup_batches": args.warmup_batches,
        "batch_size": cfg.batch_size, "batches_per_epoch": trainer.batches_per_epoch,
        "checkpoint_every": cfg.checkpoint_every, "checkpoint_save_seconds": median(saves),
        "checkpoint_save_seconds_all": saves, "end_of_epoch_seconds": end_epoch_s, "page_cache_warm_seconds": warm_s,
        "amp_dtype": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "none",
        "device": str(device), "pipeline_mean_loss": pipeline_mean_loss,
        "bare_mean_loss": sum(bare_losses) / len(bare_losses),
    }


def timed_trainer_class():
    """``Trainer`` whose ``fit`` runs :func:`measure` (then raises :class:`_Measured`); nothing else differs."""
    from pipeline.training.loop import Trainer, TrainingForward

    class BenchTrainer(Trainer):
        bench_args: Any = None

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.bare_model = TrainingForward(copy.deepcopy(self.decoder))  # the init, before any step
            if getattr(self.cfg, "compile", False):
                import torch

                self.bare_model = torch.compile(self.bare_model)

        def fit(self, stop_after_steps=None):
            raise _Measured(measure(self, self.bare_model, self.bench_args))

    return BenchTrainer


def run_bench(cfg, args) -> dict[str, Any]:
    """``stages.train.run(cfg)`` as the command runs it, its training stage given the bench's ``Trainer``."""
    import dataclasses

    from stages import train

    cls = timed_trainer_class()
    cls.bench_args = args
    run_training_stage = train.run_training_stage

    def with_bench_trainer(stage, ctx, device):
        assert issubclass(cls, stage.trainer), f"the stage trains with {stage.trainer}, the bench with {cls}"
        return run_training_stage(dataclasses.replace(stage, trainer=cls), ctx, device)

    with mock.patch.object(train, "run_training_stage", with_bench_trainer):
        try:
            train.run(cfg)
        except _Measured as done:
            return done.result
    raise RuntimeError("stages.train.run finished without calling Trainer.fit")


# --------------------------------------------------------------------------- report
def summarise(m: dict[str, Any]) -> dict[str, Any]:
    n, bs = m["steps_per_round"], m["batch_size"]
    out: dict[str, Any] = {}
    for side in ("pipeline", "bare"):
        rs = m["rounds"][side]
        wall = sum(r["seconds"] for r in rs)
        out[side] = {
            "samples_per_s": len(rs) * n * bs / wall,
            "seconds_per_step": wall / (len(rs) * n),
            "cpu_seconds_per_step": sum(r["cpu_seconds"] for r in rs) / (len(rs) * n),
            "samples_per_s_per_round": [n * bs / r["seconds"] for r in rs],
        }
    pairs = list(zip(m["rounds"]["pipeline"], m["rounds"]["bare"], strict=True))
    per_round = [b["seconds"] / p["seconds"] for p, b in pairs]
    extra = m["end_of_epoch_seconds"] / m["batches_per_epoch"] + m["checkpoint_save_seconds"] / m["checkpoint_every"]
    amortised = [b["seconds"] / (p["seconds"] + n * extra) for p, b in pairs]
    out["ratios"] = {
        "pipeline_vs_bare": median(per_round),
        "pipeline_vs_bare_with_epoch_and_checkpoint_costs": median(amortised),
        "pipeline_vs_bare_cpu": out["bare"]["cpu_seconds_per_step"] / out["pipeline"]["cpu_seconds_per_step"],
    }
    out["ratio_per_round"] = per_round
    out["amortised_seconds_per_step"] = extra
    return out


def render(args, run: BenchRun, workload, m, s) -> str:
    rows = []
    for side, label in (("pipeline", "`pipeline train` (Trainer.fit)"), ("bare", "bare PyTorch loop")):
        v = s[side]
        rows.append([label, f"{v['samples_per_s']:,.1f}", f"{v['seconds_per_step']:.3f}",
                     f"{v['cpu_seconds_per_step']:.3f}", " / ".join(f"{x:,.1f}" for x in v["samples_per_s_per_round"])])
    r = s["ratios"]
    rows.append(["pipeline / bare", f"{r['pipeline_vs_bare']:.3f}", "", f"{r['pipeline_vs_bare_cpu']:.3f}",
                 " / ".join(f"{x:.3f}" for x in s["ratio_per_round"])])
    header = ["loop", "samples/s", "s/step", "CPU-s/step", "per round"]
    quick = " (--quick: a smoke run, not a measurement)" if args.quick else ""
    w = workload
    caption = (
        f"{w['decoder']} {w['decoder_options']} ({w['parameters'] / 1e6:.2f}M parameters), vocabulary "
        f"{w['vocab_size']}, features {w['features']} {w['token_sets']}, {w['train_captions']:,} training captions; "
        f"batch {m['batch_size']}, amp {m['amp_dtype']}, {m['device']}. {args.rounds} rounds x {args.steps} timed "
        f"steps per side after {args.warmup_batches} untimed, order alternating; the pipeline side is "
        f"`Trainer.fit(stop_after_steps={args.steps})` inside `stages.train.run` (progress bar, clipping, schedule, "
        f"loss read-back, checkpoint test), the bare side forward + `caption_loss` + backward + AdamW. Ratios: "
        f"medians of per-round ratios (CPU: of totals). With the once-per-epoch bookkeeping (best-bundle save, "
        f"dvclive, checkpoint: {m['end_of_epoch_seconds']:.2f} s per {m['batches_per_epoch']} steps) and a checkpoint save "
        f"({m['checkpoint_save_seconds']:.2f} s per {m['checkpoint_every']} steps) amortised: "
        f"**{r['pipeline_vs_bare_with_epoch_and_checkpoint_costs']:.3f}**. Validation not included. "
        f"Target >= {TARGET_RATIO}{quick}."
    )
    return (f"### Training step: `pipeline train` vs a bare loop\n\n{markdown_table(header, rows)}\n\n{caption}\n\n"
            f"{run.machine_note(torch_threads=True)}\n")


def workload_of(cfg, source: str) -> dict[str, Any]:
    from cache import FeatureCache
    from pipeline.text.tokenizers import load_tokenizer
    from pipeline.training.runs import train_val_splits
    from stages.train import build_decoder, caption_table

    cache = FeatureCache(cfg.features)
    try:
        spec = cache.spec.select(cfg.token_sets)
        tokenizer = load_tokenizer(cfg.tokenizer)
        train_records, _ = train_val_splits(cfg.manifest)
        params = sum(p.numel() for p in build_decoder(cfg, spec, tokenizer).parameters())
        return {"source": source, "features": str(cfg.features), "manifest": str(cfg.manifest),
                "tokenizer": str(cfg.tokenizer), "backbone": spec.backbone,
                "token_sets": [[t.name, t.tokens, t.channels] for t in spec.token_sets],
                "train_images": len(train_records), "train_captions": len(caption_table(train_records, tokenizer)),
                "vocab_size": tokenizer.vocab_size, "decoder": cfg.decoder, "decoder_options": cfg.decoder_options,
                "parameters": params}
    finally:
        cache.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_batches = 2, 2, 1
    import torch

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    run = BenchRun(NAME, args)
    try:
        with run.work_folder("bench-train-step-") as work:
            import shutil

            for sub in ("run", "world"):  # a kept work folder starts clean
                shutil.rmtree(work / sub, ignore_errors=True)
            cfg, source = run_config(args, work)
            cfg = cfg.model_copy(update={"seed": args.seed})
            workload = workload_of(cfg, source)
            log(f"[{NAME}] {workload['decoder']} {workload['decoder_options']} ({workload['parameters'] / 1e6:.2f}M), "
                f"{workload['train_captions']:,} captions, features {workload['token_sets']}, batch {cfg.batch_size}, "
                f"amp {cfg.amp}, from {source}")
            m = run_bench(cfg, args)
    finally:
        torch.set_num_threads(threads)
    s = summarise(m)
    markdown = render(args, run, workload, m, s)
    return run.publish({
        "train_config": jsonable(cfg.model_dump()),
        "workload": workload,
        "measurement": m,
        "loops": {k: s[k] for k in ("pipeline", "bare")},
        "ratios": s["ratios"],
        "ratio_per_round": s["ratio_per_round"],
        "targets": {"pipeline_vs_bare": TARGET_RATIO},
    }, markdown)


if __name__ == "__main__":
    main()
