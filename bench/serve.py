"""Serving: HTTP latency vs in-process, throughput from dynamic batching, robustness to malformed requests.

A real server (``pipeline serve`` in a subprocess on 127.0.0.1, free port) is measured with httpx
clients from this process; nothing leaves the loopback interface, and every loop is bounded in both
request count and time.

* **Latency**: one client, one request at a time (multipart upload of a 224 px JPEG, mode
  ``consistent``), p50/p95 over ``--latency-requests``, versus the same work in-process
  (``decode_bytes`` + preprocessing + the model + the JSON-ready result, the server's own code path
  without HTTP) with the same number of torch threads. The two are measured in alternating blocks so
  load drifts hit both. Target: HTTP p50 <= 1.2x in-process p50.
* **Throughput**: closed-loop clients (each sends its next request when the answer arrives) for
  ``--seconds`` each, 1 client vs ``--clients`` (8), alternating over ``--rounds``. Target: 8 clients
  >= 2x the requests/s of 1 client, from the server batching concurrent requests on the model; zero errors.
* **Mixed**: ``--mixed-requests`` (5,000) from 8 clients, ``--malformed`` (30 %) of them malformed in
  equal parts: bad base64, not an image, oversized body (over the server's limit), truncated JPEG,
  wrong content type; the rest valid in all three request shapes and all caption modes. Every answer
  must be the expected status (200/400/422/413/422/415): zero 5xx, zero unexpected; the server must
  still answer ``/health`` and caption afterwards.
* **Hostile**: ``--hostile-requests`` (400) from 8 clients, in equal parts: wide and tall strips
  (16000x1, 1x16000 PNGs of ~130 bytes, accepted: the server runs with ``--max-aspect-ratio 100000`` so
  that they take the trimmed preprocessing path rather than the header check), decompression bombs (a
  header declaring 3.6 G pixels; a 44 KB zlib bomb of 45 M pixels, over the server's pixel limit),
  malformed bodies (deeply nested JSON, garbage multipart, a truncated PNG) and DNS-rebinding requests (a
  valid image sent with ``Host: evil.example`` and that origin: 421), while ``--slow-clients`` (12)
  connections each declare a 100-byte body, send 10 bytes and stall (the server runs with
  ``--body-timeout`` 5 s: each is cut with a 408, then reconnects; its 16 upload slots are never all
  taken) and a prober asks for ``/health`` every 20 ms. Reported: the server's peak RSS (sampled every
  10 ms) and its growth over the run (target < 100 MB), ``/health`` p50/p99/max (target p99 < 100 ms),
  the slow clients' answers, zero 5xx.

``--phases`` runs some of them only (e.g. ``--phases hostile``).

The model is ``--model``, else the first trained bundle under ``models/*/bundle``, else a random-weight
stand-in shaped like the bundles ``dvc repro`` trains (params.yaml: EfficientNet-Lite0 with the packaged
ImageNet weights at the extract image size, the ``show_attend_tell`` decoder options), its special
tokens suppressed so that every caption is 16 words: a real model's compute per request, nonsense
captions. The server runs with one torch thread per model call and as many model workers as cores
(its defaults; ``--threads``, ``--model-workers``) and with ``--amp --channels-last`` (bf16 autocast,
NHWC backbone; the in-process baseline the same), the recommended CPU configuration where bf16 units
exist: in fp32 (``--fp32``) the backbone costs as much per image at batch 8 as at batch 1 on one
thread, so batching speeds up only the decoder. ``--quick`` uses timm's tiny
``test_efficientnet`` at 64 px with a tiny decoder and a few requests: a smoke run, not a measurement.

    python -m bench.serve            # defaults: 100 latency requests, 2 x 15 s per client count, 5,000 mixed
    python -m bench.serve --quick    # smoke run
    python -m bench.serve --phases hostile   # the hostile run alone
"""

from __future__ import annotations

import base64
import io
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

from bench.common import BenchRun, base_parser, log, markdown_table

NAME = "serve"
TARGET_LATENCY_RATIO = 1.2
TARGET_THROUGHPUT_RATIO = 2.0
REPO = Path(__file__).resolve().parents[1]
MALFORMED_KINDS = ("bad_base64", "not_an_image", "oversized", "truncated_jpeg", "wrong_content_type")
EXPECTED = {"valid": 200, "bad_base64": 400, "not_an_image": 422, "oversized": 413, "truncated_jpeg": 422,
            "wrong_content_type": 415}
SERVER_LIMIT = 1024 * 1024  # the server's --max-request-bytes here; oversized bodies are 1.25x this
SERVER_MAX_ASPECT_RATIO = 100_000  # high enough that the hostile strips are accepted (and trimmed)
HOSTILE_KINDS = ("wide_strip", "tall_strip", "bomb_header", "zlib_bomb", "nested_json", "garbage_multipart",
                 "truncated_png", "rebinding")
HOSTILE_EXPECTED = {"wide_strip": 200, "tall_strip": 200, "bomb_header": 422, "zlib_bomb": 422, "nested_json": 400,
                    "garbage_multipart": 400, "truncated_png": 422, "rebinding": 421}
SLOW_BODY_EXPECTED = (408, 503)  # cut at the body timeout; or no upload slot freed in time
PHASES = ("latency", "throughput", "hostile", "mixed")
TARGET_HOSTILE_GROWTH_MB = 100.0
TARGET_HEALTH_P99_MS = 100.0
CAPTION_WORDS = 16  # captions of the random stand-in model (synthetic captions run 5 to 15 words)


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="bundle to serve (default: models/*/bundle, else random)")
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the throughput run (default 8)")
    p.add_argument("--seconds", type=float, default=15.0, help="duration of each throughput measurement")
    p.add_argument("--max-requests", type=int, default=20_000, help="cap on requests of each throughput measurement")
    p.add_argument("--rounds", type=int, default=2, help="1-client / N-client throughput rounds (alternating)")
    p.add_argument("--mixed-requests", type=int, default=5000)
    p.add_argument("--malformed", type=float, default=0.3, help="share of malformed requests in the mixed run")
    p.add_argument("--mixed-seconds", type=float, default=900.0, help="time limit of the mixed run")
    p.add_argument("--hostile-requests", type=int, default=400)
    p.add_argument("--hostile-seconds", type=float, default=600.0, help="time limit of the hostile run")
    p.add_argument("--slow-clients", type=int, default=12,
                   help="slow-body connections open at once during the hostile run (the server has 16 upload slots)")
    p.add_argument("--body-timeout", type=float, default=5.0, help="the server's --body-timeout, seconds")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated phases to run ({', '.join(PHASES)})")
    p.add_argument("--threads", type=int, default=0, help="torch threads, server and in-process (0: half the cores)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--model-workers", type=int, default=0, help="server's --model-workers (0: its default)")
    p.add_argument("--fp32", action="store_true",
                   help="serve in fp32 with the default layout (default: --amp --channels-last, in-process too)")
    return p


# --------------------------------------------------------------------------- model and inputs
def find_trained_bundle() -> Optional[Path]:
    found = sorted(p.parent for p in (REPO / "models").glob("*/bundle/config.json"))
    return found[0] if found else None


def build_random_bundle(directory: Path, *, quick: bool, seed: int = 0) -> Path:
    """A random-weight bundle shaped like the ones ``dvc repro`` trains (params.yaml: the extract backbone
    and image size, the ``show_attend_tell`` options), or a tiny one (quick). Special tokens are
    suppressed, so every caption is ``CAPTION_WORDS`` words: the same work per request every time."""
    import numpy as np
    import torch
    import yaml

    from pipeline.data.synthetic import describe, sample_scene
    from pipeline.inference.bundle import save_bundle
    from pipeline.models.backbones import create_backbone
    from pipeline.models.decoders import create_decoder
    from pipeline.text.tokenizers import build_word_vocab

    if quick:
        bb = create_backbone("test_efficientnet", image_size=64, crop_pct=1.0)
        options = dict(embed_dim=16, hidden_dim=16, attention_dim=8, visual_dim=8)
    else:
        params = yaml.safe_load((REPO / "params.yaml").read_text()) if (REPO / "params.yaml").is_file() else {}
        ex = params.get("extract", {})
        weights = REPO / str(ex.get("weights") or "models/backbones/tf_efficientnet_lite0.safetensors")
        bb = create_backbone(ex.get("backbone", "tf_efficientnet_lite0"), weights=weights if weights.is_file() else None,
                             image_size=int(ex.get("image_size", 160)), crop_pct=1.0)
        options = dict(params.get("decoders", {}).get("show_attend_tell", {}).get("options")
                       or dict(embed_dim=128, hidden_dim=256, attention_dim=128, visual_dim=128, cell="lstm"))
    options["dropout"] = 0.0
    spec = bb.feature_spec(weights=bb.weights_info, dtype="float16")  # save_bundle adds the weights' sha256
    rng = np.random.default_rng(seed)
    tok = build_word_vocab([c for _ in range(200) for c in describe(sample_scene(rng), rng)],
                           max_length=CAPTION_WORDS)
    torch.manual_seed(seed)
    decoder = create_decoder("show_attend_tell", feature_dim=spec.feature_dim, vocab_size=tok.vocab_size,
                             pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, **options)
    with torch.no_grad():
        for special in {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}:
            decoder.out.bias[special] = -30.0
    decoder.eval()
    save_bundle(directory, decoder=decoder, tokenizer=tok, features=spec, backbone_state=bb.model.state_dict(),
                training={"note": "random weights: a benchmark stand-in"})
    return directory


def make_images(n: int, size: int, seed: int) -> list[bytes]:
    import numpy as np

    from pipeline.data.synthetic import render_scene, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        render_scene(sample_scene(rng), image_size=size, rng=rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def request_for(kind: str, images: list[bytes], i: int, modes: list[str]) -> dict[str, Any]:
    """httpx keyword arguments of request ``i`` of ``kind`` (valid requests rotate shapes and modes)."""
    img = images[i % len(images)]
    if kind == "valid":
        mode = modes[i % len(modes)]
        shape = i % 3
        if shape == 0:
            return {"files": {"image": ("x.jpg", img, "image/jpeg")}, "data": {"caption_mode": mode}}
        if shape == 1:
            return {"json": {"image": base64.b64encode(img).decode(), "caption_mode": mode}}
        return {"content": img, "headers": {"content-type": "image/jpeg"}, "params": {"caption_mode": mode}}
    if kind == "bad_base64":
        return {"json": {"image": "this is *not* base64!" + "x" * (i % 7)}}
    if kind == "not_an_image":
        return {"files": {"image": ("notes.jpg", b"%PDF-1.4 definitely not a picture " * (1 + i % 5), "image/jpeg")}}
    if kind == "oversized":
        return {"content": b"\xff" * int(SERVER_LIMIT * 1.25), "headers": {"content-type": "image/jpeg"}}
    if kind == "truncated_jpeg":
        return {"files": {"image": ("cut.jpg", img[: len(img) // 2], "image/jpeg")}}
    if kind == "wrong_content_type":
        return {"content": base64.b64encode(img), "headers": {"content-type": "text/plain"}}
    raise ValueError(kind)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, color_type: int = 2, idat: Optional[bytes] = None) -> bytes:
    """A PNG of ``width`` x ``height`` (8-bit; colour type 2 RGB, 0 grey) whose IDAT is ``idat`` (default:
    the zlib stream of an all-zero image; ``b""``: none at all, a header that only declares its size)."""
    if idat is None:
        row = b"\x00" * (1 + width * (3 if color_type == 2 else 1))  # filter byte 0, then the pixels
        idat = zlib.compress(row * height, 9)
    head = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + (_png_chunk(b"IDAT", idat) if idat else b"") + _png_chunk(b"IEND", b"")


def hostile_bodies(port: int) -> dict[str, dict[str, Any]]:
    """httpx keyword arguments of each hostile kind (built once: the zlib bomb takes a moment); ``port``: the
    server's, which a rebinding page's requests name with the page's host."""
    valid = _png(64, 48)
    rebound = f"evil.example:{port}"
    return {
        "wide_strip": {"content": _png(16_000, 1), "headers": {"content-type": "image/png"}},
        "tall_strip": {"files": {"image": ("tall.png", _png(1, 16_000), "image/png")}},
        "bomb_header": {"content": _png(60_000, 60_000, idat=b""), "headers": {"content-type": "image/png"}},
        "zlib_bomb": {"content": _png(6_700, 6_700, color_type=0), "headers": {"content-type": "image/png"}},
        "nested_json": {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}},
        "garbage_multipart": {"content": os.urandom(300_000),
                              "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
        "truncated_png": {"content": valid[: len(valid) // 2], "headers": {"content-type": "image/png"}},
        "rebinding": {"content": valid, "headers": {"content-type": "image/png", "host": rebound,
                                                    "origin": f"http://{rebound}"}},
    }


def slow_upload(port: int, timeout: float = 120.0) -> int:
    """One slow client: a request declaring a 100-byte body that sends 10 bytes and stalls; the status of the
    server's answer (-1: none, or the connection failed)."""
    head = (f"POST /caption HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100\r\n\r\n").encode("ascii")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(head + b"\x89PNG\r\n\x1a\n\0\0")
            data = b""
            while b"\r\n" not in data and (chunk := sock.recv(4096)):
                data += chunk
        return int(data.split()[1]) if data.startswith(b"HTTP/") else -1
    except (OSError, ValueError, IndexError):
        return -1


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, log_path: Path, args, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.threads), "--max-request-bytes", str(SERVER_LIMIT),
           "--body-timeout", str(args.body_timeout),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--model-workers", str(args.model_workers), "--max-aspect-ratio", str(SERVER_MAX_ASPECT_RATIO)
           ] + ([] if args.fp32 else ["--amp", "--channels-last"])
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_API_KEY"}  # no key (an empty one is refused)
    logf = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the server did not come up within {timeout:.0f} s; its log ends:\n{tail}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --------------------------------------------------------------------------- measurements
def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def measure_latency(base: str, engine, images: list[bytes], n: int, block: int = 10) -> dict[str, Any]:
    import httpx

    http_ms: list[float] = []
    local_ms: list[float] = []
    options = engine.options("consistent")

    def local(img: bytes) -> None:
        image = engine.decode(img)
        engine.result(engine.run([engine.prepare(image)], options).captions[0], mode="consistent")

    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(3):  # warm-up both paths
            client.post("/caption", files={"image": ("x.jpg", images[i % len(images)], "image/jpeg")}).raise_for_status()
            local(images[i % len(images)])
        i = 0
        while i < n:
            for j in range(i, min(i + block, n)):
                t = time.perf_counter()
                r = client.post("/caption", files={"image": ("x.jpg", images[j % len(images)], "image/jpeg")})
                http_ms.append((time.perf_counter() - t) * 1000.0)
                r.raise_for_status()
            for j in range(i, min(i + block, n)):
                t = time.perf_counter()
                local(images[j % len(images)])
                local_ms.append((time.perf_counter() - t) * 1000.0)
            i += block
    out = {}
    for name, xs in (("http", http_ms), ("in_process", local_ms)):
        out[name] = {"p50_ms": round(percentile(xs, 0.5), 3), "p95_ms": round(percentile(xs, 0.95), 3),
                     "mean_ms": round(statistics.fmean(xs), 3), "requests": len(xs)}
    out["ratio_p50"] = round(out["http"]["p50_ms"] / out["in_process"]["p50_ms"], 3)
    out["ratio_p95"] = round(out["http"]["p95_ms"] / out["in_process"]["p95_ms"], 3)
    return out


def closed_loop(base: str, clients: int, seconds: float, max_requests: int,
                make: Callable[[int], tuple[str, dict[str, Any]]], *, timeout: float = 60.0) -> dict[str, Any]:
    """``clients`` threads, each sending its next request when the answer arrives, until ``seconds`` have
    passed or ``max_requests`` were sent. ``make(i)`` -> (kind, httpx kwargs) of request ``i``."""
    import httpx

    lock = threading.Lock()
    counter = {"next": 0}
    statuses: dict[str, dict[int, int]] = {}
    failures: list[str] = []
    latencies: list[float] = []
    batch_sizes: list[int] = []
    deadline = time.monotonic() + seconds

    def take() -> Optional[int]:
        with lock:
            if counter["next"] >= max_requests or time.monotonic() >= deadline:
                return None
            counter["next"] += 1
            return counter["next"] - 1

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=timeout) as client:
            while (i := take()) is not None:
                kind, kwargs = make(i)
                t = time.perf_counter()
                try:
                    r = client.post("/caption", **kwargs)
                    status = r.status_code
                    bs = r.json()["timings"]["batch_size"] if status == 200 else None
                except httpx.HTTPError as e:  # a transport failure is a failure too
                    status, bs = -1, None
                    with lock:
                        failures.append(f"{kind}: {type(e).__name__}: {e}")
                dt = (time.perf_counter() - t) * 1000.0
                with lock:
                    statuses.setdefault(kind, {}).setdefault(status, 0)
                    statuses[kind][status] += 1
                    if kind == "valid" and status == 200:
                        latencies.append(dt)
                        batch_sizes.append(bs)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"client-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    elapsed = time.perf_counter() - started
    ok = sum(s.get(200, 0) for s in statuses.values())
    return {
        "clients": clients, "seconds": round(elapsed, 3), "requests": sum(sum(s.values()) for s in statuses.values()),
        "ok": ok, "requests_per_s": round(ok / elapsed, 3) if elapsed > 0 else 0.0,
        "statuses": {k: {str(c): n for c, n in sorted(v.items())} for k, v in statuses.items()},
        "transport_failures": failures[:20], "transport_failure_count": len(failures),
        "latency_p50_ms": round(percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p95_ms": round(percentile(latencies, 0.95), 3) if latencies else None,
        "mean_batch_size": round(statistics.fmean(batch_sizes), 3) if batch_sizes else None,
    }


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def hostile_run(base: str, pid: int, clients: int, n: int, seconds: float, slow_clients: int) -> dict[str, Any]:
    """``n`` hostile requests from ``clients`` clients while ``slow_clients`` slow-body connections stall, a
    prober asks for /health every 20 ms and the server's RSS is sampled every 10 ms."""
    import httpx

    port = int(base.rsplit(":", 1)[1])
    bodies = hostile_bodies(port)
    done = threading.Event()
    slow_statuses: dict[int, int] = {}
    slow_lock = threading.Lock()
    health_ms: list[float] = []
    health_bad: list[str] = []
    baseline = rss_mb(pid)
    peak = {"mb": baseline}

    def sample() -> None:
        while not done.is_set():
            peak["mb"] = max(peak["mb"], rss_mb(pid))
            time.sleep(0.01)

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                try:
                    status = c.get("/health").status_code
                except httpx.HTTPError as e:
                    status = -1
                    health_bad.append(f"{type(e).__name__}: {e}")
                health_ms.append((time.perf_counter() - t) * 1000.0)
                if status != 200:
                    health_bad.append(str(status))
                time.sleep(0.02)

    def slow() -> None:
        while not done.is_set():
            status = slow_upload(port)
            with slow_lock:
                slow_statuses[status] = slow_statuses.get(status, 0) + 1

    def request(i: int) -> tuple[str, dict[str, Any]]:
        kind = HOSTILE_KINDS[i % len(HOSTILE_KINDS)]
        return kind, bodies[kind]

    watchers = [threading.Thread(target=sample, daemon=True), threading.Thread(target=probe, daemon=True)]
    watchers += [threading.Thread(target=slow, daemon=True) for _ in range(slow_clients)]
    for w in watchers:
        w.start()
    try:
        run = closed_loop(base, clients, seconds, n, request)
    finally:
        done.set()
        for w in watchers:
            w.join(130)
    run.update({
        "rss_before_mb": round(baseline, 1), "rss_peak_mb": round(peak["mb"], 1),
        "rss_growth_mb": round(peak["mb"] - baseline, 1), "rss_high_water_mb": round(rss_mb(pid, "VmHWM"), 1),
        "health_probes": len(health_ms), "health_failures": health_bad[:20],
        "health_p50_ms": round(percentile(health_ms, 0.5), 3), "health_p99_ms": round(percentile(health_ms, 0.99), 3),
        "health_max_ms": round(max(health_ms), 3) if health_ms else None,
        "slow_clients": slow_clients, "slow_answers": {str(k): v for k, v in sorted(slow_statuses.items())},
        "slow_unexpected": sum(v for k, v in slow_statuses.items() if k not in SLOW_BODY_EXPECTED),
    })
    run["five_xx"] = _five_xx(run)
    run["unexpected"] = _errors(run, HOSTILE_EXPECTED)
    run["complete"] = run["requests"] == n
    return run


def _errors(run: dict[str, Any], expected: dict[str, int]) -> int:
    """Answers that are not the expected status (transport failures included)."""
    bad = run["transport_failure_count"]
    for kind, by_status in run["statuses"].items():
        bad += sum(n for code, n in by_status.items() if int(code) != expected[kind] and int(code) != -1)
    return bad


def _five_xx(run: dict[str, Any]) -> int:
    return sum(n for by_status in run["statuses"].values() for code, n in by_status.items() if int(code) >= 500)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise SystemExit(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    if args.quick:
        args.latency_requests, args.seconds, args.rounds = 6, 1.5, 1
        args.mixed_requests, args.mixed_seconds = 60, 60.0
        args.hostile_requests, args.hostile_seconds = 42, 60.0
        args.slow_clients, args.body_timeout = 4, 2.0
    import httpx

    from pipeline.inference.decoding import CAPTION_MODES
    from pipeline.inference.engine import CaptionEngine
    from pipeline.threads import set_threads

    set_threads(args.threads)
    run = BenchRun(NAME, args)
    proc = None
    latency = hostile = mixed = throughput = None
    with run.work_folder("bench-serve-") as work:
        try:
            bundle = args.model or (None if args.quick else find_trained_bundle())
            model_note = "trained bundle" if bundle else "random weights (benchmark stand-in)"
            if bundle is None:
                log(f"[serve] no trained bundle: building a random {'tiny' if args.quick else 'realistic-size'} one")
                bundle = build_random_bundle(work / "bundle", quick=args.quick, seed=args.seed)
            engine = CaptionEngine.load(bundle, amp=not args.fp32, channels_last=not args.fp32)
            engine.warm_up()
            model = {**engine.info(), "path": str(bundle), "weights": model_note}
            images = make_images(16, 224, args.seed)
            log(f"[serve] starting the server on {bundle} ({model['decoder']} on {model['backbone']})")
            proc, base = start_server(bundle, work / "server.log", args)

            if "latency" in phases:
                log(f"[serve] latency: {args.latency_requests} requests, HTTP vs in-process")
                latency = measure_latency(base, engine, images, args.latency_requests)
            del engine

            if "throughput" in phases:
                log(f"[serve] throughput: 1 vs {args.clients} clients, {args.seconds:.0f} s each, {args.rounds} round(s)")
                throughput = throughput_runs(base, args, images)

            if "hostile" in phases:
                log(f"[serve] hostile: {args.hostile_requests} requests (strips, bombs, malformed, rebinding), "
                    f"{args.clients} clients, {args.slow_clients} slow-body clients, with /health probes")
                hostile = hostile_run(base, proc.pid, args.clients, args.hostile_requests, args.hostile_seconds,
                                      args.slow_clients)

            if "mixed" in phases:
                log(f"[serve] mixed: {args.mixed_requests} requests, {args.malformed:.0%} malformed, {args.clients} "
                    "clients")
                kinds = _mixed_kinds(args.mixed_requests, args.malformed, args.seed)
                modes = list(CAPTION_MODES)
                mixed = closed_loop(base, args.clients, args.mixed_seconds, args.mixed_requests,
                                    lambda i: (kinds[i], request_for(kinds[i], images, i, modes)))
            health = httpx.get(base + "/health", timeout=30)
            after_caption = httpx.post(base + "/caption", files={"image": ("x.jpg", images[0], "image/jpeg")}, timeout=60)
            if mixed is not None:
                mixed["healthy_after"] = health.status_code == 200 and after_caption.status_code == 200
                mixed["five_xx"] = _five_xx(mixed)
                mixed["unexpected"] = _errors(mixed, EXPECTED)
                mixed["complete"] = mixed["requests"] == args.mixed_requests
            batching = health.json()["batching"] if health.status_code == 200 else {}
            model["model_workers"] = batching.get("model_workers")
        finally:
            if proc is not None:
                stop_server(proc)

    rows = []
    if latency is not None:
        rows += [
            ["single request p50, in-process (ms)", latency["in_process"]["p50_ms"], ""],
            ["single request p50, HTTP (ms)", latency["http"]["p50_ms"], ""],
            ["p50 HTTP / in-process", latency["ratio_p50"], f"<= {TARGET_LATENCY_RATIO}"],
            ["single request p95, in-process (ms)", latency["in_process"]["p95_ms"], ""],
            ["single request p95, HTTP (ms)", latency["http"]["p95_ms"], ""],
            ["p95 HTTP / in-process", latency["ratio_p95"], ""],
        ]
    if throughput is not None:
        rows += [
            ["throughput, 1 client (captions/s)", throughput["rps_one"], ""],
            [f"throughput, {args.clients} clients (captions/s)", throughput["rps_many"], ""],
            [f"{args.clients} clients / 1 client", throughput["ratio"], f">= {TARGET_THROUGHPUT_RATIO}"],
            [f"mean batch size at {args.clients} clients", throughput["mean_batch_size"], ""],
            ["errors in the throughput runs", throughput["errors"], "0"],
        ]
    if mixed is not None:
        malformed = sum(n for k, v in mixed["statuses"].items() if k != "valid" for n in v.values())
        rows += [
            ["mixed run: requests (malformed)", f"{mixed['requests']:,} ({malformed:,})", f"{args.mixed_requests:,}"],
            ["mixed run: 5xx answers", mixed["five_xx"], "0"],
            ["mixed run: other unexpected answers", mixed["unexpected"], "0"],
            ["mixed run: healthy and captioning after", "yes" if mixed["healthy_after"] else "NO", "yes"],
        ]
    if hostile is not None:
        rows += [
            [f"hostile run: requests ({', '.join(HOSTILE_KINDS)})", f"{hostile['requests']:,}",
             f"{args.hostile_requests:,}"],
            ["hostile run: rebinding requests answered 421", f"{hostile['statuses'].get('rebinding', {}).get('421', 0)}"
             f" of {sum(hostile['statuses'].get('rebinding', {}).values())}", "all"],
            [f"hostile run: slow-body clients ({hostile['slow_clients']} at once): answers by status",
             ", ".join(f"{k}: {v}" for k, v in hostile["slow_answers"].items()) or "none",
             " / ".join(map(str, SLOW_BODY_EXPECTED))],
            ["hostile run: server RSS before / peak (MB)", f"{hostile['rss_before_mb']:,} / {hostile['rss_peak_mb']:,}",
             ""],
            ["hostile run: server RSS growth (MB)", hostile["rss_growth_mb"], f"< {TARGET_HOSTILE_GROWTH_MB:g}"],
            ["hostile run: /health p50 / p99 / max (ms)",
             f"{hostile['health_p50_ms']} / {hostile['health_p99_ms']} / {hostile['health_max_ms']}",
             f"p99 < {TARGET_HEALTH_P99_MS:g}"],
            ["hostile run: 5xx / other unexpected answers",
             f"{hostile['five_xx']} / {hostile['unexpected'] + hostile['slow_unexpected']}", "0 / 0"],
        ]
    table = markdown_table(["measurement", "value", "target"], rows)
    throughput_note = (f" Throughput: medians of {args.rounds} round(s) of {args.seconds:g} s per client count."
                       if throughput is not None else "")
    caption = (
        f"`pipeline serve` ({model['decoder']} on {model['backbone']} at {model['input_size'][-1]} px, "
        f"{model['weights']}; {'fp32' if args.fp32 else 'bf16 autocast, channels_last'}; "
        f"max batch {args.max_batch_size}, wait window {args.max_wait_ms:g} ms, "
        f"{model.get('model_workers')} model worker(s); {run.machine.get('torch_threads')} torch thread(s) per model call "
        f"in the server and in-process; body timeout {args.body_timeout:g} s) in a subprocess on 127.0.0.1, "
        f"httpx clients in this process; phases: {', '.join(phases)}; 224 px JPEG uploads, mode consistent (the "
        f"mixed run: all modes and request shapes; the hostile run: strips, bombs, malformed bodies and DNS-rebinding "
        f"requests while {args.slow_clients} slow-body clients stall, the server's --max-aspect-ratio "
        f"raised to {SERVER_MAX_ASPECT_RATIO:,} so that the strips are accepted and trimmed, RSS sampled every "
        f"10 ms).{throughput_note}{' (QUICK smoke run: not a measurement)' if args.quick else ''} "
        f"{run.machine_note()}"
    )
    markdown = f"### Serving\n\n{table}\n\n{caption}\n"
    ratios, targets = {}, {}
    if latency is not None:
        ratios.update(latency_p50_http_vs_in_process=latency["ratio_p50"],
                      latency_p95_http_vs_in_process=latency["ratio_p95"])
        targets["latency_p50_ratio_max"] = TARGET_LATENCY_RATIO
    if throughput is not None:
        ratios[f"throughput_{args.clients}_vs_1_clients"] = throughput["ratio"]
        targets["throughput_ratio_min"] = TARGET_THROUGHPUT_RATIO
    if hostile is not None:
        targets.update(hostile_rss_growth_mb_max=TARGET_HOSTILE_GROWTH_MB, health_p99_ms_max=TARGET_HEALTH_P99_MS)
    return run.publish({
        "phases": phases,
        "model": model,
        "latency": latency,
        "throughput": {"one_client": throughput["one"], "many_clients": throughput["many"]} if throughput else None,
        "mixed": mixed,
        "hostile": hostile,
        "server_batching": batching,
        "ratios": ratios,
        "targets": targets,
    }, markdown)


def throughput_runs(base: str, args, images: list[bytes]) -> dict[str, Any]:
    """1 client vs ``args.clients`` closed-loop clients of valid requests, alternating over ``args.rounds``."""
    valid = lambda i: ("valid", request_for("valid", images, i, ["consistent"]))  # noqa: E731
    rounds = []
    for r in range(args.rounds):
        order = (1, args.clients) if r % 2 == 0 else (args.clients, 1)
        rounds.append({c: closed_loop(base, c, args.seconds, args.max_requests, valid) for c in order})
    one = [rd[1] for rd in rounds]
    many = [rd[args.clients] for rd in rounds]
    return {
        "one": one, "many": many,
        "rps_one": statistics.median(o["requests_per_s"] for o in one),
        "rps_many": statistics.median(m["requests_per_s"] for m in many),
        "ratio": round(statistics.median(m["requests_per_s"] / o["requests_per_s"] for o, m in zip(one, many)), 3),
        "mean_batch_size": statistics.median(m["mean_batch_size"] or 0 for m in many),
        "errors": sum(_errors(x, EXPECTED) for x in one + many),
    }


def _mixed_kinds(n: int, malformed: float, seed: int) -> list[str]:
    import random

    bad = round(n * malformed)
    kinds = [MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i in range(bad)] + ["valid"] * (n - bad)
    random.Random(seed).shuffle(kinds)
    return kinds


if __name__ == "__main__":
    main()
