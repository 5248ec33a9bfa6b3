"""What a new user meets in their first hour: warnings that say a setting cannot do what it should, training
logs a person can read, clear exits, quiet third-party libraries, commands that answer at once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TrainConfig
from tests.conftest import TINY_TRANSFORMER

runner = CliRunner()


def _train(pipe, out: Path, **kw):
    from stages import train

    base = dict(manifest=pipe.manifest, features=pipe.features, tokenizer=pipe.tokenizer(), out_dir=out,
                decoder="transformer", decoder_options=TINY_TRANSFORMER, epochs=2, batch_size=32, lr=3e-3,
                warmup_steps=0, val_max_images=4, device="cpu", amp="none", patience=0, threads=1)
    return train.run(TrainConfig(**{**base, **kw}))


def test_a_warm_up_longer_than_the_run_and_a_small_image_size_say_so(tiny_pipeline, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _train(tiny_pipeline, tmp_path / "run", warmup_steps=1000)
    lines = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert len(lines) == 1 and "longer than the run (20 steps of 2 epoch(s))" in lines[0] and "--warmup-steps" in lines[0]

    from pipeline.models.backbones import create_backbone

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_backbone("tf_efficientnet_lite0", image_size=160)
        create_backbone("tf_efficientnet_lite0", image_size=224)
    below = [r.getMessage() for r in caplog.records if "below its own" in r.getMessage()]
    assert below == ["tf_efficientnet_lite0 at 160 px, below its own 224 px (what its weights were trained at): "
                     "the features keep less detail; --image-size 224 for photos"]


def test_a_tie_keeps_the_later_epoch_with_the_lower_validation_loss(tiny_pipeline, tmp_path, monkeypatch, caplog):
    """CIDEr stays 0 for a weak model's first epochs: the best epoch is then the one whose loss is lowest, not
    the first; and the run ends with one line saying which model the bundle holds."""
    from pipeline.training import runs

    losses = iter([3.0, 2.0, 2.5])

    def constant_cider(self, decoder):
        return {"loss": next(losses), "cider": 0.0, "bleu4": 0.0}

    monkeypatch.setattr(runs.CaptionValidator, "__call__", constant_cider)
    with caplog.at_level(logging.INFO):
        summary = _train(tiny_pipeline, tmp_path / "run", epochs=3)
    assert summary["best_epoch"] == 2 and summary["val_loss"] == 2.0
    closing = [r.getMessage() for r in caplog.records if "the best by validation" in r.getMessage()]
    assert closing == [f"{tmp_path / 'run' / 'bundle'}: the model of epoch 2 of 3, the best by validation cider "
                       "(cider 0)"]


def test_numbers_in_logs_are_written_as_people_write_them():
    from pipeline.training.runs import format_metrics

    assert format_metrics({"val_bleu4": 1.035e-231, "val_cider": 0.41234, "lr": 5e-05, "samples": 16000.4,
                           "epoch": 3}) == "val_bleu4 0, val_cider 0.4123, lr 5e-05, samples 16000, epoch 3"


def test_a_loss_with_a_regulariser_says_so(tiny_pipeline, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        summary = _train(tiny_pipeline, tmp_path / "sat", decoder="show_attend_tell", epochs=1,
                         decoder_options={"embed_dim": 16, "hidden_dim": 16, "attention_dim": 16, "visual_dim": 16})
    epoch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1: "))
    assert "train_loss (caption + regulariser)" in epoch_line and "train_regulariser" in epoch_line
    history = json.loads((tmp_path / "sat" / "checkpoints" / "last" / "state.json").read_text())["state"]["history"]
    assert 0 < history[0]["train_regulariser"] < history[0]["train_loss"]
    assert summary["epochs_run"] == 1


def test_the_cli_logs_its_own_info_and_only_warnings_from_other_libraries():
    """In a fresh process (other tests run dvc's own CLI in this one, which sets dvc's logger): an earlier
    --verbose invocation in the same process leaves no trace either."""
    code = ("import logging; from typer.testing import CliRunner; from pipeline.cli import app; r = CliRunner(); "
            "assert r.invoke(app, ['--verbose', 'decoders']).exit_code == 0; "
            "print(logging.getLogger('open_clip').getEffectiveLevel()); "
            "assert r.invoke(app, ['decoders']).exit_code == 0; "
            "print(*(logging.getLogger(n).getEffectiveLevel() for n in ('pipeline', 'stages', 'open_clip', 'dvc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [int(level) for level in out] == [logging.DEBUG, logging.INFO, logging.INFO, logging.WARNING, logging.WARNING]


def test_under_torchrun_only_rank_0_logs_progress(tmp_path):
    """Every rank runs the same command: ranks other than 0 keep to warnings, so each line appears once."""
    code = ("import logging, sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "CliRunner().invoke(app, ['decoders']); print(logging.getLogger('pipeline').level)")
    levels = {}
    for rank in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RANK": rank}, capture_output=True,
                             text=True, check=True).stdout
        levels[rank] = int(out.split()[-1])
    assert levels == {"0": logging.INFO, "1": logging.WARNING}


def test_caption_with_nothing_to_caption_is_one_error_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["caption", str(tmp_path / "empty"), str(tmp_path / "missing.jpg"),
                                 "--model", str(tmp_path / "no-bundle")])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: nothing to caption: {tmp_path / 'empty'}: no images in this folder; "
                                     f"{tmp_path / 'missing.jpg'}: missing image file")


@pytest.mark.parametrize("layout", ["missing", "empty", "partly"])
def test_download_with_archives_at_hand_never_goes_online(tmp_path, layout, monkeypatch):
    """`--archives DIR` means the files are there: a missing or incomplete folder is one error line naming the
    folder and the file names looked for, and no connection is attempted."""
    import socket

    from pipeline.data import download as dl

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    archives = tmp_path / "archives"
    if layout != "missing":
        archives.mkdir()
    if layout == "partly":
        (archives / "unrelated.txt").write_text("x")
    names = [f.name for f in dl.get_dataset("flickr8k").files]
    result = runner.invoke(app, ["download", "flickr8k", "--to", str(tmp_path / "data"), "--archives", str(archives)])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert f"--archives {archives}" in line and all(name in line for name in names)
    assert ("no such folder" in line) == (layout == "missing")
    assert ("unrelated.txt" in line) == (layout == "partly")


def test_the_comparison_of_curves_gives_every_model_its_colour_and_keeps_the_legend_off_the_plots(tmp_path,
                                                                                                  monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from stages.report import plot_comparison

    colours, legends = [], []
    real_plot, real_legend = Axes.plot, Figure.legend
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: colours.append(k["color"]) or real_plot(self, *a, **k))
    monkeypatch.setattr(Axes, "legend", lambda *a, **k: pytest.fail("a legend drawn on a plot"))
    monkeypatch.setattr(Figure, "legend", lambda self, *a, **k: legends.append(k) or real_legend(self, *a, **k))
    curves = {f"model{i:02d}": {"val/cider": ([0, 1], [0.1 * i, 0.2 * i])} for i in range(12)}
    assert plot_comparison(tmp_path / "compare.png", curves, {}) is not None
    assert len(colours) == 12 and len(set(map(tuple, colours))) == 12
    assert legends and legends[0]["loc"] == "center right"
