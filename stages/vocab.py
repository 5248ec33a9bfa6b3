"""`vocab`: build the tokenizers from the training captions.

Inputs: ``cfg.manifest`` (only its train split is read).
Outputs: ``cfg.out_dir/<kind>/`` for each kind in ``cfg.kinds`` (JSON files, deterministic),
and ``cfg.out_dir/report.json`` (sizes, coverage of training words, GloVe coverage).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.config import VocabConfig, config_to_dict
from pipeline.data.manifest import iter_manifest
from pipeline.files import write_json
from pipeline.text.tokenizers import build_tokenizer, split_words, training_captions

log = logging.getLogger(__name__)

ENCODE_CHUNK = 10_000  # captions encoded at a time to measure their lengths


def run(cfg: VocabConfig) -> dict:
    captions = list(training_captions(iter_manifest(cfg.manifest)))  # the captions only, not the records
    if not captions:
        raise ValueError(f"{cfg.manifest}: no training captions (is there a train split?)")
    out = Path(cfg.out_dir)
    report: dict = {"train_captions": len(captions), "tokenizers": {}, "config": config_to_dict(cfg)}
    for kind in cfg.kinds:
        if kind == "word":
            tok = build_tokenizer("word", captions, min_freq=cfg.min_freq, max_length=cfg.max_length,
                                  lowercase=cfg.lowercase, max_size=cfg.max_words)
        elif kind == "bpe":
            tok = build_tokenizer("bpe", captions, vocab_size=cfg.bpe_vocab_size,
                                  min_frequency=cfg.bpe_min_frequency, max_length=cfg.max_length)
        else:
            tok = build_tokenizer("gpt2", path=cfg.gpt2_path, max_length=cfg.max_length)
        tok.save(out / kind)
        lengths = np.fromiter((len(ids) for start in range(0, len(captions), ENCODE_CHUNK)
                               for ids in tok.encode_batch(captions[start:start + ENCODE_CHUNK])),
                              dtype=np.int64, count=len(captions))
        truncated = int((lengths > cfg.max_length).sum())
        info = {"vocab_size": tok.vocab_size, "mean_tokens": float(lengths.mean()),
                "max_tokens": int(lengths.max()), "captions_truncated": truncated}
        if kind == "word":
            known = total = 0
            for c in captions:
                words = split_words(c, lowercase=cfg.lowercase)
                total += len(words)
                known += sum(tok.token_to_id(w) not in (None, tok.unk_id) for w in words)
            info["train_word_coverage"] = known / max(1, total)
            if cfg.glove is not None:
                from pipeline.text.glove import load_glove_embeddings

                _, glove = load_glove_embeddings(cfg.glove, tok.tokens())
                info["glove"] = {k: glove[k] for k in ("found", "total", "coverage", "dim")}
                log.info("GloVe %s covers %.1f%% of the word vocabulary", cfg.glove, 100 * glove["coverage"])
        report["tokenizers"][kind] = info
        log.info("vocab %s: %d tokens, %.1f tokens per caption, %d truncated -> %s", kind, tok.vocab_size,
                 info["mean_tokens"], truncated, out / kind)
    write_json(out / "report.json", report)
    return report
