"""Params loading: defaults < params file section < command line; every mistake names key and file."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (
    SECTIONS,
    CocoSource,
    ConfigError,
    ExtractConfig,
    PrepareConfig,
    SyntheticSource,
    load_config,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder: the repository's own params.yaml must not leak into these tests."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def captured(monkeypatch):
    """Stand-ins for the stage modules: a CLI run records its resolved config instead of running the stage."""
    seen: dict[str, object] = {}
    for name in ("prepare", "extract", "vocab"):
        fake = types.ModuleType(f"stages.{name}")
        fake.run = lambda cfg, _name=name: seen.__setitem__(_name, cfg)
        monkeypatch.setitem(sys.modules, f"stages.{name}", fake)
    return seen


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


# --------------------------------------------------------------------------- defaults and precedence
def test_defaults_without_params_file(tmp_path):
    assert load_config("prepare", None) == PrepareConfig()
    assert load_config("extract", None) == ExtractConfig()
    # The default params.yaml is optional: absent from the working folder -> defaults.
    assert not (tmp_path / "params.yaml").exists()
    cfg = load_config("extract")
    assert cfg == ExtractConfig()
    assert cfg.backbone == "tf_efficientnet_lite0" and cfg.num_shards == 4 and cfg.weights is None
    prep = load_config("prepare")
    assert prep.sources == [SyntheticSource()]
    assert (prep.val_fraction, prep.test_fraction, prep.check_images) == (0.1, 0.1, "full")


def test_section_values_override_defaults(tmp_path):
    p = write(tmp_path / "p.yaml", "extract:\n  backbone: resnet18\n  num_shards: 2\nprepare:\n  seed: 7\n")
    ext = load_config("extract", p)
    assert ext.backbone == "resnet18" and ext.num_shards == 2
    assert ext.batch_size == ExtractConfig().batch_size  # untouched keys keep their default
    prep = load_config("prepare", p)
    assert prep.seed == 7 and prep.out_dir == Path("data/prepared")


def test_params_yaml_in_working_folder_is_read_by_default(tmp_path):
    write(tmp_path / "params.yaml", "extract:\n  batch_size: 3\n")
    assert load_config("extract").batch_size == 3


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config("extract", write(tmp_path / "empty.yaml", "")) == ExtractConfig()
    assert load_config("extract", write(tmp_path / "null.yaml", "extract:\n")) == ExtractConfig()
    # A file without the section: defaults for that section.
    assert load_config("prepare", write(tmp_path / "other.yaml", "extract:\n  num_shards: 9\n")) == PrepareConfig()


def test_overrides_beat_the_file(tmp_path):
    p = write(tmp_path / "p.yaml", "extract:\n  num_shards: 2\n  batch_size: 8\n  weights: w.safetensors\n")
    cfg = load_config("extract", p, {"num_shards": 5, "weights": None})
    assert cfg.num_shards == 5  # override
    assert cfg.batch_size == 8  # from the file
    assert cfg.weights is None  # an override of None clears the file's value
    with pytest.raises(ConfigError, match=r"command line.*num_shards"):
        load_config("extract", p, {"num_shards": 0})


def test_nested_sources_from_file(tmp_path):
    p = write(tmp_path / "p.yaml", "prepare:\n  sources:\n    - kind: coco\n      annotations: a.json\n      images: imgs\n"
                                   "    - kind: synthetic\n      num_images: 5\n")
    cfg = load_config("prepare", p)
    assert isinstance(cfg.sources[0], CocoSource) and cfg.sources[0].annotations == Path("a.json")
    assert cfg.sources[0].split == "auto"
    assert isinstance(cfg.sources[1], SyntheticSource) and cfg.sources[1].num_images == 5


# --------------------------------------------------------------------------- errors
def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path / "p.yaml", "extract:\n  backbon: x\n")
    with pytest.raises(ConfigError) as e:
        load_config("extract", p)
    msg = str(e.value)
    assert str(p) in msg and "'backbon'" in msg and "did you mean 'backbone'" in msg


def test_unknown_top_level_section_names_file(tmp_path):
    p = write(tmp_path / "p.yaml", "extrct:\n  num_shards: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config("extract", p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "unknown section 'extrct'" in msg and "did you mean 'extract'" in msg
    # Even when loading another section of the same file.
    with pytest.raises(ConfigError, match="extrct"):
        load_config("prepare", p)


def test_invalid_yaml_reports_file_and_line(tmp_path):
    p = write(tmp_path / "p.yaml", "extract:\n  num_shards: 2\n   bad: [\n")
    with pytest.raises(ConfigError) as e:
        load_config("extract", p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:") and "not valid YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    p = write(tmp_path / "p.yaml", "- extract\n- prepare\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("extract", p)


def test_wrong_type_names_the_key(tmp_path):
    p = write(tmp_path / "p.yaml", 'extract:\n  num_shards: "abc"\n')
    with pytest.raises(ConfigError) as e:
        load_config("extract", p)
    msg = str(e.value)
    assert str(p) in msg and "num_shards" in msg and "'abc'" in msg
    # Out of range and not one of the choices are errors too.
    with pytest.raises(ConfigError, match="num_shards"):
        load_config("extract", write(tmp_path / "z.yaml", "extract:\n  num_shards: 0\n"))
    with pytest.raises(ConfigError, match="check_images"):
        load_config("prepare", write(tmp_path / "c.yaml", "prepare:\n  check_images: fast\n"))


def test_nested_source_unknown_key_is_an_error(tmp_path):
    p = write(tmp_path / "p.yaml", "prepare:\n  sources:\n    - kind: coco\n      annotation: a.json\n      images: imgs\n")
    with pytest.raises(ConfigError) as e:
        load_config("prepare", p)
    msg = str(e.value)
    assert str(p) in msg and "unknown key" in msg and "annotation'" in msg
    assert "annotations" in msg  # and the required key it probably meant is reported missing


def test_fractions_must_leave_a_train_split(tmp_path):
    p = write(tmp_path / "p.yaml", "prepare:\n  val_fraction: 0.5\n  test_fraction: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config("prepare", p)
    assert str(e.value) == f"{p} [prepare]: Value error, val_fraction + test_fraction must be below 1"
    ok = write(tmp_path / "ok.yaml", "prepare:\n  val_fraction: 0.5\n  test_fraction: 0.2\n")
    with pytest.raises(ConfigError, match="command line: .*below 1"):
        load_config("prepare", ok, {"test_fraction": 0.5})


def test_unknown_source_kind_is_an_error(tmp_path):
    p = write(tmp_path / "p.yaml", "prepare:\n  sources:\n    - kind: imagenet\n")
    with pytest.raises(ConfigError, match="sources"):
        load_config("prepare", p)


def test_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml.*not found"):
        load_config("extract", tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- the CLI
def test_prepare_help_lists_options():
    result = invoke("prepare", "--help")
    assert result.exit_code == 0, result.output
    for flag in ("--sources", "--out-dir", "--seed", "--val-fraction", "--test-fraction", "--check-images",
                 "--workers", "--params"):
        assert flag in result.output, flag
    result = invoke("extract", "--help")
    assert result.exit_code == 0
    for flag in ("--backbone", "--num-shards", "--weights", "--image-size", "--out-indices", "--pretrained"):
        assert flag in result.output, flag


def test_cli_overrides_beat_the_file(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "extract:\n  backbone: resnet18\n  num_shards: 3\n  batch_size: 7\n")
    result = invoke("extract", "--params", str(p), "--num-shards", "5", "--no-amp", "--pretrained")
    assert result.exit_code == 0, result.output
    cfg = captured["extract"]
    assert cfg.num_shards == 5  # command line
    assert cfg.backbone == "resnet18" and cfg.batch_size == 7  # file
    assert cfg.amp is False and cfg.pretrained is True
    assert cfg.device == "auto"  # default


def test_cli_without_params_uses_defaults(captured):
    result = invoke("prepare", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert captured["prepare"] == PrepareConfig(seed=3)


def test_cli_json_sources_override(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "prepare:\n  sources:\n    - kind: synthetic\n      num_images: 9\n")
    result = invoke("prepare", "--params", str(p), "--sources",
                    '[{"kind": "table", "path": "t.csv"}, {"kind": "synthetic", "num_images": 2}]')
    assert result.exit_code == 0, result.output
    sources = captured["prepare"].sources
    assert [s.kind for s in sources] == ["table", "synthetic"] and sources[1].num_images == 2


def test_cli_unknown_key_in_params_file(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "extract:\n  backbon: x\n")
    result = invoke("extract", "--params", str(p))
    assert_clean_error(result, "'backbon'", str(p), "backbone")
    assert "extract" not in captured  # the stage never ran


def test_cli_unknown_section(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "prepar:\n  seed: 1\n")
    assert_clean_error(invoke("prepare", "--params", str(p)), str(p), "'prepar'", "prepare")


def test_cli_invalid_yaml(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "extract:\n  num_shards: 2\n   bad: [\n")
    assert_clean_error(invoke("extract", "--params", str(p)), f"{p}:3:")


def test_cli_wrong_type_in_file(tmp_path, captured):
    p = write(tmp_path / "p.yaml", 'extract:\n  num_shards: "abc"\n')
    assert_clean_error(invoke("extract", "--params", str(p)), "num_shards", str(p))


def test_cli_wrong_type_on_command_line(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "{}\n")
    assert_clean_error(invoke("extract", "--params", str(p), "--num-shards", "abc"), "num-shards")
    assert_clean_error(invoke("extract", "--params", str(p), "--image-size", "abc"), "image_size")
    assert_clean_error(invoke("prepare", "--params", str(p), "--check-images", "fast"), "check_images", "command line")
    assert_clean_error(invoke("prepare", "--params", str(p), "--sources", "[{not json"), "sources", "JSON")
    assert captured == {}


def test_cli_nested_source_unknown_key(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "prepare:\n  sources:\n    - kind: coco\n      annotation: a.json\n      images: imgs\n")
    assert_clean_error(invoke("prepare", "--params", str(p)), "annotation'", str(p))
    result = invoke("prepare", "--sources", '[{"kind": "coco", "annotation": "a.json", "images": "i"}]')
    assert_clean_error(result, "annotation'", "command line")


def test_cli_missing_params_file(tmp_path, captured):
    result = invoke("extract", "--params", "missing.yaml")
    assert_clean_error(result, "missing.yaml", "not found")
    assert captured == {}


def test_cli_none_clears_optional_options(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "extract:\n  weights: w.safetensors\n  image_size: 224\n  crop_pct: 0.9\n"
                                   "  out_indices: [2, 3]\n  shard_index: 1\n")
    assert invoke("extract", "--params", str(p)).exit_code == 0
    cfg = captured["extract"]
    assert (cfg.weights, cfg.image_size, cfg.crop_pct, cfg.out_indices, cfg.shard_index) == (
        Path("w.safetensors"), 224, 0.9, [2, 3], 1)

    result = invoke("extract", "--params", str(p), "--weights", "none", "--image-size", "None", "--crop-pct", "none",
                    "--out-indices", "none", "--shard-index", "null")
    assert result.exit_code == 0, result.output
    cfg = captured["extract"]
    assert (cfg.weights, cfg.image_size, cfg.crop_pct, cfg.out_indices, cfg.shard_index) == (None,) * 5
    assert cfg.backbone == "tf_efficientnet_lite0"


def test_cli_a_list_of_choices_is_given_by_repeating_the_option(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "{}\n")
    assert invoke("vocab", "--params", str(p), "--kinds", "word", "--kinds", "bpe").exit_code == 0
    assert captured["vocab"].kinds == ["word", "bpe"]
    assert invoke("vocab", "--params", str(p), "--kinds", '["gpt2", "word"]').exit_code == 0  # the JSON form too
    assert captured["vocab"].kinds == ["gpt2", "word"]
    # a list of paths too (typer hands it over as a Path)
    assert invoke("extract", "--params", str(p), "--extra-manifests", '["a/m.jsonl", "b/m.jsonl"]').exit_code == 0
    assert captured["extract"].extra_manifests == [Path("a/m.jsonl"), Path("b/m.jsonl")]
    assert "--kinds [word|bpe|gpt2]" in invoke("vocab", "--help").output
    assert_clean_error(invoke("vocab", "--params", str(p), "--kinds", "words"), "kinds", "word", "bpe", "gpt2")


def test_cli_optional_numbers_still_parse(tmp_path, captured):
    p = write(tmp_path / "p.yaml", "{}\n")
    result = invoke("extract", "--params", str(p), "--image-size", "96", "--crop-pct", "0.5",
                    "--out-indices", "1", "--out-indices", "2", "--shard-index", "0", "--weights", "x.pt")
    assert result.exit_code == 0, result.output
    cfg = captured["extract"]
    assert (cfg.image_size, cfg.crop_pct, cfg.out_indices, cfg.shard_index, cfg.weights) == (96, 0.5, [1, 2], 0, Path("x.pt"))
    # Validation still applies to the converted values.
    assert_clean_error(invoke("extract", "--params", str(p), "--image-size", "8"), "image_size")


def test_params_command_round_trips(tmp_path):
    result = invoke("params", "--defaults")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert list(data) == list(SECTIONS)
    p = write(tmp_path / "defaults.yaml", result.output)
    for section, model in SECTIONS.items():
        assert load_config(section, p) == model(), section


def test_params_command_shows_the_values_a_run_here_uses(tmp_path, monkeypatch):
    """Without --defaults: ./params.yaml's value where it sets one, marked, with the built-in default beside it."""
    from pipeline.config import _read_params_once

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "params.yaml", yaml.safe_dump({"train": {"epochs": 4, "seed": 0}}))
    _read_params_once.cache_clear()
    try:
        result = invoke("params", "train")
        lines = result.output.splitlines()
        assert "  epochs: 4  # params.yaml (default: 6)" in lines
        assert "  seed: 0  # params.yaml" in lines  # set, to its default value
        assert "  lr: 0.0004" in lines  # not set: the built-in default, unmarked
        assert load_config("train", write(tmp_path / "t.yaml", result.output)) == load_config("train", tmp_path /
                                                                                              "params.yaml")
        help_text = invoke("train", "--help").output
        assert "[params.yaml: 4]" in " ".join(help_text.split())
    finally:
        _read_params_once.cache_clear()


def test_params_command_one_section(tmp_path):
    result = invoke("params", "--defaults", "extract")
    assert result.exit_code == 0
    assert list(yaml.safe_load(result.output)) == ["extract"]
    assert load_config("extract", write(tmp_path / "e.yaml", result.output)) == ExtractConfig()
    assert_clean_error(invoke("params", "extrct"), "unknown section 'extrct'")
