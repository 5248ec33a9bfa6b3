"""`vocab`: build the tokenizers from the training captions.

Inputs: ``cfg.manifest`` (only its train split is read).
Outputs: ``cfg.out_dir/<kind>/`` for each kind in ``cfg.kinds`` (JSON files, deterministic),
and ``cfg.out_dir/report.json`` (sizes, coverage of training words, GloVe coverage).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import VocabConfig, config_to_dict
from pipeline.data.manifest import read_manifest
from pipeline.files import write_json
from pipeline.text.tokenizers import build_tokenizer, split_words, training_captions

log = logging.getLogger(__name__)


def run(cfg: VocabConfig) -> dict:
    records = read_manifest(cfg.manifest)
    captions = list(training_captions(records))
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
        lengths = [len(ids) for ids in tok.encode_batch(captions)]
        truncated = sum(n > cfg.max_length for n in lengths)
        info = {"vocab_size": tok.vocab_size, "mean_tokens": sum(lengths) / len(lengths),
                "max_tokens": max(lengths), "captions_truncated": truncated}
        if kind == "word":
            words = [w for c in captions for w in split_words(c, lowercase=cfg.lowercase)]
            known = sum(tok.token_to_id(w) not in (None, tok.unk_id) for w in words)
            info["train_word_coverage"] = known / max(1, len(words))
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
