"""Caption metrics: the COCO caption evaluation (pycocoevalcap), a fast CIDEr-D for SCST rewards,
and an approximate BLEU-4 for training-time validation.

:func:`coco_caption_metrics` follows the COCO evaluation: Stanford PTB tokenisation (Java) with
its punctuation removal, then BLEU-1..4, METEOR (Java), ROUGE-L, CIDEr (pycocoevalcap's
``Cider``, which is CIDEr-D: clipping, Gaussian length penalty, sigma 6) and optionally SPICE
(Java + Stanford CoreNLP models). Java is run here with timeouts, its errors are reported, and
the long-lived METEOR process is always closed. Without Java (or when the tokenizer jar fails)
the tokenisation falls back to :func:`fallback_tokenize` (labelled ``"tokenizer": "fallback"``)
and the metrics that need Java are reported unavailable. A metric that could not be computed is
``None`` with the reason in ``metrics["unavailable"]``: never 0. Nothing is ever downloaded.

Captions are evaluated exactly as given (no de-duplication or clean-up beyond the tokenisation).
Note that CIDEr's document frequencies come from the references of the evaluated images: with a
single image every n-gram has idf 0 and CIDEr is 0.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "coco_caption_metrics",
    "CiderD",
    "bleu4_fast",
    "fallback_tokenize",
    "ptb_tokenize",
    "MetricsWarning",
    "JavaError",
    "PTB_PUNCTUATIONS",
    "METRICS",
    "METRIC_KEYS",
    "METRIC_LABELS",
    "PER_IMAGE_METRICS",
]

# The COCO caption metrics in the order every table shows them, with their display labels: the one list
# evaluate's metrics.json, the gallery, `report` and bench.quality all follow.
METRICS: tuple[tuple[str, str], ...] = (
    ("BLEU-1", "BLEU-1"), ("BLEU-2", "BLEU-2"), ("BLEU-3", "BLEU-3"), ("BLEU-4", "BLEU-4"),
    ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"), ("SPICE", "SPICE"),
)
METRIC_KEYS = tuple(key for key, _ in METRICS)
METRIC_LABELS = dict(METRICS)
PER_IMAGE_METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L", "SPICE")  # scored per image as well (SPICE: if run)

# Exactly pycocoevalcap's list (its tokenizer lower-cases first, so "-lrb-" & co. stay).
PTB_PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
_PUNCT_SET = frozenset(PTB_PUNCTUATIONS)

JAVA_TIMEOUT_S = 600.0  # per Java call


class MetricsWarning(UserWarning):
    """A metric was skipped or computed in a degraded way (the message says which and why)."""


class JavaError(RuntimeError):
    """A Java tool is missing or failed (the message says which and why)."""


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap.bleu.bleu as bleu_module  # pycocoevalcap is a namespace package

    return Path(bleu_module.__file__).resolve().parents[1]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaError("java was not found on PATH")
    return java


def _tail(data: bytes, limit: int = 600) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-limit:]


# --------------------------------------------------------------------------- tokenisation
_UNICODE_MAP = str.maketrans(
    {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'", "\u2014": " -- ", "\u2013": " -- ",
     "\u2026": " ... ", "\u00a0": " "}
)
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ", "]": " -rsb- "}
_CLITIC_RE = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)(?=\s|$|[^a-z0-9'])")
_SPLIT_RE = re.compile(r'(\.\.\.|--|[;!?"`$#]|,(?!\d)|:(?!\d))')
_KEEP_APOS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})


def fallback_tokenize(text: str) -> str:
    """A pure-Python approximation of ``PTBTokenizer -lowerCase`` + pycocoevalcap's punctuation
    removal: lower-case, split off clitics ("dog's" -> "dog 's", "isn't" -> "is n't") and
    punctuation, brackets become ``-lrb-``/``-rrb-`` (kept, as in pycocoevalcap), then the
    punctuation tokens of :data:`PTB_PUNCTUATIONS` are dropped. Identical to the PTB tokenizer
    on ordinary captions; may differ on abbreviations ("st." -> "st") and rare symbols."""
    s = text.lower().translate(_UNICODE_MAP)
    for b, rep in _BRACKETS.items():
        s = s.replace(b, rep)
    s = _CLITIC_RE.sub(r" \1", s)
    s = _SPLIT_RE.sub(r" \1 ", s)
    out: list[str] = []
    for tok in s.split():
        if tok in _KEEP_APOS:
            out.append(tok)
            continue
        tok = tok.strip("'`")  # quoting apostrophes
        if tok.endswith(".") and tok.count(".") == 1 and len(tok) > 1:
            tok = tok[:-1]  # sentence-final / stray period ("dog." -> "dog"); keeps "3.5", "p.m."
        if tok.startswith('"'):
            tok = tok[1:]
        if not tok or tok in _PUNCT_SET or tok == '"':
            continue
        out.append(tok)
    return " ".join(out)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], *, timeout: float = JAVA_TIMEOUT_S) -> dict[Hashable, list[str]]:
    """pycocoevalcap's tokenisation (Stanford PTBTokenizer ``-preserveLines -lowerCase`` then
    removal of :data:`PTB_PUNCTUATIONS`), run robustly: a private temporary file, UTF-8, a
    timeout, a checked exit status and a sentinel line that proves every caption came back.
    Raises :class:`JavaError` on any failure."""
    java = _java()
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.exists():
        raise JavaError(f"the PTB tokenizer jar is missing: {jar}")
    keys: list[Hashable] = []
    lines: list[str] = []
    for k, caps in captions.items():
        for c in caps:
            keys.append(k)
            lines.append(c.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
    sentinel = "zzptbsentinelzz"
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(lines + [sentinel]), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "utf-8", str(path)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise JavaError(f"the PTB tokenizer timed out after {timeout:.0f} s") from e
        except OSError as e:
            raise JavaError(f"could not start java for the PTB tokenizer: {e}") from e
    if proc.returncode != 0:
        raise JavaError(f"the PTB tokenizer failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    out_lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(out_lines) < len(lines) + 1 or out_lines[len(lines)].strip() != sentinel:
        raise JavaError(
            f"the PTB tokenizer returned {len(out_lines)} lines for {len(lines)} captions: {_tail(proc.stderr)}"
        )
    result: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, out_lines):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCT_SET))
    return result


# --------------------------------------------------------------------------- Java metrics
class _JavaProcess:
    """A Java subprocess with a watchdog (killed after ``timeout`` s) that is always reaped."""

    def __init__(self, cmd: list[str], cwd: Path, timeout: float) -> None:
        self._err = tempfile.TemporaryFile()
        self.timed_out = False
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self._timer = threading.Timer(timeout, self._kill_on_timeout)
        self._timer.daemon = True
        self._timer.start()

    def _kill_on_timeout(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def stderr_tail(self) -> str:
        try:
            self._err.seek(0)
            return _tail(self._err.read())
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        self._timer.cancel()
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> "_JavaProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _meteor(gts: dict, res: dict, ids: list, timeout: float) -> tuple[float, list[float]]:
    """METEOR 1.5 exactly as pycocoevalcap runs it (``-stdio -l en -norm``, SCORE lines then one
    EVAL line), with a watchdog and the process always closed."""
    java = _java()
    jar = _pycocoevalcap_dir() / "meteor" / "meteor-1.5.jar"
    if not jar.exists():
        raise JavaError(f"the METEOR jar is missing: {jar}")
    cmd = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    try:
        p = _JavaProcess(cmd, jar.parent, timeout)
    except OSError as e:
        raise JavaError(f"could not start METEOR: {e}") from e
    with p:
        try:
            def readline() -> str:
                line = p.proc.stdout.readline()
                if not line:
                    why = f"timed out after {timeout:.0f} s" if p.timed_out else "exited"
                    raise JavaError(f"METEOR {why}: {p.stderr_tail()}")
                return line.decode("utf-8", "replace").strip()

            stats = []
            for i in ids:
                hyp = res[i][0].replace("|||", "").replace("  ", " ")
                refs = [r.replace("|||", "") for r in gts[i]]
                p.proc.stdin.write(("SCORE ||| " + " ||| ".join(refs) + " ||| " + hyp + "\n").encode("utf-8"))
                p.proc.stdin.flush()
                stats.append(readline())
            p.proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
            p.proc.stdin.flush()
            per_image = [float(readline()) for _ in ids]
            total = float(readline())
        except (OSError, ValueError) as e:  # broken pipe, unparsable output
            raise JavaError(f"METEOR failed: {e}; {p.stderr_tail()}") from e
    return total, per_image


def _spice_missing() -> Optional[str]:
    d = _pycocoevalcap_dir() / "spice"
    needed = [d / "spice-1.0.jar", d / "lib" / "stanford-corenlp-3.6.0.jar", d / "lib" / "stanford-corenlp-3.6.0-models.jar"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        return (
            "SPICE needs " + ", ".join(missing) + " (pycocoevalcap downloads Stanford CoreNLP 3.6.0 on first use; "
            "this pipeline never downloads: put the jars there to enable SPICE)"
        )
    return None


def _spice(gts: dict, res: dict, ids: list, timeout: float) -> tuple[float, list[float]]:
    java = _java()
    d = _pycocoevalcap_dir() / "spice"
    data = [{"image_id": i, "test": res[k][0], "refs": gts[k]} for i, k in enumerate(ids)]
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(data), encoding="utf-8")
        cmd = [java, "-jar", "-Xmx8G", "spice-1.0.jar", str(inp), "-out", str(out), "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, cwd=d, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise JavaError(f"SPICE timed out after {timeout:.0f} s") from e
        except OSError as e:
            raise JavaError(f"could not start SPICE: {e}") from e
        if proc.returncode != 0 or not out.exists():
            raise JavaError(f"SPICE failed (exit {proc.returncode}): {_tail(proc.stderr)}")
        results = json.loads(out.read_text(encoding="utf-8"))
    by_id = {r["image_id"]: r for r in results}
    per_image = []
    for i in range(len(ids)):
        try:
            per_image.append(float(by_id[i]["scores"]["All"]["f"]))
        except (KeyError, TypeError, ValueError):
            per_image.append(float("nan"))
    return float(np.nanmean(per_image)), per_image


# --------------------------------------------------------------------------- COCO metrics
def _check_inputs(results: Mapping, references: Mapping) -> list:
    if not results:
        raise ValueError("no results to evaluate")
    ids = list(results)
    missing = [i for i in ids if i not in references]
    if missing:
        raise ValueError(
            f"{len(missing)} result image id(s) have no references, e.g. {missing[:5]!r} "
            f"(reference ids look like {list(references)[:3]!r})"
        )
    for i in ids:
        if not isinstance(results[i], str):
            raise TypeError(f"the result for image {i!r} must be one caption string, got {type(results[i]).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"the references of image {i!r} must be a non-empty list of strings")
    return ids


def coco_caption_metrics(
    results: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    spice: bool = False,
    timeout: float = JAVA_TIMEOUT_S,
) -> dict[str, Any]:
    """COCO caption metrics of ``results`` (one caption per image id) against ``references``
    (a list of captions per image id; ids without a result are ignored, a result without
    references is an error).

    Returns::

        {"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "METEOR": ..|None,
         "ROUGE_L": .., "CIDEr": .., "SPICE": ..|None,
         "tokenizer": "ptb" | "fallback", "num_images": n,
         "unavailable": {metric: reason}, "warnings": [message, ...],
         "per_image": {"CIDEr": {id: ..}, "BLEU-4": {id: ..}, "ROUGE_L": {id: ..},
                       "METEOR": {id: ..} (when computed), "SPICE": {id: ..} (when computed)}}

    Metric values are on pycocoevalcap's scale (0..1, CIDEr 0..10). Everything skipped or
    degraded is also announced with a :class:`MetricsWarning`.
    """
    ids = _check_inputs(results, references)
    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        warnings.warn(msg, MetricsWarning, stacklevel=3)
        log.warning(msg)

    java_ok = shutil.which("java") is not None
    gts, res, tokenizer, fallback_note = _tokenize_for_coco(results, references, ids, java_ok, timeout)
    if fallback_note is not None:
        warn(fallback_note)
    scores = _CocoScores(ids)
    _bleu_scores(scores, gts, res)
    _meteor_score(scores, gts, res, java_ok, timeout)
    _rouge_and_cider_scores(scores, gts, res)
    if len(ids) < 2:
        warn("CIDEr over a single image is 0 by construction (its idf comes from the evaluated images)")
    _spice_score(scores, gts, res, spice, java_ok, timeout)
    for metric, reason in scores.unavailable.items():
        if not (metric == "SPICE" and not spice):
            warn(f"{metric} unavailable: {reason}")
    return {**scores.values, "tokenizer": tokenizer, "num_images": len(ids), "unavailable": scores.unavailable,
            "warnings": notes, "per_image": scores.per_image}


@dataclass
class _CocoScores:
    """The metrics of :func:`coco_caption_metrics` as they are computed: values (None: unavailable, with the
    reason in ``unavailable``) and per-image values by image id (``ids``, in the scorers' order)."""

    ids: list
    values: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, dict[Hashable, float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def add_per_image(self, metric: str, values: Sequence[float]) -> None:
        self.per_image[metric] = {i: float(v) for i, v in zip(self.ids, values)}


def _tokenize_for_coco(results: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], ids: list,
                       java_ok: bool, timeout: float) -> tuple[dict, dict, str, Optional[str]]:
    """References and results tokenized, keyed by position (``gts``, ``res``), with one Java call for both; the
    tokenizer used (``ptb`` or ``fallback``) and, for the fallback, the warning that says so."""
    to_tokenize: dict[Hashable, list[str]] = {}
    for n, i in enumerate(ids):
        to_tokenize[("res", n)] = [results[i]]
        to_tokenize[("gts", n)] = list(references[i])
    tokenizer, note = "ptb", None
    try:
        tok = ptb_tokenize(to_tokenize, timeout=timeout)
    except JavaError as e:
        tokenizer = "fallback"
        tok = {k: [fallback_tokenize(c) for c in v] for k, v in to_tokenize.items()}
        skipped = "METEOR and SPICE are skipped" if not java_ok else "METEOR/SPICE are still attempted"
        note = (
            f"PTB tokenizer unavailable ({e}); captions were tokenized with the pure-Python fallback "
            f"(lower-case, PTB-style punctuation removal), so BLEU/ROUGE-L/CIDEr are close to but not "
            f"exactly the official numbers; {skipped}"
        )
    res = {n: tok[("res", n)] for n in range(len(ids))}
    gts = {n: tok[("gts", n)] for n in range(len(ids))}
    return gts, res, tokenizer, note


def _bleu_scores(scores: _CocoScores, gts: dict, res: dict) -> None:
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        scores.values[f"BLEU-{k + 1}"] = float(bleu[k])
    scores.add_per_image("BLEU-4", bleu_per[3])


def _meteor_score(scores: _CocoScores, gts: dict, res: dict, java_ok: bool, timeout: float) -> None:
    scores.values["METEOR"] = None
    if not java_ok:
        scores.unavailable["METEOR"] = "java was not found on PATH (METEOR 1.5 is a Java program)"
        return
    try:
        meteor, meteor_per = _meteor(gts, res, list(range(len(scores.ids))), timeout)
    except JavaError as e:
        scores.unavailable["METEOR"] = str(e)
        return
    scores.values["METEOR"] = float(meteor)
    scores.add_per_image("METEOR", meteor_per)


def _rouge_and_cider_scores(scores: _CocoScores, gts: dict, res: dict) -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rouge, rouge_per = Rouge().compute_score(gts, res)
    scores.values["ROUGE_L"] = float(rouge)
    scores.add_per_image("ROUGE_L", rouge_per)
    cider, cider_per = Cider().compute_score(gts, res)
    scores.values["CIDEr"] = float(cider)
    scores.add_per_image("CIDEr", cider_per)


def _spice_score(scores: _CocoScores, gts: dict, res: dict, spice: bool, java_ok: bool, timeout: float) -> None:
    scores.values["SPICE"] = None
    if not spice:
        scores.unavailable["SPICE"] = "not requested (pass spice=True)"
    elif not java_ok:
        scores.unavailable["SPICE"] = "java was not found on PATH (SPICE is a Java program)"
    elif (why := _spice_missing()) is not None:
        scores.unavailable["SPICE"] = why
    else:
        try:
            sp, sp_per = _spice(gts, res, list(range(len(scores.ids))), timeout)
        except JavaError as e:
            scores.unavailable["SPICE"] = str(e)
            return
        scores.values["SPICE"] = sp
        scores.per_image["SPICE"] = {i: v for i, v in zip(scores.ids, sp_per)}


# --------------------------------------------------------------------------- CIDEr-D for SCST
RefsLike = Union[int, Hashable, Sequence[str]]


class CiderD:
    """CIDEr-D with document frequencies precomputed once from a reference corpus (for SCST).

    ``CiderD(corpus_refs)``: ``corpus_refs`` is a sequence (or a mapping image id -> ...) of the
    reference captions of every image of the corpus (e.g. the training set). The idf of an
    n-gram is ``log(len(corpus)) - log(max(1, df))`` where ``df`` counts the images of the
    corpus having the n-gram in at least one reference, exactly as pycocoevalcap's
    ``CiderScorer`` computes it over the evaluated set: given the same corpus (the candidates'
    references), :meth:`score` equals pycocoevalcap's per-image CIDEr (to float rounding).
    The formula is pycocoevalcap's (n = 1..4, tf-idf vectors, clipped similarity
    ``min(h, r) * r``, Gaussian length penalty with ``sigma = 6`` where the "length" is, as in
    pycocoevalcap, the number of bigrams, i.e. words - 1; mean over n, mean over references,
    times 10).

    Tokenisation is a plain ``str.split()``: pass text that is already lower-cased and
    tokenised the same way for references and candidates (e.g. the PTB-tokenised references
    and detokenised model captions without bos/eos).
    """

    def __init__(
        self,
        corpus_refs: Union[Sequence[Sequence[str]], Mapping[Hashable, Sequence[str]]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        cache_size: int = 100_000,
    ) -> None:
        if isinstance(corpus_refs, Mapping):
            self._key_index: Optional[dict[Hashable, int]] = {k: j for j, k in enumerate(corpus_refs)}
            refs_list = list(corpus_refs.values())
        else:
            self._key_index = None
            refs_list = list(corpus_refs)
        if not refs_list:
            raise ValueError("CiderD needs a non-empty reference corpus")
        for refs in refs_list:
            if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
                raise TypeError("corpus_refs must hold, per image, a list of reference strings")
        self.n = n
        self.sigma = float(sigma)
        self._corpus = [list(r) for r in refs_list]
        df: dict[tuple, float] = {}
        for refs in self._corpus:
            for g in {g for r in refs for g in self._ngrams(r)}:
                df[g] = df.get(g, 0.0) + 1.0
        self.num_documents = len(self._corpus)
        self.ref_len = float(np.log(float(self.num_documents)))
        # idf per n-gram of the corpus; any other n-gram has df 0 -> idf = ref_len
        self._idf = {g: self.ref_len - float(np.log(max(1.0, c))) for g, c in df.items()}
        self._cache_size = cache_size
        self._ref_cache: "OrderedDict[int, list]" = OrderedDict()

    # -- internals
    def _ngrams(self, sentence: str) -> dict[tuple, int]:
        words = sentence.split()
        counts: dict[tuple, int] = {}
        for k in range(1, self.n + 1):
            for i in range(len(words) - k + 1):
                g = tuple(words[i : i + k])
                counts[g] = counts.get(g, 0) + 1
        return counts

    def _vec(self, sentence: str) -> tuple[dict[tuple, float], list[float], int]:
        counts = self._ngrams(sentence)
        vec: dict[tuple, float] = {}
        norm2 = [0.0] * self.n
        idf, default = self._idf, self.ref_len
        for g, tf in counts.items():
            w = float(tf) * idf.get(g, default)
            vec[g] = w
            norm2[len(g) - 1] += w * w
        length = max(len(sentence.split()) - 1, 0)  # pycocoevalcap counts bigrams as the length
        return vec, [math.sqrt(x) for x in norm2], length

    def _ref_vecs(self, refs: RefsLike) -> list:
        explicit = isinstance(refs, list) or (
            isinstance(refs, tuple) and not (self._key_index is not None and refs in self._key_index)
        )
        if explicit:
            if not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"explicit references must be a non-empty list of strings, got {refs!r}")
            return [self._vec(r) for r in refs]
        if self._key_index is not None:
            try:
                j = self._key_index[refs]
            except (KeyError, TypeError):
                raise KeyError(f"image {refs!r} is not in the CiderD corpus") from None
        else:
            j = int(refs)  # type: ignore[arg-type]
            if not 0 <= j < self.num_documents:
                raise IndexError(f"reference index {j} outside the corpus of {self.num_documents} images")
        cached = self._ref_cache.get(j)
        if cached is not None:
            self._ref_cache.move_to_end(j)
            return cached
        vecs = [self._vec(r) for r in self._corpus[j]]
        if self._cache_size > 0:
            self._ref_cache[j] = vecs
            if len(self._ref_cache) > self._cache_size:
                self._ref_cache.popitem(last=False)
        return vecs

    def _sim_sum(self, hyp: tuple, refs: list) -> float:
        """Sum over references and n-gram orders of the clipped, penalised cosine similarity."""
        hv, hn, hl = hyp
        total = 0.0
        two_s2 = 2.0 * self.sigma**2
        for rv, rn, rl in refs:
            val = [0.0] * self.n
            for g, hw in hv.items():
                rw = rv.get(g)
                if rw is not None:
                    val[len(g) - 1] += min(hw, rw) * rw
            penalty = math.exp(-((hl - rl) ** 2) / two_s2)
            for k in range(self.n):
                if hn[k] != 0 and rn[k] != 0:
                    val[k] /= hn[k] * rn[k]
                total += val[k] * penalty
        return total

    # -- public
    def score(self, candidates: Sequence[str], refs_index: Sequence[RefsLike]) -> np.ndarray:
        """Per-candidate CIDEr-D (float64 array). ``refs_index[i]`` names the references of
        ``candidates[i]``: an index into the corpus (or its key when the corpus was a mapping),
        or an explicit list of reference strings (idf still from the corpus). Repeated
        candidates and references are computed once."""
        if len(candidates) != len(refs_index):
            raise ValueError(f"{len(candidates)} candidates but {len(refs_index)} reference entries")
        scores = np.zeros(len(candidates), dtype=np.float64)
        hyp_cache: dict[str, tuple] = {}
        for i, (cand, refs) in enumerate(zip(candidates, refs_index)):
            hyp = hyp_cache.get(cand)
            if hyp is None:
                hyp = hyp_cache[cand] = self._vec(cand)
            ref_vecs = self._ref_vecs(refs)
            scores[i] = self._sim_sum(hyp, ref_vecs) / self.n / len(ref_vecs) * 10.0
        return scores

    def corpus_score(self, candidates: Sequence[str], refs_index: Sequence[RefsLike]) -> float:
        """Mean of :meth:`score`."""
        return float(self.score(candidates, refs_index).mean()) if len(candidates) else 0.0


# --------------------------------------------------------------------------- quick BLEU
def bleu4_fast(results: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Approximate corpus BLEU-4 (0..1) for training-time validation: NLTK ``corpus_bleu``
    (offline, no smoothing) on :func:`fallback_tokenize` tokens. Close to, but not the same as,
    the official number of :func:`coco_caption_metrics` (different tokenizer, no smoothing
    constants); use that for reporting."""
    from nltk.translate.bleu_score import corpus_bleu

    ids = _check_inputs(results, references)
    hyps = [fallback_tokenize(results[i]).split() for i in ids]
    refs = [[fallback_tokenize(r).split() for r in references[i]] for i in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about zero n-gram overlaps
        return float(corpus_bleu(refs, hyps))
