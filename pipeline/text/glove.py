"""Initialise a word-embedding matrix from a GloVe text file.

The file has one ``word v1 v2 ... vD`` row per line, values separated by single
spaces (``glove.6B.300d.txt``; ``.gz`` files are read too). A first line of two
integers ``N D`` (word2vec text format) is skipped. The file is streamed: only the
vectors of the requested tokens are kept, so the 1 GB GloVe 6B 300d file needs
memory for the vocabulary only.

Lookup of each token: the token with surrounding whitespace stripped (``" dog"``,
a GPT-2/BPE token's readable form, looks up ``dog``), exactly; if absent, its
lower-cased form (GloVe 6B is lower-case). Special tokens (``<pad>``, ``<bos>``,
``<eos>``, ``<unk>``, ``<|endoftext|>`` by default) are not looked up and not
counted in the coverage; ``<pad>``'s row is zeros. Every other row not found
keeps a seeded ``N(0, init_std^2)`` initialisation (the whole matrix is drawn from
the seed first, so a row's init does not depend on which other words were found).

:func:`glove_word_embeddings` initialises a decoder's word-embedding table (``train --glove``):
only the rows of words GloVe has are written (the others keep the decoder's own random init),
and vectors of another width than the table's are mapped to it by :func:`fit_width`.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO, Any, Collection, Iterable

import numpy as np
import torch

from cache.format import file_sha256
from pipeline.errors import UserError

DEFAULT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|endoftext|>")


class GloveError(UserError, ValueError):
    """A GloVe file that cannot be used; the message names the file and line."""


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def load_glove_embeddings(
    path: Path,
    tokens: list[str],
    dim: int | None = None,
    *,
    seed: int = 0,
    init_std: float = 0.1,
    special_tokens: Iterable[str] = DEFAULT_SPECIALS,
    zero_tokens: Iterable[str] = ("<pad>",),
    on_bad_line: str = "error",
    max_missing_examples: int = 20,
) -> tuple[torch.Tensor, dict]:
    """A ``(len(tokens), D)`` float32 matrix and a coverage report.

    ``tokens`` is the vocabulary in id order (``CaptionTokenizer.tokens()``).
    ``dim``: expected vector size; None takes it from the file. ``on_bad_line``:
    ``"error"`` (default) raises :class:`GloveError` naming the file and line of a
    row with the wrong number of values or a non-number; ``"skip"`` skips such rows
    and counts them in the report (GloVe 840B has a few words containing spaces).

    Report: ``{"found", "total", "coverage", "missing_examples", "dim", "specials",
    "skipped_lines", "file", "found_ids"}``; ``total`` excludes special tokens; ``found_ids``: the
    sorted ids of the rows filled from the file.
    """
    path = Path(path)
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if not path.is_file():
        raise GloveError(f"{path}: GloVe file not found")
    exact, lower, lookup_rows = _lookup_keys(tokens, set(special_tokens))
    vectors, D, skipped = _read_vectors(path, exact.keys() | lower.keys(), dim, on_bad_line)
    matrix, found_rows = _fill_rows(len(tokens), D, exact, lower, vectors, seed=seed, init_std=init_std)
    zeros = set(zero_tokens)
    for i, tok in enumerate(tokens):
        if tok in zeros:
            matrix[i] = 0.0

    missing = [tokens[r] for r in lookup_rows if r not in found_rows]
    total = len(lookup_rows)
    report = {
        "file": str(path),
        "dim": D,
        "found": len(found_rows),
        "total": total,
        "coverage": (len(found_rows) / total) if total else 0.0,
        "missing_examples": missing[:max_missing_examples],
        "specials": len(tokens) - total,
        "skipped_lines": skipped,
        "found_ids": sorted(found_rows),
    }
    return matrix, report


def _lookup_keys(tokens: list[str], specials: set[str]) -> tuple[dict[str, list[int]], dict[str, list[int]], list[int]]:
    """The rows wanting each key: by the token stripped of whitespace (exact), and by its lower-cased form
    (the fallback); and the rows looked up at all (every token but the specials)."""
    exact: dict[str, list[int]] = {}
    lower: dict[str, list[int]] = {}
    lookup_rows: list[int] = []
    for i, tok in enumerate(tokens):
        if tok in specials:
            continue
        lookup_rows.append(i)
        key = tok.strip()
        if not key:
            continue
        exact.setdefault(key, []).append(i)
        lower.setdefault(key.lower(), []).append(i)
    return exact, lower, lookup_rows


def _read_vectors(path: Path, wanted: Collection[str], dim: int | None,
                  on_bad_line: str) -> tuple[dict[str, np.ndarray], int, int]:
    """The vectors of the ``wanted`` words (the first occurrence of each), streamed from the file; their size
    (``dim``, else the header's or the first row's) and the bad rows skipped (``on_bad_line="skip"``)."""
    vectors: dict[str, np.ndarray] = {}
    skipped = 0
    D = dim
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n").rstrip(" ")
            if not line:
                continue
            if lineno == 1:
                head = line.split(" ")
                if len(head) == 2 and head[0].isdigit() and head[1].isdigit():
                    if D is not None and int(head[1]) != D:
                        raise GloveError(f"{path}:1: header says dimension {head[1]}, expected {D}")
                    D = int(head[1])
                    continue
            if D is None:
                D = line.count(" ")
                if D < 1:
                    raise GloveError(f"{path}:{lineno}: no vector values after the word")
            n_values = line.count(" ")
            if n_values != D:
                if on_bad_line == "skip":
                    skipped += 1
                    continue
                raise GloveError(f"{path}:{lineno}: expected a word and {D} values, found {n_values} values")
            word = line[: line.index(" ")]
            if word not in wanted:
                continue
            try:
                vec = np.array(line.split(" ")[1:], dtype=np.float32)
            except ValueError:
                if on_bad_line == "skip":
                    skipped += 1
                    continue
                raise GloveError(f"{path}:{lineno}: values of {word!r} are not all numbers") from None
            vectors.setdefault(word, vec)  # the first occurrence wins
    if D is None:
        raise GloveError(f"{path}: no vectors in file")
    return vectors, D, skipped


def _fill_rows(rows: int, D: int, exact: dict[str, list[int]], lower: dict[str, list[int]],
               vectors: dict[str, np.ndarray], *, seed: int, init_std: float) -> tuple[torch.Tensor, set[int]]:
    """The ``(rows, D)`` matrix drawn from the seed, then each row with a vector by its exact key, else by its
    lower-cased key, set to it; and the rows so set."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, D, generator=gen, dtype=torch.float32) * init_std
    found_rows: set[int] = set()
    for key, key_rows in exact.items():
        if key in vectors:
            for r in key_rows:
                matrix[r] = torch.from_numpy(vectors[key])
                found_rows.add(r)
    for key, key_rows in lower.items():
        if key in vectors:
            for r in key_rows:
                if r not in found_rows:
                    matrix[r] = torch.from_numpy(vectors[key])
                    found_rows.add(r)
    return matrix, found_rows


def fit_width(vectors: torch.Tensor, width: int, *, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Map ``(R, D)`` word vectors to ``(R, width)`` by one fixed linear map that keeps their geometry.

    Returns the mapped vectors and the method:

    * ``"none"``: ``width == D``, the vectors as they are;
    * ``"orthogonal"``: ``width > D``, times a seeded random ``(D, width)`` matrix with orthonormal rows
      (QR of a Gaussian): an isometry, so every dot product, norm and distance is exactly GloVe's;
    * ``"pca"``: ``width < D``, onto the ``width`` principal directions of these vectors (uncentred PCA,
      i.e. truncated SVD; signs fixed so the largest component of each direction is positive): of all
      rank-``width`` linear maps it keeps their dot products closest to GloVe's (Eckart-Young), where a
      random projection would lose a random ``1 - width/D`` share of each vector.

    No rescaling: the mapped rows keep GloVe's scale.
    """
    dim = vectors.shape[1]
    x = vectors.to(torch.float64)
    if width == dim:
        return vectors.to(torch.float32).clone(), "none"
    if width > dim:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(width, dim, generator=gen, dtype=torch.float64))  # (width, D), Q^T Q = I
        return (x @ q.T).to(torch.float32), "orthogonal"
    _, eigvecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues; (D, D) however many rows
    basis = eigvecs[:, -width:].flip(1)  # (D, width), most energy first
    peak = basis.abs().argmax(dim=0)
    basis = basis * torch.sign(basis[peak, torch.arange(width)]).unsqueeze(0)
    return (x @ basis).to(torch.float32), "pca"


def glove_word_embeddings(decoder: Any, path: Path, tokens: list[str], *, freeze: bool = False,
                          seed: int = 0) -> dict[str, Any]:
    """Initialise ``decoder``'s word-embedding table from a GloVe file; returns what was done.

    ``decoder``: a :class:`~pipeline.models.decoders.CaptionDecoder` whose family has ``word_embeddings``;
    ``tokens``: its vocabulary in id order (the word tokenizer's). Rows of words the file has get their
    vector (through :func:`fit_width` when its size differs from the table's width, fitted on those rows);
    every other row (specials, missing words) keeps the decoder's initialisation. ``freeze``: the table is
    not trained. A file that has none of the words is a :class:`GloveError`.

    The record (for the bundle and the log): ``{"source": "glove", "file", "sha256", "dim", "width",
    "projection", "found", "total", "coverage", "frozen", "missing_examples"}``.
    """
    path = Path(path)
    table = decoder.word_embedding_table()
    matrix, report = load_glove_embeddings(path, tokens, seed=seed)
    if not report["found"]:
        raise GloveError(f"{path}: none of the vocabulary's {report['total']} words is in this GloVe file "
                         f"(e.g. {report['missing_examples'][:5]}); is it the right file?")
    ids = torch.tensor(report["found_ids"], dtype=torch.long)
    vectors, projection = fit_width(matrix[ids], table.embedding_dim, seed=seed)
    decoder.load_word_embeddings(vectors, ids, freeze=freeze)
    return {
        "source": "glove",
        "file": path.name,
        "sha256": file_sha256(path),
        "dim": report["dim"],
        "width": table.embedding_dim,
        "projection": projection,
        "found": report["found"],
        "total": report["total"],
        "coverage": report["coverage"],
        "frozen": freeze,
        "missing_examples": report["missing_examples"],
    }


__all__ = ["DEFAULT_SPECIALS", "GloveError", "fit_width", "glove_word_embeddings", "load_glove_embeddings"]
