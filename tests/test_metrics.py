"""Caption metrics: pycocoevalcap wrapper (with and without Java), CIDEr-D for SCST, quick BLEU."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import (
    CiderD,
    MetricsWarning,
    bleu4_fast,
    coco_caption_metrics,
    fallback_tokenize,
)

REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.", "a person surfing in the ocean"],
    2: ["Two giraffes standing next to each other in a field.", "A pair of giraffes in the grass.", "giraffes near trees"],
    3: ["A plate of food with rice and beans.", "Food on a white plate.", "a dinner plate with rice, beans and meat"],
    "bus": ["A red bus driving down a city street.", "A double decker bus on the road.", "a bus in traffic"],
}
RESULTS = {
    1: "A man riding a wave on top of a surfboard.",  # identical to a reference
    2: "purple elephants dancing",  # disjoint
    3: "a plate of food",
    "bus": "a red bus on a street",
}

HAVE_JAVA = shutil.which("java") is not None


@pytest.fixture()
def no_java(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    monkeypatch.setenv("PATH", "/nonexistent")


@pytest.fixture(scope="module")
def java_metrics():
    if not HAVE_JAVA:
        pytest.skip("java is not installed")
    return coco_caption_metrics(RESULTS, REFS)  # one Java run (PTB + METEOR) for the module


# --------------------------------------------------------------------------- with Java
def test_identical_and_disjoint_candidates(java_metrics):
    m = java_metrics
    assert m["tokenizer"] == "ptb"
    per = m["per_image"]
    assert per["BLEU-4"][1] == pytest.approx(1.0, abs=1e-6)
    assert per["BLEU-4"][2] < 1e-6
    assert per["CIDEr"][1] > 2.0 and per["CIDEr"][1] == max(per["CIDEr"].values())
    assert per["CIDEr"][2] == 0.0
    assert per["METEOR"][1] == pytest.approx(1.0) and per["METEOR"][2] == 0.0
    assert per["ROUGE_L"][1] == pytest.approx(1.0) and per["ROUGE_L"][2] == 0.0
    assert set(per["CIDEr"]) == set(RESULTS)  # original ids, str and int alike
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"):
        assert isinstance(m[k], float) and 0 < m[k]
    assert m["CIDEr"] == pytest.approx(np.mean(list(per["CIDEr"].values())))
    assert m["num_images"] == 4


def test_spice_reported_unavailable_not_zero(java_metrics):
    assert java_metrics["SPICE"] is None
    assert "SPICE" in java_metrics["unavailable"]
    assert "METEOR" not in java_metrics["unavailable"]


def test_matches_official_pycocoevalcap(java_metrics):
    """The robust wrappers give exactly the numbers of pycocoevalcap's own classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in RESULTS.items()})
    assert Bleu(4).compute_score(gts, res, verbose=0)[0] == pytest.approx(
        [java_metrics[f"BLEU-{n}"] for n in range(1, 5)], abs=1e-12
    )
    assert Rouge().compute_score(gts, res)[0] == pytest.approx(java_metrics["ROUGE_L"], abs=1e-12)
    assert Cider().compute_score(gts, res)[0] == pytest.approx(java_metrics["CIDEr"], abs=1e-12)


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not installed")
def test_failing_meteor_jar_and_requested_spice(monkeypatch):
    """A Java tool that fails is reported unavailable with its reason; the rest is computed."""

    def broken(*args, **kwargs):
        raise metrics.JavaError("METEOR exited: java.lang.OutOfMemoryError")

    monkeypatch.setattr(metrics, "_meteor", broken)
    monkeypatch.setattr(metrics, "_spice_missing", lambda: "SPICE needs stanford-corenlp-3.6.0.jar")
    with pytest.warns(MetricsWarning) as record:
        m = coco_caption_metrics(RESULTS, REFS, spice=True)
    messages = " ".join(str(w.message) for w in record)
    assert "METEOR" in messages and "SPICE" in messages
    assert m["tokenizer"] == "ptb"
    assert m["METEOR"] is None and "OutOfMemoryError" in m["unavailable"]["METEOR"]
    assert m["SPICE"] is None and "corenlp" in m["unavailable"]["SPICE"]
    assert m["CIDEr"] > 0 and m["BLEU-4"] > 0


# --------------------------------------------------------------------------- without Java
def test_missing_java_falls_back(no_java):
    with pytest.warns(MetricsWarning) as record:
        m = coco_caption_metrics(RESULTS, REFS, spice=True)
    messages = " ".join(str(w.message) for w in record)
    assert "java" in messages and "METEOR" in messages and "fallback" in messages
    assert m["tokenizer"] == "fallback"
    assert m["METEOR"] is None and "java" in m["unavailable"]["METEOR"]
    assert m["SPICE"] is None and "SPICE" in m["unavailable"]
    assert m["warnings"]
    assert m["per_image"]["BLEU-4"][1] == pytest.approx(1.0, abs=1e-6)
    assert m["per_image"]["BLEU-4"][2] < 1e-6
    assert m["per_image"]["CIDEr"][1] > 2.0
    for k in ("BLEU-1", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert m[k] > 0


def test_identical_corpus_bleu_is_one(no_java):
    captions = ["a dog runs on the grass", "two cats sleep on a red sofa", "a man rides a horse on a beach"]
    refs = {i: [c, "something else entirely here"] for i, c in enumerate(captions)}
    res = {i: r[0] for i, r in refs.items()}
    with pytest.warns(MetricsWarning):
        m = coco_caption_metrics(res, refs)
    assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert m["CIDEr"] > 1.0
    disjoint = {i: "zebra xylophone quantum" for i in refs}
    with pytest.warns(MetricsWarning):
        m0 = coco_caption_metrics(disjoint, refs)
    assert m0["BLEU-1"] < 1e-6 and m0["BLEU-4"] < 1e-6 and m0["CIDEr"] == 0.0


def test_input_errors():
    with pytest.raises(ValueError, match="no references"):
        coco_caption_metrics({"a": "x"}, {"b": ["x"]})
    with pytest.raises(TypeError):
        coco_caption_metrics({"a": ["x"]}, {"a": ["x"]})
    with pytest.raises(ValueError):
        coco_caption_metrics({}, {})


def test_fallback_tokenize_matches_ptb_style():
    assert fallback_tokenize("A Dog's toy, isn't \"here\".") == "a dog 's toy is n't here"
    assert fallback_tokenize("Two giraffes -- standing; next to each other...") == "two giraffes standing next to each other"
    assert fallback_tokenize("a (red) black-and-white bus at 3.5 km") == "a -lrb- red -rrb- black-and-white bus at 3.5 km"


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not installed")
def test_fallback_tokenize_agrees_with_ptb_on_ordinary_captions():
    caps = [
        "A man riding a wave on top of a surfboard.",
        "The man's shirt is blue, and he's smiling!",
        "a black-and-white photo of a cat; it's sleeping",
        "What is this? A plate with food: rice, beans and meat",
        "A sign that says \u201cstop\u201d \u2014 nearby\u2026",
        "kids' toys (mostly red) on the floor at 5 p.m.",
        "This is #1 & the best $5 deal, I'm sure",
    ]
    ptb = metrics.ptb_tokenize({i: [c] for i, c in enumerate(caps)})
    assert [fallback_tokenize(c) for c in caps] == [ptb[i][0] for i in range(len(caps))]


def test_bleu4_fast():
    refs = {i: [c] for i, c in enumerate(["a dog runs on the grass", "two cats sleep on a red sofa", "a man rides a horse"])}
    assert bleu4_fast({i: r[0] for i, r in refs.items()}, refs) == pytest.approx(1.0)
    assert bleu4_fast({i: "zebra xylophone" for i in refs}, refs) == 0.0
    mid = bleu4_fast({0: "a dog runs on the sand", 1: "two cats sleep on a sofa", 2: "a man rides a horse"}, refs)
    assert 0.1 < mid < 1.0


# --------------------------------------------------------------------------- CIDEr-D
def _random_corpus(seed: int, n_images: int = 30):
    rng = random.Random(seed)
    vocab = "a the man woman dog cat red blue sits runs on in near table street field with ball".split()
    sent = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))  # noqa: E731
    refs = [[sent() for _ in range(rng.randint(1, 5))] for _ in range(n_images)]
    cands = [sent() for _ in range(n_images)]
    cands[0] = refs[0][0]  # an exact match
    cands[1] = ""  # an empty caption
    return refs, cands


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_matches_pycocoevalcap(seed):
    from pycocoevalcap.cider.cider import Cider

    refs, cands = _random_corpus(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    official_mean, official = Cider().compute_score(gts, res)
    scorer = CiderD(refs)
    ours = scorer.score(cands, list(range(len(refs))))
    assert ours.dtype == np.float64 and ours.shape == (len(cands),)
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)
    assert scorer.corpus_score(cands, range(len(refs))) == pytest.approx(official_mean, abs=1e-6)
    # explicit reference lists (idf still from the corpus) and mapping corpora give the same
    np.testing.assert_allclose(scorer.score(cands, refs), official, atol=1e-6)
    keyed = CiderD({f"img{i}": r for i, r in enumerate(refs)})
    np.testing.assert_allclose(keyed.score(cands, [f"img{i}" for i in range(len(refs))]), official, atol=1e-6)
    # several candidates per image (SCST samples) reuse the precomputed statistics
    rep = scorer.score(cands + cands[::-1], list(range(len(refs))) + list(range(len(refs)))[::-1])
    np.testing.assert_allclose(rep, np.concatenate([official, official[::-1]]), atol=1e-6)


def test_cider_d_idf_comes_from_the_corpus():
    corpus = [["a dog runs"], ["a cat sits"], ["a bird flies"], ["the dog sleeps"]]
    scorer = CiderD(corpus)
    assert scorer.num_documents == 4
    # "a" is in 3 of the 4 documents; "dog" in 2
    assert scorer._idf[("a",)] == pytest.approx(np.log(4) - np.log(3))
    assert scorer._idf[("dog",)] == pytest.approx(np.log(4) - np.log(2))
    with pytest.raises(IndexError):
        scorer.score(["a dog"], [7])
    with pytest.raises(ValueError):
        scorer.score(["a dog"], [0, 1])
