"""`pipeline serve`: every request shape of POST /caption, every error class, batching, docs and the page's files.

The app runs in-process (FastAPI's TestClient, httpx's ASGI transport, or uvicorn on a 127.0.0.1 port in a
thread where a real socket matters) on the tiny random bundle of tests/helpers_bundle.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.inference.bundle import BundleError
from pipeline.inference.decoding import CAPTION_MODES
from pipeline.inference.engine import CaptionEngine
from pipeline.serve.app import create_app, decode_base64
from pipeline.serve.batcher import BatcherClosed, DynamicBatcher, QueueFull
from pipeline.serve.settings import (
    SERVE_DEFAULTS,
    ServeSettings,
    check_allowed_hosts,
    check_api_key,
    is_loopback,
    open_access_warning,
)
from tests.helpers_bundle import (  # noqa: F401 - fixtures
    MAX_LENGTH,
    free_port,
    image_bytes,
    serve_in_thread,
    tiny_bundle,
    tiny_perceiver_bundle,
    tiny_transformer_bundle,
)

LIMIT = 300_000
MAX_PIXELS = 1_000_000
PNG = image_bytes("PNG", seed=1)
JPEG = image_bytes("JPEG", size=(80, 60), seed=2)
B64 = base64.b64encode(PNG).decode()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models on a shared 2-core machine: one intra-op thread is far faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_bundle):  # noqa: F811 - a fixture
    return CaptionEngine.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, max_request_bytes=LIMIT, max_pixels=MAX_PIXELS, max_wait_ms=2.0)
    with TestClient(app) as c:
        yield c


def in_process(engine: CaptionEngine, data: bytes, mode: str = "consistent") -> dict:
    image = engine.decode(data)
    return engine.result(engine.run([engine.prepare(image)], engine.options(mode)).captions[0], mode=mode)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def assert_caption(body: dict, mode: str = "consistent") -> None:
    assert set(body) >= {"caption", "score", "alternatives", "mode", "timings"}
    assert body["mode"] == mode
    assert isinstance(body["caption"], str) and len(body["caption"].split()) == MAX_LENGTH
    t = body["timings"]
    assert set(t) == {"decode_ms", "queue_ms", "model_ms", "attention_ms", "total_ms", "batch_size"}
    assert t["total_ms"] >= t["model_ms"] > 0 and t["batch_size"] >= 1
    scores = [body["score"]] + [a["score"] for a in body["alternatives"]]
    assert scores == sorted(scores, reverse=True)
    texts = [body["caption"]] + [a["caption"] for a in body["alternatives"]]
    assert len(set(texts)) == len(texts)


# --------------------------------------------------------------------------- success
def test_health_lists_modes_and_model(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["auth_required"] is False
    assert [m["name"] for m in h["modes"]] == list(CAPTION_MODES) and all(m["description"] for m in h["modes"])
    assert h["model"]["decoder"] == "show_attend_tell" and h["model"]["attention"] is True
    assert h["limits"]["max_request_bytes"] == LIMIT and h["limits"]["max_pixels"] == MAX_PIXELS
    assert h["limits"]["max_aspect_ratio"] == SERVE_DEFAULTS.max_aspect_ratio
    assert h["batching"]["max_batch_size"] == 8


@pytest.mark.parametrize("shape", ["multipart", "multipart-file-field", "json-base64", "json-data-url",
                                   "json-urlsafe-unpadded", "json-wrapped-lines", "raw-png", "raw-octet-stream"])
def test_every_request_shape_gives_the_in_process_caption(client, engine, shape):
    urlsafe = base64.urlsafe_b64encode(JPEG).decode().rstrip("=")
    data = JPEG if shape == "json-urlsafe-unpadded" else PNG
    kwargs = {
        "multipart": dict(files={"image": ("a.png", PNG, "image/png")}),
        "multipart-file-field": dict(files={"file": ("a.png", PNG, "application/octet-stream")}),
        "json-base64": dict(json={"image": B64}),
        "json-data-url": dict(json={"image": "data:image/png;base64," + B64}),
        "json-urlsafe-unpadded": dict(json={"image": urlsafe}),
        "json-wrapped-lines": dict(json={"image": "\n".join(B64[i:i + 76] for i in range(0, len(B64), 76))}),
        "raw-png": dict(content=PNG, headers={"content-type": "image/png"}),
        "raw-octet-stream": dict(content=PNG, headers={"content-type": "application/octet-stream"}),
    }[shape]
    r = client.post("/caption", **kwargs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_caption(body)
    assert "attention" not in body
    want = in_process(engine, data)
    assert body["caption"] == want["caption"]
    assert [a["caption"] for a in body["alternatives"]] == [a["caption"] for a in want["alternatives"]]


@pytest.mark.parametrize("mode", list(CAPTION_MODES))
@pytest.mark.parametrize("where", ["json", "multipart", "query"])
def test_each_caption_mode_in_each_place(client, mode, where):
    if where == "json":
        r = client.post("/caption", json={"image": B64, "caption_mode": mode})
    elif where == "multipart":
        r = client.post("/caption", files={"image": ("a.png", PNG, "image/png")}, data={"caption_mode": mode})
    else:
        r = client.post(f"/caption?caption_mode={mode}", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_caption(body, mode)
    if mode == "consistent":  # the other beams are the alternatives
        assert 1 <= len(body["alternatives"]) <= CAPTION_MODES[mode].beam_size - 1
    else:
        assert len(body["alternatives"]) <= CAPTION_MODES[mode].num_samples - 1


def test_consistent_mode_is_deterministic(client):
    a, b = (client.post("/caption", json={"image": B64}).json() for _ in range(2))
    assert (a["caption"], a["score"], a["alternatives"]) == (b["caption"], b["score"], b["alternatives"])


@pytest.mark.parametrize("where", ["json", "multipart", "query"])
def test_attention_heatmaps_one_per_word(client, where):
    if where == "json":
        r = client.post("/caption", json={"image": B64, "attention": True})
    elif where == "multipart":
        r = client.post("/caption", files={"image": ("a.png", PNG, "image/png")}, data={"attention": "true"})
    else:
        r = client.post("/caption?attention=true", content=PNG, headers={"content-type": "image/png"})
    body = r.json()
    assert r.status_code == 200, body
    att = body["attention"]
    words = body["caption"].split()
    assert [w["word"] for w in att["words"]] == words
    assert body["timings"]["attention_ms"] > 0
    for url in [att["image"]] + [w["heatmap"] for w in att["words"]]:
        assert url.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.size == (att["width"], att["height"]) and min(img.size) >= 64


def test_transformer_heatmaps_one_per_word(tiny_transformer_bundle):  # noqa: F811 - a fixture
    """The transformer's cross-attention: a heatmap per word, what the maps are, the caption unchanged."""
    app = create_app(tiny_transformer_bundle, max_wait_ms=2.0)
    with TestClient(app) as c:
        model = c.get("/health").json()["model"]
        assert model["attention"] is True and model["decoder"] == "transformer"
        assert model["attention_note"] == ("cross-attention of the last decoder block, mean over its heads, drawn "
                                           "over a 2x2 grid of visual tokens")
        plain = c.post("/caption", json={"image": B64}).json()
        body = c.post("/caption", json={"image": B64, "attention": True}).json()
    assert (body["caption"], body["score"], body["alternatives"]) == (plain["caption"], plain["score"],
                                                                       plain["alternatives"])
    assert body["caption"], "the tiny transformer should say something for this image"
    att = body["attention"]
    assert [w["word"] for w in att["words"]] == body["caption"].split()
    assert att["source"] == "cross-attention of the last decoder block, mean over its heads"
    assert att["shown"] == "a 2x2 grid of visual tokens" and "attention_unavailable" not in body
    for url in [att["image"]] + [w["heatmap"] for w in att["words"]]:
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.size == (att["width"], att["height"])


def test_the_perceiver_says_why_it_has_no_heatmaps(tiny_perceiver_bundle):  # noqa: F811 - a fixture
    app = create_app(tiny_perceiver_bundle, max_wait_ms=2.0)
    with TestClient(app) as c:
        model = c.get("/health").json()["model"]
        assert model["attention"] is False
        assert model["attention_note"].startswith("no attention maps: the Perceiver attends to latents, not to the image")
        r = c.post("/caption", json={"image": B64, "attention": True})
        js = c.get("/static/app.js").text
    body = r.json()
    assert r.status_code == 200 and body["attention"] is None
    assert body["attention_unavailable"].startswith("the Perceiver attends to latents, not to the image")
    # the page shows the server's reason where the maps would be
    assert "res.attention_unavailable" in js and "health.model.attention_note" in js


# --------------------------------------------------------------------------- errors
def _truncated_jpeg() -> bytes:
    return JPEG[: len(JPEG) // 2]


def _big_png() -> bytes:  # over MAX_PIXELS but a small file
    buf = io.BytesIO()
    Image.new("RGB", (1200, 1000), (10, 20, 30)).save(buf, format="PNG")
    assert len(buf.getvalue()) < LIMIT
    return buf.getvalue()


def _strip_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _ico() -> bytes:  # a real image in a format the server does not try
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(buf, format="ICO")
    return buf.getvalue()


BAD_REQUESTS = {
    # name: (request kwargs, status, code)
    "invalid json": (dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400, "invalid_json"),
    "json not an object": (dict(json=[B64]), 400, "invalid_json"),
    "json deeply nested": (dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
                           400, "invalid_json"),
    "json not utf-8": (dict(content=b'{"image": "\xff\xfe"}', headers={"content-type": "application/json"}),
                       400, "invalid_json"),
    "missing image": (dict(json={"caption_mode": "consistent"}), 400, "missing_field"),
    "unknown field": (dict(json={"image": B64, "mode": "consistent"}), 400, "unknown_field"),
    "image not a string": (dict(json={"image": 12}), 400, "invalid_field"),
    "attention not a bool": (dict(json={"image": B64, "attention": "yes please"}), 400, "invalid_field"),
    "bad base64": (dict(json={"image": "not base64 at all!"}), 400, "invalid_base64"),
    "base64 bad length": (dict(json={"image": "QUJDR"}), 400, "invalid_base64"),
    "empty base64": (dict(json={"image": "   "}), 400, "invalid_base64"),
    "data url not base64": (dict(json={"image": "data:image/png,%89PNG"}), 400, "invalid_base64"),
    "unknown mode json": (dict(json={"image": B64, "caption_mode": "poetic"}), 400, "unknown_mode"),
    "mode not a string": (dict(json={"image": B64, "caption_mode": 3}), 400, "unknown_mode"),
    "unknown mode multipart": (dict(files={"image": ("a.png", PNG, "image/png")}, data={"caption_mode": "x"}),
                               400, "unknown_mode"),
    "unknown mode query": (dict(content=PNG, headers={"content-type": "image/png"}, params={"caption_mode": "x"}),
                           400, "unknown_mode"),
    "bad query bool": (dict(content=PNG, headers={"content-type": "image/png"}, params={"attention": "perhaps"}),
                       400, "invalid_request"),
    "multipart without file": (dict(files={"other": ("a.png", PNG, "image/png")}), 400, "unknown_field"),
    "multipart unknown field": (dict(data={"image": "hello"}, files={"x": ("", b"", "text/plain")}),
                                400, "unknown_field"),
    "multipart only fields": (dict(content=b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nhi\r\n--B--\r\n",
                                   headers={"content-type": "multipart/form-data; boundary=B"}), 400, "invalid_field"),
    "multipart garbage": (dict(content=b"garbage without boundaries",
                               headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "invalid_multipart"),
    "multipart no boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
                              400, "invalid_multipart"),
    "multipart two files": (dict(files=[("image", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]),
                            400, "invalid_multipart"),
    "no content type": (dict(content=PNG, headers={"content-type": ""}), 415, "unsupported_media_type"),
    "text/plain": (dict(content=B64, headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    "urlencoded form": (dict(data={"image": B64}), 415, "unsupported_media_type"),
    "too large by content-length": (dict(content=b"\0" * (LIMIT + 1), headers={"content-type": "image/png"}),
                                    413, "request_too_large"),
    "too large json": (dict(json={"image": "A" * LIMIT}), 413, "request_too_large"),
    "not an image": (dict(content=b"hello, I am text", headers={"content-type": "image/png"}), 422, "not_an_image"),
    "not an image json": (dict(json={"image": base64.b64encode(b"%PDF-1.4 nope").decode()}), 422, "not_an_image"),
    "unsupported format": (dict(content=_ico(), headers={"content-type": "image/x-icon"}), 422, "not_an_image"),
    "empty upload": (dict(files={"image": ("a.png", b"", "image/png")}), 422, "empty_image"),
    "empty raw body": (dict(content=b"", headers={"content-type": "image/png"}), 422, "empty_image"),
    "truncated jpeg": (dict(files={"image": ("a.jpg", _truncated_jpeg(), "image/jpeg")}), 422, "truncated_image"),
    "truncated png": (dict(json={"image": base64.b64encode(PNG[:-40]).decode()}), 422, "truncated_image"),
    "too many pixels": (dict(content=_big_png(), headers={"content-type": "image/png"}), 422, "too_many_pixels"),
    "wide strip": (dict(content=_strip_png(16000, 1), headers={"content-type": "image/png"}), 422,
                   "extreme_aspect_ratio"),
    "tall strip": (dict(files={"image": ("a.png", _strip_png(3, 400), "image/png")}), 422, "extreme_aspect_ratio"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_every_error_class_is_a_json_4xx(client, name):
    kwargs, status, code = BAD_REQUESTS[name]
    err = assert_error(client.post("/caption", **kwargs), status, code)
    if code == "unknown_mode":
        assert err["valid"] == list(CAPTION_MODES)
        assert all(m in err["message"] for m in CAPTION_MODES)
    if code == "extreme_aspect_ratio":
        assert "100:1" in err["message"]


def test_not_found_and_wrong_method_are_json(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    r = client.get("/caption")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_streamed_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(LIMIT // 10_000 + 5):
            yield b"\0" * 10_000

    r = client.post("/caption", content=chunks(), headers={"content-type": "image/png"})  # chunked: no Content-Length
    assert_error(r, 413, "request_too_large")


def test_huge_content_length_is_refused_before_the_body_arrives(engine):
    """A real socket: the headers alone announce 1 GB and not a byte of body is ever sent, so a server that
    waited for the body could only time out (408 after its body timeout, set far beyond the socket's here);
    the 413 comes back, and the server closes the connection rather than ask for the gigabyte."""
    app = create_app(engine, max_request_bytes=LIMIT, body_timeout=3600, warm_up=False)
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 1000000000\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):  # to the end: the server closes the connection after its answer
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_random_bytes_never_cause_a_5xx(client):
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        n = int(torch.randint(0, 2000, (1,), generator=gen))
        junk = bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
        if i % 4 == 0:  # a real header followed by noise
            junk = PNG[:30] + junk
        elif i % 4 == 1:
            junk = JPEG[:200] + junk
        ctype = ["image/png", "application/json", "multipart/form-data; boundary=x", "image/jpeg"][i % 4]
        r = client.post("/caption", content=junk, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text)
        assert "error" in r.json()
    assert client.get("/health").json()["status"] == "ok"


# --------------------------------------------------------------------------- API key
@pytest.fixture(scope="module")
def keyed(engine):
    with TestClient(create_app(engine, api_key="s3cret", max_request_bytes=LIMIT, warm_up=False)) as c:
        yield c


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"x-api-key": "wrong"}, 401), ({"authorization": "Bearer wrong"}, 401),
    ({"authorization": "Basic s3cret"}, 401), ({"x-api-key": "s3cret"}, 200), ({"authorization": "Bearer s3cret"}, 200),
])
def test_api_key(keyed, headers, status):
    r = keyed.post("/caption", json={"image": B64}, headers=headers)
    if status == 401:
        assert_error(r, 401, "unauthorized")
    else:
        assert r.status_code == 200, r.text


def test_api_key_is_checked_before_the_body(keyed):
    # no key + an oversized body: 401, not 413 (the body is never read for a stranger)
    assert_error(keyed.post("/caption", content=b"\0" * (LIMIT + 10), headers={"content-type": "image/png"}),
                 401, "unauthorized")
    h = keyed.get("/health").json()
    assert h["auth_required"] is True and "s3cret" not in json.dumps(h)
    spec = keyed.get("/openapi.json").json()
    assert spec["paths"]["/caption"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "s3cret" not in json.dumps(spec)


# --------------------------------------------------------------------------- internal failures
def test_an_internal_failure_is_a_json_500_and_the_server_survives(tiny_bundle, monkeypatch):  # noqa: F811 - a fixture
    eng = CaptionEngine.load(tiny_bundle)
    app = create_app(eng, warm_up=False)
    calls = {"n": 0}
    real_run = eng.run

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model exploded")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(eng, "run", flaky)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/caption", json={"image": B64})
        err = assert_error(r, 500, "internal_error")
        assert "exploded" not in err["message"] and "Traceback" not in r.text
        assert c.post("/caption", json={"image": B64}).status_code == 200
        assert c.get("/health").json()["batching"]["failed_model_calls"] == 1


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_share_model_calls(engine):
    app = create_app(engine, max_wait_ms=200, max_batch_size=4, warm_up=False)
    modes = ["consistent", "safe_diverse", "consistent", "consistent", "safe_diverse", "consistent", "consistent"]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*[c.post("/caption", json={"image": B64, "caption_mode": m}) for m in modes])
            health = (await c.get("/health")).json()
        await app.state.captioning.batcher.close()
        return rs, health

    rs, health = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    bodies = [r.json() for r in rs]
    assert [b["mode"] for b in bodies] == modes
    want = in_process(engine, PNG)["caption"]
    assert all(b["caption"] == want for b in bodies if b["mode"] == "consistent")
    assert max(b["timings"]["batch_size"] for b in bodies) > 1
    assert all(b["timings"]["batch_size"] <= 4 for b in bodies)
    stats = health["batching"]
    assert stats["requests"] == len(modes) and stats["model_calls"] < len(modes)


def _run(coro):
    return asyncio.run(coro)


def test_batcher_groups_by_key_and_caps_batches():
    calls = []

    def run_batch(key, payloads):
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]

    async def go():
        b = DynamicBatcher(run_batch, max_batch_size=3, max_wait_ms=100, pending=lambda: 1)
        out = await asyncio.gather(*[b.submit("ab"[i % 2], i) for i in range(7)])
        await b.close()
        return out

    out = _run(go())
    assert [r for r, _ in out] == [f"{'ab'[i % 2]}:{i}" for i in range(7)]
    assert all(len(p) <= 3 for _, p in calls) and sum(len(p) for _, p in calls) == 7
    assert all("ab"[p % 2] == k for k, payloads in calls for p in payloads)  # one key per batch
    assert [info.batch_size for _, info in out][:3] == [2, 1, 2]  # first batch: 0,1,2 -> a:[0,2], b:[1]


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The timeouts of the ``asyncio.wait_for`` calls made from now on: the batcher waits for more requests
    with ``asyncio.wait_for(..., remaining)``, the rest of its window."""
    timeouts: list[float] = []
    real_wait_for = asyncio.wait_for

    def counting_wait_for(aw, timeout):
        timeouts.append(timeout)
        return real_wait_for(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", counting_wait_for)
    return timeouts


def test_a_lone_request_does_not_wait_for_the_window(waits):
    """With no other request on its way (pending() is 0) the batch goes at once: the batcher never waits
    on its 5-second window."""
    async def go():
        b = DynamicBatcher(lambda k, ps: ps, max_wait_ms=5_000, pending=lambda: 0)
        (r, info) = await b.submit("k", 1)
        await b.close()
        return r, info

    r, info = _run(go())
    assert r == 1 and info.batch_size == 1
    assert waits == []


def test_a_request_on_its_way_is_waited_for_within_the_window(waits):
    """The other side of the test above (and what makes its count mean something): while pending() says a
    request is being received, the batcher waits for it, at most the rest of its window."""
    on_its_way = [1]

    async def go():
        b = DynamicBatcher(lambda k, ps: ps, max_wait_ms=5_000, pending=lambda: on_its_way[0])
        first = asyncio.ensure_future(b.submit("k", 1))
        for _ in range(100):  # until the batcher, holding the first request, waits for the one on its way
            if waits:
                break
            await asyncio.sleep(0)
        on_its_way[0] = 0
        second = await b.submit("k", 2)
        out = [await first, second]
        await b.close()
        return out

    out = _run(go())
    assert [r for r, _ in out] == [1, 2] and [info.batch_size for _, info in out] == [2, 2]
    assert waits and all(0 < w <= 5.0 for w in waits)


def test_batcher_failures_go_to_their_group_only_and_the_queue_is_bounded():
    import threading

    release = threading.Event()

    def run_batch(key, payloads):
        if key == "slow":
            release.wait(10)
        if key == "bad":
            raise ValueError("broken")
        return payloads

    async def go():
        b = DynamicBatcher(run_batch, max_batch_size=8, max_wait_ms=0, max_queue=2)
        slow = asyncio.ensure_future(b.submit("slow", 0))
        await asyncio.sleep(0.05)  # the worker is now busy with "slow"
        bad = asyncio.ensure_future(b.submit("bad", 1))
        good = asyncio.ensure_future(b.submit("good", 2))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit("good", 3)
        release.set()
        results = await asyncio.gather(slow, bad, good, return_exceptions=True)
        await b.close()
        with pytest.raises(BatcherClosed):
            await b.submit("good", 4)
        return results

    slow, bad, good = _run(go())
    assert slow[0] == 0 and good[0] == 2 and isinstance(bad, ValueError)


# --------------------------------------------------------------------------- docs, page, defaults
def test_openapi_documents_the_request_shapes_and_errors(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/caption"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json", "image/*"}
    assert {"200", "400", "401", "413", "415", "422"} <= set(op["responses"])
    assert "CaptionJSONRequest" in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["CaptionJSONRequest"]["properties"]["caption_mode"]["anyOf"][0]["enum"]) \
        == set(CAPTION_MODES)


def test_docs_and_page_use_no_remote_assets(client):
    docs = client.get("/docs")
    if docs.status_code == 200:  # swagger-ui-py installed
        assert "/docs-assets/swagger-ui-bundle.js" in docs.text
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        assert "https://" not in docs.text and "http://" not in docs.text
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text


def test_decode_base64_variants():
    assert decode_base64(" data:image/png;BASE64," + B64) == PNG
    assert decode_base64(base64.urlsafe_b64encode(JPEG).decode().rstrip("=")) == JPEG


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("example.org", False),
])
def test_the_loopback_decision(host, loopback):
    assert is_loopback(host) is loopback
    assert ServeSettings(host=host).loopback is loopback
    warning = open_access_warning(host, None)
    assert (warning is None) is loopback  # only an address other machines reach warns, and names it
    assert warning is None or (host in warning and "API key" in warning)
    assert open_access_warning(host, "k3y") is None  # a key: no warning anywhere


def test_the_default_host_answers_this_machine_only():
    assert SERVE_DEFAULTS.host == "127.0.0.1" and SERVE_DEFAULTS.loopback
    assert open_access_warning(SERVE_DEFAULTS.host, None) is None


@pytest.mark.parametrize("bind,answers,refuses", [
    ("127.0.0.1", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST.:8000", "names.example",
                   "names.example:9", "proxy.example:443"],
     ["evil.example:8000", "127.0.0.1:8001", "localhost", "10.0.0.2:8000", "proxy.example:80", "", None,
      "user@127.0.0.1:8000", "127.0.0.1:99999", "[::1"]),
    ("0.0.0.0", ["127.0.0.1:8000", "localhost:8000", "192.168.1.5:8000", "[fe80::1]:8000", "names.example"],
     ["evil.example:8000", "192.168.1.5:8001", "myhost.lan:8000"]),
    ("192.168.1.5", ["192.168.1.5:8000", "names.example"], ["127.0.0.1:8000", "localhost:8000", "10.0.0.2:8000"]),
    ("myhost.lan", ["myhost.lan:8000", "MyHost.Lan:8000"], ["myhost.lan:8001", "127.0.0.1:8000"]),
])
def test_the_server_answers_to_its_own_names_only(bind, answers, refuses):
    hosts = ServeSettings(host=bind, port=8000).allowed_hosts(["names.example", "proxy.example:443"])
    assert [h for h in answers if not hosts.allows(h)] == []
    assert [h for h in refuses if hosts.allows(h)] == []
    assert ServeSettings(port=8000).allowed_hosts().describe() == "127.0.0.1:8000, localhost:8000, [::1]:8000"
    anything = ServeSettings(host=bind, port=8000).allowed_hosts(["*"])
    assert anything.allows("evil.example:8000") and anything.describe() == "any host"


def test_allowed_host_values_are_checked():
    assert check_allowed_hosts([" Names.Example ", "[::1]:8443", "*", "host.:80"]) == [
        "names.example", "[::1]:8443", "*", "host:80"]
    for bad in ("http://names.example", "names.example/path", "a b", "", "user@host", "host:port", "[nope]"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            check_allowed_hosts([bad])


@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
def test_an_empty_api_key_is_refused_not_read_as_no_key(engine, key):
    with pytest.raises(ConfigError, match="empty"):
        check_api_key(key)
    with pytest.raises(ConfigError, match="empty"):
        create_app(engine, api_key=key, warm_up=False)
    with pytest.raises(ConfigError, match="whitespace"):
        check_api_key(" k3y")
    assert check_api_key(None) is None and check_api_key("k3y") == "k3y"


def _serve_cli(args: list[str], env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["serve", *args], env=env)


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("env,args,says", [
    ({"PIPELINE_API_KEY": ""}, [], "API key"),
    ({"PIPELINE_API_KEY": "  "}, [], "API key"),
    ({}, ["--api-key", ""], "API key"),
    ({}, ["--port", "99999"], "--port"),
    ({}, ["--port", "0"], "--port"),
    ({}, ["--cors-origin", "http://example.org/page"], "--cors-origin"),
    ({}, ["--allowed-host", "http://example.org"], "--allowed-host"),
    ({}, ["--allowed-host", "example.org:http"], "--allowed-host"),
    ({}, ["--body-timeout", "0"], "--body-timeout"),
    ({}, ["--max-uploads", "0"], "--max-uploads"),
    ({}, ["--max-aspect-ratio", "0.5"], "--max-aspect-ratio"),
])
def test_serve_refuses_bad_settings_in_one_line(tiny_bundle, env, args, says):  # noqa: F811 - a fixture
    line = _one_error_line(_serve_cli(["--model", str(tiny_bundle), "--port", str(free_port()), *args], env))
    assert says in line


def test_serve_on_a_port_in_use_is_one_line(tiny_bundle):  # noqa: F811 - a fixture
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = _one_error_line(_serve_cli(["--model", str(tiny_bundle), "--port", str(port)]))
    assert f"127.0.0.1:{port}" in line and "in use" in line


def _damage(bundle, tmp_path, how: str):
    import shutil

    root = tmp_path / how
    shutil.copytree(bundle, root)
    config = json.loads((root / "config.json").read_text())
    if how == "truncated model":
        (root / "model.safetensors").write_bytes((root / "model.safetensors").read_bytes()[:200])
        return root, "model.safetensors", "cannot read the decoder weights"
    if how == "garbage model":
        (root / "model.safetensors").write_bytes(b"garbage" * 100)
        return root, "model.safetensors", "cannot read the decoder weights"
    if how == "missing model":
        (root / "model.safetensors").unlink()
        return root, "model.safetensors", "missing"
    if how == "missing backbone":
        (root / "backbone.safetensors").unlink()
        return root, "backbone.safetensors", "missing"
    if how == "config is a list":
        (root / "config.json").write_text("[]")
        return root, "config.json", "format 'list'"
    if how == "config lacks features":
        del config["features"]
        (root / "config.json").write_text(json.dumps(config))
        return root, "config.json", "'features'"
    if how == "config not json":
        (root / "config.json").write_text("{features: nope")
        return root, "config.json", "not valid JSON"
    if how in ("tokenizer outside", "tokenizer absolute", "backbone outside"):
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(root / "tokenizer", elsewhere, dirs_exist_ok=True)
        if how == "backbone outside":
            config["backbone_weights"] = "../elsewhere/backbone.safetensors"
        else:
            config["tokenizer"]["path"] = "../elsewhere" if how == "tokenizer outside" else str(elsewhere)
        (root / "config.json").write_text(json.dumps(config))
        return root, "config.json", "outside the bundle folder"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated model", "garbage model", "missing model", "missing backbone",
                                 "config is a list", "config lacks features", "config not json",
                                 "tokenizer outside", "tokenizer absolute", "backbone outside"])
def test_a_damaged_bundle_is_one_error_line_naming_the_file(tiny_bundle, tmp_path, how):  # noqa: F811 - a fixture
    root, name, says = _damage(tiny_bundle, tmp_path, how)
    line = _one_error_line(_serve_cli(["--model", str(root), "--port", str(free_port())]))
    assert str(root / name) in line and says in line, line
    with pytest.raises(BundleError, match=re.escape(name)):  # the library says the same (caption, evaluate...)
        CaptionEngine.load(root).warm_up()


# --------------------------------------------------------------------------- security headers, origins
@pytest.mark.parametrize("path", ["/", "/static/index.html", "/docs"])
def test_every_html_response_has_the_security_headers(client, path):
    r = client.get(path)
    if r.status_code == 404 and path == "/docs":
        pytest.skip("swagger-ui-py not installed")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-eval" not in csp and "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";")[0]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"


def test_every_response_is_nosniff(client):
    for r in (client.get("/health"), client.get("/static/app.js"), client.post("/caption", json={})):
        assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("origin,status", [
    (None, 200), ("http://testserver", 200), ("https://evil.example", 403), ("http://testserver.evil.example", 403),
    ("null", 403), ("http://localhost:1234", 403),
])
def test_requests_from_pages_of_other_sites_are_refused(client, origin, status):
    headers = {"origin": origin} if origin else {}
    r = client.post("/caption", files={"image": ("a.png", PNG, "image/png")}, headers=headers)
    if status == 403:
        err = assert_error(r, 403, "forbidden_origin")
        assert origin in err["message"] and "--cors-origin" in err["message"]
        assert "access-control-allow-origin" not in r.headers
    else:
        assert r.status_code == 200, r.text
    assert client.get("/health", headers=headers).status_code == 200  # reading is harmless: no CORS header


def test_cors_origin_allows_one_site(engine):
    app = create_app(engine, cors_origin=["https://app.example"], warm_up=False)
    with TestClient(app) as c:
        pre = c.options("/caption", headers={"origin": "https://app.example", "access-control-request-method": "POST",
                                             "access-control-request-headers": "x-api-key, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-api-key" in pre.headers["access-control-allow-headers"].lower()
        r = c.post("/caption", json={"image": B64}, headers={"origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert_error(c.post("/caption", json={"image": B64}, headers={"origin": "https://other.example"}),
                     403, "forbidden_origin")
    with TestClient(create_app(engine, cors_origin=["*"], warm_up=False)) as c:
        assert c.post("/caption", json={"image": B64}, headers={"origin": "https://any.example"}).status_code == 200


def test_several_model_workers_run_batches_at_once():
    """Four full batches, four workers: the four model calls run at the same time. Each call waits at a
    barrier until all four are running, so calls made one at a time would break it (after its 60-s timeout:
    a hang guard, not a speed bound) and fail their requests."""
    import threading

    all_running = threading.Barrier(4, timeout=60)

    def run_batch(key, payloads):
        all_running.wait()
        return payloads

    async def go(workers):
        b = DynamicBatcher(run_batch, max_batch_size=1, max_wait_ms=0, workers=workers)
        out = await asyncio.gather(*[b.submit("k", i) for i in range(4)])
        await b.close()
        return [r for r, _ in out], b.stats.as_dict()

    results, stats = _run(go(4))
    assert results == [0, 1, 2, 3] and stats["model_calls"] == 4 and stats["failed_model_calls"] == 0


def test_a_second_worker_takes_only_a_full_batch():
    import threading

    running = []
    lock = threading.Lock()
    peak = {"n": 0}

    def run_batch(key, payloads):
        with lock:
            running.append(1)
            peak["n"] = max(peak["n"], len(running))
        time.sleep(0.3)
        with lock:
            running.pop()
        return payloads

    async def go():
        b = DynamicBatcher(run_batch, max_batch_size=4, max_wait_ms=0, workers=2)
        first = asyncio.ensure_future(b.submit("k", 0))
        await asyncio.sleep(0.05)  # the first call is running
        rest = await asyncio.gather(*[b.submit("k", i) for i in (1, 2, 3)])  # not a full batch: they wait
        await first
        peak_small = peak["n"]
        go_full = asyncio.ensure_future(b.submit("k", 10))
        await asyncio.sleep(0.05)
        full = await asyncio.gather(*[b.submit("k", i) for i in range(11, 19)])  # 2 full batches: run at once
        await go_full
        await b.close()
        return [info.batch_size for _, info in rest], peak_small, peak["n"], [info.batch_size for _, info in full]

    rest_sizes, peak_small, peak_full, full_sizes = _run(go())
    assert rest_sizes == [3, 3, 3] and peak_small == 1
    assert peak_full == 2 and set(full_sizes) == {4}
