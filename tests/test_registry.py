"""The decoder registry is the one list of families; the files that cannot be derived from it
(``dvc.yaml``'s ``train``/``evaluate`` stages, ``params.yaml``'s ``decoders`` section) must list
exactly the registered families, so a new family cannot be forgotten silently.

Only reads the repository's YAML (no stage runs)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.models.decoders import DECODERS, decoder_config_class
from tests.conftest import REPO


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def train_runs() -> dict[str, dict]:
    """dvc.yaml's ``train.foreach``: run name (models/<name>) -> its item (``decoder``, ``tokenizer``, ``flags``)."""
    foreach = load("dvc.yaml")["stages"]["train"]["foreach"]
    assert isinstance(foreach, dict), "train.foreach maps run names to {decoder, tokenizer, flags}"
    return foreach


def test_dvc_trains_every_registered_family_under_its_own_name(train_runs):
    unknown = {key: item["decoder"] for key, item in train_runs.items() if item["decoder"] not in DECODERS}
    assert not unknown, f"dvc.yaml train runs of unregistered families: {unknown}"
    missing = [family for family in DECODERS if train_runs.get(family, {}).get("decoder") != family]
    assert not missing, f"registered families without a dvc.yaml train entry `<family>: {{decoder: <family>}}`: {missing}"


def test_other_dvc_train_runs_are_variants_of_a_family(train_runs):
    """Runs beyond one per family (the image-blind control, the recovery experiment's cells) re-train an
    existing family with extra flags or on other training data."""
    for key, item in train_runs.items():
        if key in DECODERS:
            continue
        assert key.startswith(f"{item['decoder']}_"), f"{key}: a variant is named <family>_<what>"
        family_run = train_runs[item["decoder"]]
        differs = str(item.get("flags") or "").strip() or item.get("data") != family_run.get("data")
        assert differs, f"{key}: a variant differs from {item['decoder']} by its flags or its training data"


def test_dvc_evaluates_every_trained_run(train_runs):
    assert list(load("dvc.yaml")["stages"]["evaluate"]["foreach"]) == list(train_runs)


def test_params_have_a_decoders_section_per_registered_family():
    sections = load("params.yaml")["decoders"]
    assert set(sections) == set(DECODERS), (
        f"params.yaml decoders: missing {sorted(set(DECODERS) - set(sections))}, "
        f"unregistered {sorted(set(sections) - set(DECODERS))}")
    for family, section in sections.items():
        decoder_config_class(family).from_options(family, (section or {}).get("options") or {})
