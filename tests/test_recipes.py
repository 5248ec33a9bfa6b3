"""Reference recipes: each builds (random init) at its published size, with the parameter counts we expect,
and its params.yaml sections load through the pipeline's own config loaders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config, load_train_config
from pipeline.errors import ConfigError
from pipeline.models.decoders import DECODERS, create_decoder, decoder_config_class
from pipeline.recipes.presets import (
    BACKBONE_STRIDE,
    GPT2_SPECIAL_ID,
    GPT2_VOCAB_SIZE,
    RECIPES,
    build_recipe,
    count_parameters,
    get_recipe,
    recipe_params,
)

M = 1_000_000
RESNET50_NO_FC = 23_508_032  # timm resnet50, num_classes=0 (25.56 M with its 2048x1000 fc)
GPT2_SMALL = 124_439_808  # GPT-2 small (12 x 768, 1024 positions, 50,257 tokens, tied head)
GPT2_CROSS_PER_LAYER_768 = 2_363_904  # q (768x768), k/v (768x1536), out (768x768) + biases, + its LayerNorm


@pytest.fixture(scope="module", params=list(RECIPES))
def built(request):
    """One recipe's real (CPU, random-init) models at a time: module-scoped and parametrized, so pytest
    runs every test of one recipe before building the next and the large ones are never held together."""
    name = request.param
    backbone, decoder = build_recipe(name)
    decoder.eval()
    yield RECIPES[name], backbone, decoder, count_parameters(name, models=(backbone, decoder))
    del backbone, decoder


def test_meta_counts_equal_real_counts(built):
    recipe, _, _, counts = built
    assert count_parameters(recipe.name) == counts  # the quick (meta) count used by the CLI is exact
    assert counts["total"] == counts["backbone"] + counts["decoder"]
    assert counts["trainable_frozen_backbone"] == counts["decoder"]  # no recipe freezes part of its decoder


def test_backbone_size(built):
    recipe, backbone, _, counts = built
    expected = {  # timm, num_classes=0; published figures include the classifier
        "tf_efficientnetv2_s": 20.2 * M,  # ~21.5 M with its classifier
        "efficientnet_b1": 6.5 * M,  # ~7.8 M with its classifier
        "resnet50": 23.5 * M,
        "convnext_tiny": 27.8 * M,  # ~28.6 M with its head
    }[recipe.backbone]
    assert counts["backbone"] == pytest.approx(expected, rel=0.01)
    assert counts["backbone"] == recipe.known_sizes["backbone"]


def test_features_reach_the_decoder(built):
    """The backbone's last map at the recipe's size gives the tokens the decoder was sized for."""
    recipe, backbone, decoder, _ = built
    with torch.no_grad():
        # The backbone's shapes at the full size on meta tensors (no compute: timm's own code needs no
        # numerical check here, and a first CPU convolution pass costs seconds); the decoder runs for real.
        meta_backbone, _ = build_recipe(recipe, device="meta")
        side = recipe.image_size
        fmap = meta_backbone.forward_features(torch.empty(1, 3, side, side, device="meta"))
        assert fmap.shape == (1, backbone.num_features, *(2 * [-(-side // 32)]))
        tokens = math.ceil(recipe.image_size / BACKBONE_STRIDE) ** 2  # one token per 32x32 patch of the input
        assert fmap.shape[2] * fmap.shape[3] == tokens
        features = torch.randn(1, tokens, backbone.num_features)
        tokens = torch.tensor([[recipe.special_ids["bos_id"], 5, 6, 7]])
        logits = decoder(features, tokens, torch.tensor([4])).logits
    assert logits.shape == (1, 4, recipe.vocab_size)
    assert torch.isfinite(logits).all()


def feature_dim(recipe) -> int:
    """Channels of the recipe's backbone features (timm's, on meta tensors)."""
    return build_recipe(recipe, device="meta")[0].num_features


def test_recipes_name_registered_families_with_valid_options():
    for recipe in RECIPES.values():
        assert recipe.decoder in DECODERS, recipe.name
        decoder_config_class(recipe.decoder).from_options(recipe.decoder, recipe.decoder_options)


def test_resnet50_attention_gru_matches_published_sizes():
    recipe = get_recipe("resnet50_attention_gru")
    counts = count_parameters(recipe)
    assert recipe.published == {"total": 37 * M, "trainable": 12 * M}
    assert counts["backbone"] == RESNET50_NO_FC
    assert counts["total"] == pytest.approx(37 * M, rel=0.05)
    assert counts["trainable_frozen_backbone"] == pytest.approx(12 * M, rel=0.10)
    # The decoder by hand, from the recipe's options (GRU: no init_c, 3 gates).
    o = recipe.decoder_options
    assert o["cell"] == "gru"
    D, A, H, E = o["visual_dim"], o["attention_dim"], o["hidden_dim"], o["embed_dim"]
    C, V = feature_dim(recipe), recipe.vocab_size
    fixed = (
        C * D + D + 2 * D  # visual projection + LayerNorm
        + D * A + A + H * A + A + A + 1  # additive attention
        + D * H + H  # init_h (GRU: no init_c)
        + H + 1  # f_beta gate
        + 3 * H * (E + D) + 3 * H * H + 6 * H  # GRUCell
        + H * E + E + D * E + E  # deep output: L_h, L_z
    )
    assert counts["decoder"] == fixed + V * E + E * V + V == 12_378_654


def test_transformer_decoder_formula():
    recipe = get_recipe("effnetv2s_transformer")
    assert recipe.vocab_size == 9_721
    counts = count_parameters(recipe)
    o = recipe.decoder_options
    assert o["tie_embeddings"] and o["num_encoder_layers"] == 0 and o["positions"] == "learned"
    d, ff, L, V, C = o["d_model"], o["ff_dim"], o["num_layers"], recipe.vocab_size, feature_dim(recipe)
    attention = 4 * d * d + 4 * d  # q, kv (2d), out, with biases
    block = 3 * 2 * d + 2 * attention + (d * ff + ff + ff * d + d)
    visual = C * d + d + o["max_visual_tokens"] * d + 2 * d
    text = V * d + o["max_length"] * d + 2 * d  # tied head adds nothing
    assert counts["decoder"] == visual + text + L * block == 9_191_424
    assert 9.0 * M < counts["decoder"] < 9.4 * M
    assert counts["total"] == pytest.approx(29.4 * M, rel=0.01)


def test_show_tell_decoder_formula():
    recipe = get_recipe("resnet50_lstm")
    o = recipe.decoder_options
    assert o["num_layers"] == 1
    E, H, V, C = o["embed_dim"], o["hidden_dim"], recipe.vocab_size, feature_dim(recipe)
    lstm = 4 * H * (E + H) + 8 * H
    expected = C * E + E + 2 * E + V * E + lstm + H * V + V
    assert count_parameters(recipe)["decoder"] == expected == 9_792_016


def test_perceiver_gpt2_is_gpt2_small_plus_cross_attention():
    recipe = get_recipe("convnext_tiny_perceiver_gpt2")
    _, decoder = build_recipe(recipe, device="meta")
    gpt2_body = sum(p.numel() for p in decoder.gpt2.parameters())
    cross = sum(p.numel() for n, p in decoder.gpt2.named_parameters() if "crossattention" in n or "ln_cross" in n)
    assert cross == 12 * GPT2_CROSS_PER_LAYER_768 == recipe.known_sizes["gpt2_cross_attention"]
    assert gpt2_body - cross == GPT2_SMALL == recipe.known_sizes["gpt2_small"]
    counts = count_parameters(recipe)
    assert counts["decoder"] > GPT2_SMALL + 28 * M
    assert counts["decoder"] == 167_665_920
    assert counts["backbone"] == pytest.approx(27.8 * M, rel=0.01)
    resampler = sum(p.numel() for p in decoder.resampler.parameters())
    assert decoder.resampler.latents.shape == (64, 768)
    assert resampler == 14_229_504


def test_effnetb1_gpt2_uses_the_gpt2_vocabulary():
    recipe = get_recipe("effnetb1_gpt2")
    assert recipe.tokenizer == "gpt2" and recipe.vocab_size == GPT2_VOCAB_SIZE
    assert recipe.special_ids == {"pad_id": GPT2_SPECIAL_ID, "bos_id": GPT2_SPECIAL_ID, "eos_id": GPT2_SPECIAL_ID}
    _, decoder = build_recipe(recipe, device="meta")
    assert decoder.gpt2.config.vocab_size == GPT2_VOCAB_SIZE
    assert len(decoder.visual.blocks) == recipe.decoder_options["num_encoder_layers"] >= 2
    assert count_parameters(recipe)["decoder"] == 111_306_240


# --------------------------------------------------------------------------- params.yaml
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_params_load_through_the_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES[name]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(recipe_params(name), sort_keys=False), encoding="utf-8")

    extract = load_config("extract", params)
    assert (extract.backbone, extract.image_size, extract.out_indices) == (recipe.backbone, recipe.image_size, None)
    assert recipe.tokenizer in load_config("vocab", params).kinds
    train = load_train_config(params)
    assert train.decoder == recipe.decoder
    assert train.decoder_options == recipe.decoder_options
    assert train.tokenizer == Path(f"models/tokenizers/{recipe.tokenizer}")
    for key, value in recipe.train.items():
        assert getattr(train, key) == (Path(value) if key == "glove" else value)
    # The options as loaded build the same decoder.
    with torch.device("meta"):
        decoder = create_decoder(train.decoder, feature_dim=build_recipe(name, device="meta")[0].num_features,
                                 vocab_size=recipe.vocab_size, **recipe.special_ids, **train.decoder_options)
    assert sum(p.numel() for p in decoder.parameters()) == count_parameters(name)["decoder"]


def test_family_training_options_stay_with_their_family(tmp_path, monkeypatch):
    """GloVe belongs to show_attend_tell: another family trained from the same params file does not get it."""
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(recipe_params("resnet50_attention_gru")), encoding="utf-8")
    assert load_train_config(params).glove == Path("data/glove/glove.6B.300d.txt")
    assert load_train_config(params, {"decoder": "transformer"}).glove is None


# --------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_lists_recipes_with_counts():
    result = runner.invoke(app, ["recipes", "--counts"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in RECIPES:
        assert name in result.output
    assert "35.89M" in result.output and "195.49M" in result.output


def test_cli_lists_the_dataset_recipes_and_the_presets_without_building_models():
    """`pipeline recipes` means both kinds: the dataset recipes (params files) and the architecture presets;
    the plain listing builds no model (it answers at once), `recipes NAME` prints a dataset recipe's file."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['recipes']); print(r.output); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[-1] == "False"
    dataset_part, preset_part = out.split("architecture presets")
    assert all(f"  {name} " in dataset_part for name in ("flickr8k-cpu", "flickr8k-gpu", "photos-cpu"))
    assert all(name in preset_part for name in RECIPES)
    shown = runner.invoke(app, ["recipes", "photos-cpu"], catch_exceptions=False).output
    assert shown.startswith("# ") and "prepare:" in shown and "runs/photos/transformer" in shown


def test_cli_prints_params_yaml():
    result = runner.invoke(app, ["recipes", "resnet50_attention_gru", "--params-yaml", "--no-counts"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# Recipe resnet50_attention_gru")
    assert yaml.safe_load(result.output) == recipe_params("resnet50_attention_gru")


def test_cli_unknown_recipe_is_a_clean_error():
    result = runner.invoke(app, ["recipes", "resnet50_lstn"])
    assert result.exit_code == 2
    assert "unknown recipe 'resnet50_lstn'" in result.output and "resnet50_lstm" in result.output
    with pytest.raises(ConfigError):
        get_recipe("nope")
