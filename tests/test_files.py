"""What stages write is byte-deterministic and has the usual permissions: the same content, the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch
from safetensors.torch import load_file, save_file

from pipeline.files import canonical_safetensors, write_safetensors


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def test_safetensors_metadata_in_a_fixed_order_and_readable(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {"source": "x.pth", "backbone": "tf_efficientnet_lite0", "zeta": "1", "alpha": "2"}
    digests = set()
    for i in range(4):  # safetensors itself writes metadata in hash order: several runs would differ
        write_safetensors(tmp_path / f"w{i}.safetensors", tensors, metadata)
        digests.add(hashlib.sha256((tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    data = (tmp_path / "w0.safetensors").read_bytes()
    assert list(_header(data)["__metadata__"]) == sorted(metadata)
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0  # header padded to the format's alignment
    loaded = load_file(str(tmp_path / "w0.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert os.stat(tmp_path / "w0.safetensors").st_mode & 0o777 == 0o666 & ~_umask()


def test_canonical_form_is_stable_and_keeps_the_tensors(tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "raw.safetensors"), metadata={"k2": "v", "k1": "w"})
    raw = (tmp_path / "raw.safetensors").read_bytes()
    once = canonical_safetensors(raw)
    assert canonical_safetensors(once) == once
    assert once[-12:] == raw[-12:]  # the data section is untouched


def test_convert_weights_twice_gives_one_file(tmp_path):
    from pipeline.models.convert import convert_weights

    for name in ("a", "b"):
        convert_weights("package:efficientnet_lite0", tmp_path / f"{name}.safetensors", "tf_efficientnet_lite0",
                        by_order=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
