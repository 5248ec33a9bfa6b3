"""Batched beam search versus the same search one image at a time.

Over the test images of the synthetic default (trained bundles from ``models/<family>/bundle``
and the cache in ``data/features`` when they exist; otherwise random-init decoders over random
features, labelled as such): beam 5, identical settings, both run in this process. Reports
images/s for both, their ratio (target >= 10x for the transformer), and how many images got
exactly the same caption tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import base_parser, loadavg, log, machine_info, markdown_table, write_results

NAME = "beam_search"
REPO = Path(__file__).resolve().parents[1]


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="test images per family")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=250, help="images per batched call")
    p.add_argument("--models", type=Path, default=REPO / "models")
    p.add_argument("--features", type=Path, default=REPO / "data/features")
    p.add_argument("--manifest", type=Path, default=REPO / "data/prepared/manifest.jsonl")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


def _trained(family: str, args):
    """(decoder, features (N, T, C), source label) for a trained bundle on cached test images, or None."""
    bundle = args.models / family / "bundle"
    if not (bundle / "config.json").exists() or not (args.features / "meta.json").exists():
        return None
    from cache import FeatureCache
    from pipeline.bundle import Captioner
    from pipeline.data.manifest import read_manifest

    captioner = Captioner.load(bundle)
    ids = [r.image_id for r in read_manifest(args.manifest, split="test")][: args.images]
    feats = torch.from_numpy(FeatureCache(args.features).get_batch(ids)["last"]).float()
    return captioner.decoder, feats, f"trained bundle, {len(ids)} cached test images"


def _random(family: str, args):
    from pipeline.models.decoders import create_decoder

    torch.manual_seed(args.seed)
    tiny = {"show_tell": {"embed_dim": 64, "hidden_dim": 128}, "show_attend_tell": {"embed_dim": 64, "hidden_dim": 128,
            "attention_dim": 64, "visual_dim": 64}, "transformer": {"d_model": 128, "num_layers": 2, "num_heads": 4},
            "gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 32},
            "perceiver_gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 32, "num_latents": 16,
                               "resampler_depth": 1}}[family]
    dec = create_decoder(family, feature_dim=256, vocab_size=80, pad_id=0, bos_id=1, eos_id=2, **tiny).eval()
    return dec, torch.randn(args.images, 25, 256), f"random-init decoder, {args.images} random feature maps"


def _run_family(family: str, args) -> dict:
    from pipeline.decoding import beam_search

    decoder, feats, source = _trained(family, args) or _random(family, args)
    decoder.eval()
    kw = dict(beam_size=args.beam_size, max_length=args.max_length)
    beam_search(decoder, feats[:2], **kw)  # warm-up
    t = time.perf_counter()
    batched = []
    for i in range(0, len(feats), args.batch_size):
        batched.extend(beam_search(decoder, feats[i : i + args.batch_size], **kw))
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [beam_search(decoder, feats[i : i + 1], **kw)[0] for i in range(len(feats))]
    t_single = time.perf_counter() - t
    same = sum(b[0].tokens == s[0].tokens for b, s in zip(batched, single))
    max_score_diff = max(abs(b[0].score - s[0].score) for b, s in zip(batched, single))
    row = {
        "family": family, "source": source, "images": len(feats),
        "batched_images_per_s": len(feats) / t_batched, "single_images_per_s": len(feats) / t_single,
        "ratio": t_single / t_batched, "identical_captions": same, "max_score_difference": max_score_diff,
    }
    log(f"{family}: batched {row['batched_images_per_s']:.1f} img/s, single {row['single_images_per_s']:.1f} img/s, "
        f"ratio {row['ratio']:.1f}x, identical {same}/{len(feats)}")
    return row


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.quick:
        args.images, args.batch_size = 12, 6
        args.models = Path("/nonexistent")  # random tiny decoders: a smoke run
    if args.threads:
        torch.set_num_threads(args.threads)
    before = loadavg()
    from pipeline.models.decoders import DECODERS

    rows = [_run_family(f, args) for f in DECODERS]
    result = {"name": NAME, "beam_size": args.beam_size, "max_length": args.max_length, "rows": rows,
              "loadavg_before": before, "loadavg_after": loadavg(), "machine": machine_info(), "quick": args.quick}
    write_results(args.results_dir, NAME, result)
    print(markdown_table(
        ["family", "batched img/s", "one-at-a-time img/s", "ratio", "identical captions", "source"],
        [[r["family"], r["batched_images_per_s"], r["single_images_per_s"], f"{r['ratio']:.1f}x",
          f"{r['identical_captions']}/{r['images']}", r["source"]] for r in rows]))
    return result


if __name__ == "__main__":
    main()
