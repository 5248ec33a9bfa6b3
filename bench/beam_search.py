"""Batched beam search versus the same search one image at a time, for every decoder family.

The workload is cached test images (``--features``, ``--manifest``; the test split in the evaluate
stage's order) and, per family, the trained bundle given with ``--bundle`` or found at
``--models/<family>/bundle`` when it was trained on features like these; otherwise a random-init
decoder of that family at real sizes (the family's config defaults; the transformer at d_model 512,
3 layers, 8 heads) built for the cache's token layout and the tokenizer's vocabulary (``--tokenizer``,
else a given bundle's), over the same real features. The table says which each row is. Without a
feature cache the decoders run over random features, labelled as such; ``--quick`` is a smoke run of
tiny random decoders over random features.

Both searches run in this process with identical settings (the evaluate stage's: max_length the
tokenizer's, length penalty 0, one hypothesis), chunk by chunk and interleaved: each chunk of
``--batch-size`` images (64, the evaluate stage's batch) is searched batched, then its images one at a
time, so that the machine's other load weighs on both alike. Reports images/s for both, their ratio
(one-at-a-time time / batched time; target >= 8x for every family), the same ratio in this process's
CPU time (``cpu_ratio``: what the searches cost, whatever else the machine runs; with one torch thread,
``--threads 1``, it is the steadier number on a shared machine), and how many images got exactly the same
caption tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import BenchRun, base_parser, log, markdown_table

NAME = "beam_search"
REPO = Path(__file__).resolve().parents[1]

# Random-init decoders at real sizes are the families' config defaults (the transformer's: 512 x 3 x 8).
TINY_SIZES: dict[str, dict[str, Any]] = {
    "show_tell": {"embed_dim": 64, "hidden_dim": 128},
    "show_attend_tell": {"embed_dim": 64, "hidden_dim": 128, "attention_dim": 64, "visual_dim": 64},
    "transformer": {"d_model": 128, "num_layers": 2, "num_heads": 4},
    "gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 32},
    "perceiver_gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 32, "num_latents": 16,
                       "resampler_depth": 1},
}


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="test images per family")
    p.add_argument("--beam-size", type=int, nargs="+", default=[3], help="beam sizes to measure (3: the recipes')")
    p.add_argument("--max-length", type=int, default=None, help="default: the tokenizer's (the evaluate stage's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batched call (the evaluate stage's 64)")
    p.add_argument("--models", type=Path, default=REPO / "models", help="trained bundles at DIR/<family>/bundle")
    p.add_argument("--bundle", type=Path, action="append", default=[],
                   help="a trained bundle, measured for its family (repeatable; wins over --models)")
    p.add_argument("--features", type=Path, default=REPO / "data/features", help="feature cache of the test images")
    p.add_argument("--manifest", type=Path, default=REPO / "data/prepared/manifest.jsonl")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="vocabulary of the random-init decoders (default: a --bundle's, else models/tokenizers/word)")
    p.add_argument("--families", nargs="+", default=None, help="default: every registered family")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


class Workload:
    """The test images' cached features and what random-init decoders are built for."""

    def __init__(self, args) -> None:
        from cache import FeatureCache
        from pipeline.data.manifest import read_manifest
        from pipeline.text.tokenizers import load_tokenizer

        self.args = args
        self.cache = FeatureCache(args.features) if (args.features / "meta.json").exists() else None
        self.ids: list[str] = []
        if self.cache is not None:
            records = sorted(read_manifest(args.manifest, split="test"), key=lambda r: r.image_id)
            self.ids = [r.image_id for r in records][: args.images]
            self.arrays = self.cache.get_batch(self.ids)
        tokenizer_dir = args.tokenizer or (args.bundle[0] / "tokenizer" if args.bundle
                                           else REPO / "models/tokenizers/word")
        self.tokenizer = load_tokenizer(tokenizer_dir) if (tokenizer_dir / "caption_tokenizer.json").exists() else None
        if self.cache is not None and self.tokenizer is None:
            raise SystemExit(f"error: no tokenizer at {tokenizer_dir} for the random-init decoders (--tokenizer DIR)")

    def features(self, token_sets: Optional[list[str]] = None) -> torch.Tensor:
        from pipeline.data.features import select_features

        return torch.from_numpy(select_features(self.arrays, token_sets)).float()

    def describe(self) -> str:
        return f"{len(self.ids)} cached test images ({self.cache.spec.backbone})"


def _trained(family: str, work: Workload):
    """(decoder, features, max_length, source) of a trained bundle of ``family`` that fits the cache, or None."""
    from cache import CacheError
    from pipeline.inference.bundle import Captioner, read_bundle_config

    given = [b for b in work.args.bundle if read_bundle_config(b)["decoder"]["family"] == family]
    bundle = given[0] if given else work.args.models / family / "bundle"
    if work.cache is None or not (bundle / "config.json").exists():
        return None
    captioner = Captioner.load(bundle)
    try:
        captioner.check_spec(work.cache.spec, f"the cache {work.cache.directory}")
    except (CacheError, ValueError):
        if given:
            raise
        log(f"{family}: {bundle} was trained on other features than {work.cache.directory}: random-init instead")
        return None
    max_length = work.args.max_length or captioner.tokenizer.max_length
    feats = work.features([t.name for t in captioner.features.token_sets])
    return captioner.decoder, feats, max_length, f"trained bundle {bundle}, {work.describe()}"


def _random(family: str, work: Workload):
    """(decoder, features, max_length, source): a random-init decoder at real sizes over the cached features;
    a tiny one over random features without a cache (and for --quick)."""
    from pipeline.data.features import token_layout
    from pipeline.models.decoders import create_decoder

    torch.manual_seed(work.args.seed)
    if work.cache is None:
        dec = create_decoder(family, feature_dim=256, vocab_size=80, pad_id=0, bos_id=1, eos_id=2, **TINY_SIZES[family])
        feats = torch.randn(work.args.images, 25, 256, generator=torch.Generator().manual_seed(work.args.seed))
        return (dec, feats, work.args.max_length or 20,
                f"random-init tiny decoder, {work.args.images} random feature maps")
    tok = work.tokenizer
    dec = create_decoder(family, token_sets=token_layout(work.cache.spec.token_sets), vocab_size=tok.vocab_size,
                         pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    params = sum(p.numel() for p in dec.parameters()) / 1e6
    return (dec, work.features(), work.args.max_length or tok.max_length,
            f"random-init decoder at real sizes ({params:.1f} M parameters), {work.describe()}")


def _run_family(family: str, beam_sizes: list[int], work: Workload) -> list[dict]:
    from pipeline.inference.decoding import beam_search

    decoder, feats, max_length, source = _trained(family, work) or _random(family, work)
    decoder.eval()
    rows = []
    for beam in beam_sizes:
        kw = dict(beam_size=beam, max_length=max_length)
        beam_search(decoder, feats[:2], **kw)  # warm-up
        wall, cpu = {"batched": 0.0, "single": 0.0}, {"batched": 0.0, "single": 0.0}
        batched, single = [], []
        for i in range(0, len(feats), work.args.batch_size):
            chunk = feats[i : i + work.args.batch_size]
            # each search runs at once, in this iteration (B023 warns of lambdas kept past their loop)
            for mode, search in (("batched", lambda: batched.extend(beam_search(decoder, chunk, **kw))),  # noqa: B023
                                 ("single", lambda: single.extend(beam_search(decoder, chunk[j : j + 1], **kw)[0]  # noqa: B023
                                                                  for j in range(len(chunk))))):  # noqa: B023
                t, c = time.perf_counter(), time.process_time()
                search()
                wall[mode] += time.perf_counter() - t
                cpu[mode] += time.process_time() - c
        t_batched, t_single = wall["batched"], wall["single"]
        same = sum(b[0].tokens == s[0].tokens for b, s in zip(batched, single))
        max_score_diff = max(abs(b[0].score - s[0].score) for b, s in zip(batched, single))
        row = {
            "family": family, "source": source, "beam_size": beam, "max_length": max_length,
            "batch_size": work.args.batch_size, "images": len(feats),
            "batched_images_per_s": len(feats) / t_batched, "single_images_per_s": len(feats) / t_single,
            "ratio": t_single / t_batched, "cpu_seconds": cpu, "cpu_ratio": cpu["single"] / cpu["batched"],
            "identical_captions": same, "max_score_difference": max_score_diff,
        }
        log(f"{family} beam {beam}: batched {row['batched_images_per_s']:.1f} img/s, single "
            f"{row['single_images_per_s']:.1f} img/s, ratio {row['ratio']:.1f}x (CPU time {row['cpu_ratio']:.1f}x), "
            f"identical {same}/{len(feats)}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.quick:
        args.images, args.batch_size = 12, 6
        args.models, args.bundle = Path("/nonexistent"), []  # random tiny decoders over random features
        args.features = Path("/nonexistent")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchRun(NAME, args)
    from pipeline.models.decoders import DECODERS

    work = Workload(args)
    rows = [row for f in (args.families or DECODERS) for row in _run_family(f, args.beam_size, work)]
    run.finish()
    markdown = markdown_table(
        ["family", "beam", "batched img/s", "one-at-a-time img/s", "ratio", "ratio (CPU time)", "identical captions",
         "source"],
        [[r["family"], r["beam_size"], r["batched_images_per_s"], r["single_images_per_s"], f"{r['ratio']:.1f}x",
          f"{r['cpu_ratio']:.1f}x", f"{r['identical_captions']}/{r['images']}", r["source"]] for r in rows])
    result = run.publish({"beam_sizes": args.beam_size, "batch_size": args.batch_size, "rows": rows}, markdown)
    log(f"chunks of {args.batch_size} images, torch threads {torch.get_num_threads()}: {run.load_note()} "
        "The ratio compares the two searches run side by side.")
    return result


if __name__ == "__main__":
    main()
