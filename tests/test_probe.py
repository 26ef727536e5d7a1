"""pld_ds.probe: the unigram baseline of a shard folder, fill-mask answers, and the baseline in plot.png."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from shard_fixtures import make_shard_dir

from pld_ds import probe
from pld_ds.errors import UserError
from pld_ds.plot import run_figure


def masked(path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["masked_lm_ids"][:][f["masked_lm_positions"][:] > 0]


def test_unigram_baseline_by_hand(tmp_path):
    data = make_shard_dir(tmp_path / "data", shard_sizes=(40, 40), seq_len=32, validation=20)
    train = np.concatenate([masked(p) for p in sorted((data / "train").glob("*.hdf5"))])
    valid = masked(next((data / "validation").glob("*.hdf5")))
    size = max(train.max(), valid.max()) + 1
    counts = {i: 1.0 for i in range(size)}  # add-one over the ids up to the largest seen
    for token in train:
        counts[int(token)] += 1
    total = sum(counts.values())
    expected = -np.mean([np.log(counts[int(t)] / total) for t in valid])
    assert probe.unigram_baseline(data) == pytest.approx(expected)
    # random ids: the frequencies carry little, so the baseline is near log(size), well above 0
    assert 0.8 * np.log(size) < expected < 1.2 * np.log(size)


def test_unigram_baseline_needs_both_splits(tmp_path):
    data = make_shard_dir(tmp_path / "data", shard_sizes=(8,), seq_len=16)
    with pytest.raises(UserError, match="validation"):
        probe.unigram_baseline(data)


def test_plot_draws_the_baseline_and_the_title():
    run = {"train/loss": [(1, 9.0), (2, 8.0)], "eval/mlm_loss": [(2, 7.5)], "train/pld_theta": [(1, 1.0), (2, 0.9)]}
    fig = run_figure(run, "quickstart: narrow12", baseline=7.25)
    loss_ax = fig.axes[0]
    line = next(ln for ln in loss_ax.lines if ln.get_label().startswith("unigram baseline"))
    assert line.get_label() == "unigram baseline (7.25)" and set(line.get_ydata()) == {7.25}
    assert loss_ax.get_title() == "quickstart: narrow12"
    assert not any(ln.get_label().startswith("unigram") for ln in run_figure(run).axes[0].lines)


def test_plot_title_names_the_run(tmp_path):
    run = tmp_path / "quickstart" / "run"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text('{"args": {"model": "narrow12", "max_steps": 1500}}')
    assert probe.run_title(run, tmp_path / "quickstart" / "shards") == \
        "quickstart/run: narrow12, 1500 steps on quickstart/shards"
