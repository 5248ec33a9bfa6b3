"""open_clip models for caption filtering: load by architecture + weights, embed images and captions.

Weights (``pretrained``) come from exactly one of:

* a **local file** — an open_clip checkpoint (``.safetensors``, or a torch file read with
  ``weights_only=True``), e.g. the one ``pipeline clip-train`` writes, or a real CLIP the
  user downloaded; an ``open_clip_config.json`` beside it (written by ``clip-train``) is
  checked against the architecture and its image size honoured;
* a **local folder** holding ``open_clip_config.json`` + a checkpoint (open_clip's
  ``local-dir:`` layout; the folder's config wins over ``arch``);
* a **named open_clip tag** (``openai``, ``laion2b_s34b_b79k``, ...), downloaded by open_clip
  for online users. With ``HF_HUB_OFFLINE=1`` (the pipeline's default) a tag whose weights
  are not already in the local cache fails at once with :class:`ClipWeightsError`, never
  after network retries.

Random initialisation is refused: an untrained CLIP scores at random.

The package ships its own architectures in ``pipeline/models/clip_configs/`` (open_clip
model-config JSON files), registered with ``open_clip.add_model_config`` on import, so
``synthetic-clip-tiny`` is an open_clip architecture like ``ViT-B-32``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError

from pipeline.errors import UserError
from pipeline.files import write_json, write_safetensors
from pipeline.models.backbones import file_sha256

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("clip_configs")
TINY_ARCH = "synthetic-clip-tiny"
CONFIG_FILE = "open_clip_config.json"
CHECKPOINT_FILE = "open_clip_model.safetensors"
_OFFLINE_VALUES = {"1", "true", "yes", "on"}

_registered = False


class ClipWeightsError(UserError, RuntimeError):
    """CLIP weights that cannot be had or used; the message says which and what to pass instead."""


def register_configs() -> None:
    """Register the package's open_clip model configs (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True


def list_architectures() -> list[str]:
    import open_clip

    register_configs()
    return open_clip.list_models()


def arch_config(arch: str) -> dict[str, Any]:
    """The open_clip model config of a registered architecture (a copy)."""
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ClipWeightsError(f"unknown open_clip architecture {arch!r}; known: {', '.join(list_architectures())}")
    return cfg


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


# --------------------------------------------------------------------------- resolving weights
@dataclass
class ResolvedWeights:
    kind: str  # "file" | "dir" | "tag"
    path: Path  # the checkpoint file (for "dir": the one open_clip picks)
    tag: Optional[str] = None
    config_path: Optional[Path] = None  # open_clip_config.json beside the weights, if any


def resolve_pretrained(arch: str, pretrained: Optional[str | Path]) -> ResolvedWeights:
    """Where the weights of ``arch`` come from; raises :class:`ClipWeightsError` with what to do instead."""
    import open_clip

    register_configs()
    if pretrained is None or str(pretrained).strip().lower() in ("", "none"):
        raise ClipWeightsError(
            f"--clip-pretrained is required: an untrained {arch} scores captions at random. Pass a local open_clip "
            f"checkpoint file (e.g. the one `pipeline clip-train` writes) or, online, a named open_clip tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known for this architecture'})"
        )
    p = Path(str(pretrained)).expanduser()
    if p.is_dir():
        cfg = p / CONFIG_FILE
        if not cfg.is_file():
            raise ClipWeightsError(f"{p}: a CLIP weights folder needs {CONFIG_FILE} and a checkpoint file")
        from open_clip.factory import _find_checkpoint_in_dir

        ckpt = _find_checkpoint_in_dir(p)
        if ckpt is None:
            raise ClipWeightsError(f"{p}: no checkpoint (*.safetensors, *.bin, *.pth) beside {CONFIG_FILE}")
        return ResolvedWeights("dir", Path(ckpt), config_path=cfg)
    if p.is_file():
        sibling = p.parent / CONFIG_FILE
        return ResolvedWeights("file", p, config_path=sibling if sibling.is_file() else None)
    arch_config(arch)  # unknown architecture: say so before talking about tags
    tag = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        looks_like_path = any(s in tag for s in ("/", "\\")) or Path(tag).suffix
        known = open_clip.list_pretrained_tags_by_model(arch)
        if looks_like_path:
            raise ClipWeightsError(f"--clip-pretrained {tag}: no such file or folder")
        raise ClipWeightsError(
            f"--clip-pretrained {tag!r} is neither a local checkpoint file nor a named open_clip tag of {arch} "
            f"(known tags: {', '.join(known) or 'none'})"
        )
    return ResolvedWeights("tag", _download_tag(arch, tag, tag_cfg), tag=tag)


def _download_tag(arch: str, tag: str, tag_cfg: dict) -> Path:
    """The local file of a named tag: from the cache when offline (at once), else downloaded by open_clip."""
    from open_clip.pretrained import download_pretrained, has_hf_hub

    advice = (
        f"the pretrained tag {tag!r} of {arch} needs a download, and HF_HUB_OFFLINE=1 (the default) forbids it. "
        f"Pass a local checkpoint file with --clip-pretrained PATH (e.g. open_clip_pytorch_model.bin downloaded "
        f"on another machine), or set HF_HUB_OFFLINE=0 on a machine with network access"
    )
    if hub_offline():
        if tag_cfg.get("hf_hub") and has_hf_hub():
            try:  # the hub client answers from its local cache, or fails at once, when offline
                return Path(download_pretrained(tag_cfg))
            except Exception:  # noqa: BLE001 - any failure means: not in the local cache
                raise ClipWeightsError(advice) from None
        url = tag_cfg.get("url", "")
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
        if cached is not None and cached.is_file():
            return cached
        raise ClipWeightsError(advice)
    try:
        return Path(download_pretrained(tag_cfg))
    except Exception as e:  # noqa: BLE001 - re-raised with the advice
        raise ClipWeightsError(f"downloading the pretrained tag {tag!r} of {arch} failed: {e}. Pass a local "
                               f"checkpoint file with --clip-pretrained PATH instead") from None


# --------------------------------------------------------------------------- the model
@dataclass
class ClipModel:
    """A loaded open_clip model with its preprocessing and tokenizer, in eval mode."""

    arch: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    weights: dict[str, Any]  # {"source": "file"|"dir"|"tag", "path", "sha256", "tag"?}
    preprocessing: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @functools.cached_property
    def embed_dim(self) -> int:
        return int(self.encode_texts(["a"]).shape[1])

    @property
    def key(self) -> str:
        """Cache key: the architecture and the checkpoint's content (and input size)."""
        size = self.preprocessing.get("size")
        if isinstance(size, (list, tuple)):
            size = str(size[0]) if len(set(size)) == 1 else "x".join(str(s) for s in size)
        return f"{safe_name(self.arch)}-{size}px-{self.weights['sha256'][:16]}"

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (float32, on the CPU) of preprocessed images."""
        feats = self.model.encode_image(pixels.to(self.device), normalize=True)
        return feats.float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (float32, on the CPU)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            out.append(encode_text(self.model, tokens).float().cpu())
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)


def encode_text(model: torch.nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``model.encode_text``, computed only up to the batch's longest caption when that gives the same result.

    With a causal mask and end-of-text pooling (open_clip's ``CLIP`` text tower), positions after
    the last end-of-text token never influence the pooled feature, so they are cut off: a
    3-4x saving for short captions in a 77-token context.
    """
    import open_clip

    if not (type(model) is open_clip.CLIP and model.text_pool_type == "argmax" and model.attn_mask is not None):
        return model.encode_text(tokens, normalize=normalize)
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _check_sibling_config(arch: str, config_path: Path) -> dict[str, Any]:
    """Overrides (``force_image_size``) from an ``open_clip_config.json`` beside a checkpoint file."""
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ClipWeightsError(f"{config_path}: unreadable open_clip config: {e}") from None
    model_cfg = saved.get("model_cfg", saved)
    own = arch_config(arch)
    a, b = json.loads(json.dumps(model_cfg)), json.loads(json.dumps(own))
    size = a.get("vision_cfg", {}).pop("image_size", None)
    b.get("vision_cfg", {}).pop("image_size", None)
    if a != b:
        saved_arch = saved.get("arch", "another architecture")
        raise ClipWeightsError(
            f"{config_path.parent}: the checkpoint was saved for {saved_arch} with another model config than "
            f"--clip-model {arch}; pass the folder {config_path.parent} as --clip-pretrained to use its own config"
        )
    return {"force_image_size": size} if size is not None and size != own["vision_cfg"].get("image_size") else {}


def load_clip(arch: str, pretrained: Optional[str | Path], device: str | torch.device = "cpu") -> ClipModel:
    """An open_clip model of architecture ``arch`` with the weights ``pretrained`` (see the module doc)."""
    import open_clip

    register_configs()
    device = torch.device(device)
    resolved = resolve_pretrained(arch, pretrained)
    kwargs: dict[str, Any] = {}
    if resolved.kind == "dir":
        name, weights_arg = f"local-dir:{Path(str(pretrained)).expanduser()}", None
        try:
            saved = json.loads(resolved.config_path.read_text(encoding="utf-8"))
            arch = saved.get("arch", arch)
        except (OSError, ValueError, AttributeError) as e:
            raise ClipWeightsError(f"{resolved.config_path}: not a readable open_clip config ({e})") from None
    else:
        arch_config(arch)
        name, weights_arg = arch, str(resolved.path)
        if resolved.kind == "file" and resolved.config_path is not None:
            kwargs = _check_sibling_config(arch, resolved.config_path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights_arg, device=device, weights_only=True, **kwargs
        )
    except ClipWeightsError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipWeightsError(f"{resolved.path}: cannot load as {arch} weights ({first}); pass a file or folder "
                               "written by open_clip or `pipeline clip-train`") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()}
    weights = {"source": resolved.kind, "path": str(resolved.path), "sha256": file_sha256(resolved.path)}
    if resolved.tag:
        weights["tag"] = resolved.tag
    log.info("CLIP %s, weights %s (%s, sha256 %s)", arch, resolved.path, resolved.kind, weights["sha256"][:12])
    return ClipModel(arch=arch, model=model, preprocess=preprocess, tokenizer=tokenizer, weights=weights,
                     preprocessing=pcfg, device=device)


def create_untrained(arch: str, image_size: Optional[int] = None, seed: int = 0) -> tuple[torch.nn.Module, Any, Any]:
    """A randomly initialised ``arch`` for training: (model, train transform, eval transform)."""
    import open_clip

    register_configs()
    arch_config(arch)
    torch.manual_seed(seed)
    kwargs = {"force_image_size": image_size} if image_size else {}
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(arch, pretrained=None, **kwargs)
    return model, train_tf, eval_tf


def save_checkpoint(model: torch.nn.Module, arch: str, out_dir: Path, image_size: Optional[int] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write ``open_clip_model.safetensors`` and ``open_clip_config.json`` (open_clip's local-dir layout).

    The folder loads with ``--clip-pretrained DIR`` or ``open_clip.create_model_and_transforms("local-dir:DIR")``;
    the file loads with ``--clip-model ARCH --clip-pretrained DIR/open_clip_model.safetensors``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = arch_config(arch)
    if image_size:
        model_cfg["vision_cfg"]["image_size"] = image_size
    pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    ckpt = out_dir / CHECKPOINT_FILE
    write_safetensors(ckpt, state, metadata={"arch": arch, "format": "open_clip"})
    config = {"arch": arch, "model_cfg": model_cfg, "preprocess_cfg": pcfg, **(extra or {})}
    write_json(out_dir / CONFIG_FILE, config)
    return ckpt
