"""Reference recipes: presets that rebuild the architectures of our reference captioning models.

Each :class:`Recipe` names a timm backbone, a decoder family with its options, the
tokenizer and vocabulary size, the embedding initialisation, and the figures the
reference published (parameter counts) where there are any. Nothing here is trained:

* :func:`build_recipe` builds the backbone and the decoder, randomly initialised
  (``device="meta"`` builds shapes only: instant, and parameter counts are the same);
* :func:`count_parameters` counts backbone, decoder, total, and what trains when the
  backbone is frozen (the pipeline trains on cached features, so it always is);
* :func:`recipe_params` gives the ``params.yaml`` sections that train the recipe with
  this pipeline (``pipeline recipes NAME`` prints them).

Sizes that a reference did not publish are our choices; each recipe's ``notes`` say
which numbers are published and which are chosen. The word-vocabulary sizes are the
sizes used for counting: a real run's vocabulary is whatever ``pipeline vocab`` builds
from its captions (``vocab.min_freq`` moves it).

Only light imports at module level (``pipeline recipes`` stays quick); torch and
timm are imported when a model is built.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import ConfigError

GPT2_VOCAB_SIZE = 50_257
GPT2_SPECIAL_ID = 50_256  # <|endoftext|>: bos, eos and pad
WORD_SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2}  # then <unk>=3 (pipeline.text.tokenizers)
BACKBONE_STRIDE = 32  # output stride of every backbone below: visual tokens = ceil(image_size / 32) ** 2


class Recipe(BaseModel):
    """One reference architecture at its published size."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    name: str
    description: str = Field(description="One line: the architecture.")
    reference: str = Field(description="Which reference model it reproduces.")
    backbone: str = Field(description="timm model name.")
    image_size: int = Field(description="Square input side, pixels.")
    extract: dict[str, Any] = Field(default_factory=dict, description="Other `extract` options (e.g. out_indices).")
    decoder: str = Field(description="Decoder family (pipeline.models.decoders).")
    decoder_options: dict[str, Any] = Field(default_factory=dict, description="The family's options.")
    tokenizer: Literal["word", "bpe", "gpt2"]
    vocab_size: int = Field(description="Vocabulary size used to build and count (specials included).")
    embeddings: Optional[str] = Field(None, description="Word-embedding initialisation, e.g. 'GloVe 6B 300d'.")
    train: dict[str, Any] = Field(
        default_factory=dict, description="`train` options for this recipe (go to decoders.<family>.train)."
    )
    hints: dict[str, Any] = Field(default_factory=dict, description="Known training facts the config cannot express.")
    published: dict[str, int] = Field(
        default_factory=dict, description="Parameter counts the reference published: total, trainable."
    )
    known_sizes: dict[str, int] = Field(
        default_factory=dict, description="Independent figures for parts of the model (e.g. GPT-2 small's body)."
    )
    notes: str = ""

    @property
    def special_ids(self) -> dict[str, int]:
        if self.tokenizer == "gpt2":
            return {"pad_id": GPT2_SPECIAL_ID, "bos_id": GPT2_SPECIAL_ID, "eos_id": GPT2_SPECIAL_ID}
        return dict(WORD_SPECIAL_IDS)


_GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            name="effnetv2s_transformer",
            description="EfficientNetV2-S + 6-layer/8-head/256-d Transformer decoder, 9,721-word vocabulary",
            reference="EfficientNetV2-S features + Transformer decoder (6 layers, 8 heads, d_model 256), "
            "word vocabulary of 9,721 words",
            backbone="tf_efficientnetv2_s",
            image_size=384,
            extract={"out_indices": None},
            decoder="transformer",
            decoder_options={
                "d_model": 256, "num_layers": 6, "num_heads": 8, "ff_dim": 1024, "dropout": 0.1,
                "max_length": 64, "positions": "learned", "num_encoder_layers": 0,
                "max_visual_tokens": 144, "tie_embeddings": True,
            },
            tokenizer="word",
            vocab_size=9_721,
            hints={"backbone_trainable": False},
            known_sizes={"backbone": 20_177_488},
            notes="Published: the backbone, 6x8x256 and the 9,721-word vocabulary. Chosen: ff_dim 1024 (4 x d), "
            "tied input/output embeddings, 384 px input (EfficientNetV2-S's evaluation size; 12x12 = 144 "
            "visual tokens, which sizes the visual position table). tf_efficientnetv2_s is the port of the "
            "official TF/Keras weights (efficientnetv2_s: same architecture and size, timm's own).",
        ),
        Recipe(
            name="effnetb1_gpt2",
            description="EfficientNet-B1 + 2-layer Transformer encoder + 6-layer GPT-2-style decoder, GPT-2 BPE",
            reference="EfficientNet-B1 features, a Transformer encoder over the visual tokens, a GPT-2-style "
            "decoder with the GPT-2 tokenizer (50,257 tokens)",
            backbone="efficientnet_b1",
            image_size=240,
            extract={"out_indices": None},
            decoder="gpt2",
            decoder_options={
                "n_layer": 6, "n_head": 12, "n_embd": 768, "n_positions": 1024, "dropout": 0.1,
                "num_encoder_layers": 2, "max_visual_tokens": 64,
            },
            tokenizer="gpt2",
            vocab_size=GPT2_VOCAB_SIZE,
            hints={"backbone_trainable": False},
            known_sizes={"backbone": 6_513_184},
            notes="Published: backbone, encoder + GPT-2-style decoder, GPT-2 tokenizer. Chosen (no size "
            "published): the decoder has DistilGPT-2's shape (6 layers, 12 heads, 768-d, 1024 positions), so "
            "decoders.gpt2.options.pretrained_path may point at a local distilgpt2; 2 encoder layers; 240 px "
            "(B1's native size; 8x8 = 64 visual tokens).",
        ),
        Recipe(
            name="resnet50_lstm",
            description="ResNet-50 + Show-and-Tell LSTM (256 embed / 512 hidden)",
            reference="ResNet-50 pooled feature fed to an LSTM (Show and Tell), embedding 256, hidden 512",
            backbone="resnet50",
            image_size=224,
            extract={"out_indices": None},
            decoder="show_tell",
            decoder_options={"embed_dim": 256, "hidden_dim": 512, "num_layers": 1, "dropout": 0.5},
            tokenizer="word",
            vocab_size=10_000,
            hints={"backbone_trainable": False},
            known_sizes={"backbone": 23_508_032},
            notes="Published: ResNet-50, LSTM 256/512. Chosen: one LSTM layer, a nominal 10,000-word "
            "vocabulary (none published; the decoder grows by 769 parameters per word).",
        ),
        Recipe(
            name="resnet50_attention_gru",
            description="ResNet-50 (frozen) + Bahdanau attention + GRU 1024, GloVe 300d embeddings",
            reference="ResNet-50 + additive (Bahdanau) attention + GRU decoder, hidden 1024, 300-d GloVe word "
            "embeddings; published ~37 M parameters, ~12 M trainable (backbone frozen)",
            backbone="resnet50",
            image_size=224,
            extract={"out_indices": None},
            decoder="show_attend_tell",
            decoder_options={
                "cell": "gru", "embed_dim": 300, "hidden_dim": 1024, "attention_dim": 512, "visual_dim": 512,
                "dropout": 0.5, "alpha_c": 1.0,
            },
            tokenizer="word",
            vocab_size=6_500,
            embeddings="GloVe 6B 300d",
            train={"glove": "data/glove/glove.6B.300d.txt", "freeze_embeddings": False},
            hints={"backbone_trainable": False},
            published={"total": 37_000_000, "trainable": 12_000_000},
            known_sizes={"backbone": 23_508_032},
            notes="Published: GRU 1024, GloVe 300d, ~37 M total / ~12 M trainable. Chosen to fit those: "
            "attention_dim = visual_dim = 512 and a 6,500-word vocabulary, which give a 12.38 M decoder "
            "(8.47 M fixed + 601 per word) and 35.89 M in all with ResNet-50 without its classifier "
            "(23.51 M). The published 37 M is 1.1 M above 23.5 + 12; it fits either a count that kept "
            "ResNet-50's 2.05 M fc layer (25.56 + 12 = 37.6 M) or frozen GloVe embeddings "
            "(23.5 + 1.5 frozen + 12 trainable = 37.0 M with a 5,000-word vocabulary) - we keep the "
            "embeddings trainable (set freeze_embeddings: true to freeze them).",
        ),
        Recipe(
            name="convnext_tiny_perceiver_gpt2",
            description="ConvNeXt-Tiny + Perceiver resampler (64 x 768) + GPT-2 small with cross-attention",
            reference="ConvNeXt-Tiny features, a Perceiver resampler (64 latents, 768-d), GPT-2 small "
            "(12 layers, 12 heads, 768-d) with cross-attention after every block, GPT-2 tokenizer",
            backbone="convnext_tiny",
            image_size=224,
            extract={"out_indices": None},
            decoder="perceiver_gpt2",
            decoder_options={
                **_GPT2_SMALL, "dropout": 0.1, "num_latents": 64, "resampler_depth": 2,
                "resampler_heads": 12, "resampler_ff_mult": 4, "num_encoder_layers": 0, "max_visual_tokens": 49,
            },
            tokenizer="gpt2",
            vocab_size=GPT2_VOCAB_SIZE,
            hints={"backbone_trainable": False},
            known_sizes={"backbone": 27_820_128, "gpt2_small": 124_439_808, "gpt2_cross_attention": 28_366_848},
            notes="Published: backbone, 64 latents x 768, GPT-2 small + cross-attention in every block. "
            "Chosen: resampler depth 2 with 12 heads, 224 px (7x7 = 49 visual tokens). With a local GPT-2 "
            "small, decoders.perceiver_gpt2.options.pretrained_path loads it (cross-attention starts fresh).",
        ),
    ]
}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


# --------------------------------------------------------------------------- building and counting
def build_recipe(name: str | Recipe, *, device: str | None = None, seed: int = 0):
    """``(backbone, decoder)``: the timm model without its classifier and the caption decoder.

    Random initialisation (seeded). ``device="meta"`` allocates no memory and runs no
    initialisation: use it to count parameters of the large recipes quickly.
    """
    import timm
    import torch

    from pipeline.models.decoders import create_decoder

    recipe = get_recipe(name)
    if device != "meta":
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        backbone = timm.create_model(recipe.backbone, pretrained=False, num_classes=0)
        decoder = create_decoder(
            recipe.decoder, feature_dim=backbone.num_features, vocab_size=recipe.vocab_size,
            **recipe.special_ids, **recipe.decoder_options,
        )
    backbone.eval()
    return backbone, decoder


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters count once


def count_parameters(recipe: str | Recipe, *, device: str = "meta", models=None) -> dict[str, int]:
    """``{"backbone", "decoder", "total", "trainable_frozen_backbone"}`` parameter counts.

    Counted on meta tensors by default (same shapes, nothing allocated); pass ``models``
    (a ``build_recipe`` result) to count modules already built. The trainable count is
    the decoder's parameters that require gradients, with the recipe's
    ``freeze_embeddings`` applied.
    """
    recipe = get_recipe(recipe)
    backbone, decoder = models if models is not None else build_recipe(recipe, device=device)
    # What `train --freeze-embeddings` freezes: the (GloVe-initialised) word-embedding table.
    frozen = decoder.word_embedding_table().weight if recipe.train.get("freeze_embeddings") else None
    n_backbone, n_decoder = _count(backbone), _count(decoder)
    trainable = sum(p.numel() for p in decoder.parameters() if p.requires_grad and p is not frozen)
    return {
        "backbone": n_backbone,
        "decoder": n_decoder,
        "total": n_backbone + n_decoder,
        "trainable_frozen_backbone": trainable,
    }


# --------------------------------------------------------------------------- params.yaml
def recipe_params(name: str | Recipe) -> dict[str, Any]:
    """The params.yaml sections (extract, vocab, train, decoders.<family>) that train this recipe.

    Paste them over a params file's sections of the same names. Family-specific
    training options (e.g. ``glove``) sit in ``decoders.<family>.train`` so that the
    other families trained by the same pipeline are not affected.
    """
    from pipeline.config import VocabConfig

    recipe = get_recipe(name)
    kinds = list(VocabConfig.model_fields["kinds"].default)
    if recipe.tokenizer not in kinds:
        kinds.append(recipe.tokenizer)
    return {
        "extract": {
            "backbone": recipe.backbone,
            "pretrained": True,
            "weights": None,
            "image_size": recipe.image_size,
            **recipe.extract,
        },
        "vocab": {"kinds": kinds},
        "train": {
            "decoder": recipe.decoder,
            "tokenizer": f"models/tokenizers/{recipe.tokenizer}",
            "out_dir": f"models/{recipe.name}",
        },
        "decoders": {recipe.decoder: {"options": dict(recipe.decoder_options), "train": dict(recipe.train)}},
    }


def recipe_params_yaml(name: str | Recipe, *, counts: dict[str, int] | None = None) -> str:
    """:func:`recipe_params` as YAML, with a comment header saying what it is."""
    import yaml

    recipe = get_recipe(name)
    lines = [f"# Recipe {recipe.name}: {recipe.description}", f"# Reproduces: {recipe.reference}"]
    if counts:
        lines.append(
            f"# Parameters: backbone {counts['backbone']:,}, decoder {counts['decoder']:,}, "
            f"total {counts['total']:,}, trainable (frozen backbone) {counts['trainable_frozen_backbone']:,}"
        )
    if recipe.published:
        lines.append("# Published: " + ", ".join(f"{k} {v:,}" for k, v in recipe.published.items()))
    lines.append(f"# Vocabulary: {recipe.tokenizer}, {recipe.vocab_size:,} tokens"
                 + (" (the real size is what `pipeline vocab` builds; vocab.min_freq moves it)"
                    if recipe.tokenizer == "word" else ""))
    if recipe.embeddings:
        lines.append(f"# Embeddings: {recipe.embeddings}; train.glove must point at that file "
                     "(or set it to null for random embeddings)")
    lines.append("# extract.pretrained downloads timm's ImageNet weights; offline, set pretrained: false and "
                 "weights: PATH (a local state dict).")
    body = yaml.safe_dump(recipe_params(recipe), sort_keys=False, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


__all__ = [
    "Recipe",
    "RECIPES",
    "get_recipe",
    "build_recipe",
    "count_parameters",
    "recipe_params",
    "recipe_params_yaml",
]
