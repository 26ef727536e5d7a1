"""pld-plot: reading scalars back from TensorBoard events (merged across resumes), PNGs, one-line errors."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pld_helpers import REPO, child_env, csv_segments
from shard_fixtures import make_shard_dir
from torch.utils.tensorboard import SummaryWriter

from pld_ds import plot
from pld_ds.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_TAGS = ("train/loss", "train/mlm_loss", "train/pld_theta", "train/expected_depth")


def value(tag: str, step: int, run: int) -> float:
    """Distinct per tag, step and run, and exact in float32 (what the event files store)."""
    return TRAIN_TAGS.index(tag) + step / 64 + run / 4 if tag in TRAIN_TAGS else 10 + step / 8 + run


def write_events(log_dir: Path, steps: range, run: int, eval_steps: tuple[int, ...] = ()) -> None:
    writer = SummaryWriter(log_dir=str(log_dir))
    for step in steps:
        for tag in TRAIN_TAGS:
            writer.add_scalar(tag, value(tag, step, run), step)
        if step in eval_steps:
            writer.add_scalar("eval/mlm_loss", value("eval/mlm_loss", step, run), step)
    writer.close()


def expected(tag: str, runs: list[tuple[range, int]]) -> list[tuple[int, float]]:
    points: dict[int, float] = {}
    for steps, run in runs:
        points = {s: v for s, v in points.items() if s < steps.start}
        points.update({s: value(tag, s, run) for s in steps})
    return sorted(points.items())


@pytest.fixture
def resumed_run(tmp_path: Path) -> Path:
    """Steps 1-10; resumed from a checkpoint at step 6, it logged 7-8 again and stopped there."""
    run = tmp_path / "run"
    write_events(run / "tensorboard" / "job", range(1, 11), run=0, eval_steps=(5, 10))
    write_events(run / "tensorboard" / "job", range(7, 9), run=1, eval_steps=(8,))
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


# -- reading ---------------------------------------------------------------------------------------


def test_read_scalars_merges_a_resumed_run(resumed_run: Path):
    assert len(plot.event_files(resumed_run)) == 2
    scalars = plot.read_scalars(resumed_run)
    assert set(scalars) == {*TRAIN_TAGS, "eval/mlm_loss"}
    for tag in TRAIN_TAGS:
        # 1-6 from the first process, 7-8 re-logged by the second; 9-10 belonged to the abandoned timeline
        assert scalars[tag] == expected(tag, [(range(1, 11), 0), (range(7, 9), 1)]), tag
    # the resumed process's first evaluation was at 8: the old one at 5 stays, the one at 10 goes
    assert scalars["eval/mlm_loss"] == [(5, value("eval/mlm_loss", 5, 0)), (8, value("eval/mlm_loss", 8, 1))]


def test_read_scalars_later_record_of_a_step_wins_and_job_folders_merge(tmp_path: Path):
    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "a"))
    writer.add_scalar("train/loss", 3.0, 1)
    writer.add_scalar("train/loss", 2.5, 2)
    writer.add_scalar("train/loss", 2.25, 2)
    writer.close()
    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "b"))
    writer.add_scalar("eval/mlm_accuracy", 0.5, 2)
    writer.close()
    assert plot.read_scalars(tmp_path) == {"train/loss": [(1, 3.0), (2, 2.25)], "eval/mlm_accuracy": [(2, 0.5)]}


def test_read_scalars_takes_tensor_scalars_and_skips_other_summaries(tmp_path: Path):
    """TF2-style writers store a scalar as a 0-d tensor; text summaries are not scalars."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    writer = EventFileWriter(str(tmp_path))
    values = [summary_pb2.Summary.Value(tag="train/loss", tensor=tensor_util.make_tensor_proto(np.float32(1.5))),
              summary_pb2.Summary.Value(tag="notes", tensor=tensor_util.make_tensor_proto(np.array(b"hello"))),
              summary_pb2.Summary.Value(tag="hist", tensor=tensor_util.make_tensor_proto(np.ones(3, np.float32)))]
    writer.add_event(event_pb2.Event(step=3, wall_time=1.0, summary=summary_pb2.Summary(value=values)))
    writer.close()
    assert plot.read_scalars(tmp_path) == {"train/loss": [(3, 1.5)]}


def test_read_scalars_survives_a_file_cut_short(resumed_run: Path):
    newest = max(plot.event_files(resumed_run), key=lambda p: p.stat().st_mtime_ns)
    whole = plot.read_scalars(resumed_run)
    newest.write_bytes(newest.read_bytes()[:-5])  # a run killed while writing its last record
    cut = plot.read_scalars(resumed_run)
    assert cut["train/loss"] == whole["train/loss"]
    # the lost record was the resumed process's evaluation at step 8, so nothing replaces the old one at 10
    assert cut["eval/mlm_loss"] == [(5, value("eval/mlm_loss", 5, 0)), (10, value("eval/mlm_loss", 10, 0))]


def test_read_scalars_errors(tmp_path: Path):
    with pytest.raises(UserError, match="no such run folder"):
        plot.read_scalars(tmp_path / "missing")
    with pytest.raises(UserError, match="no TensorBoard event files"):
        plot.read_scalars(tmp_path)
    SummaryWriter(log_dir=str(tmp_path / "tb")).close()  # only the file header, no scalar
    with pytest.raises(UserError, match="no scalars"):
        plot.read_scalars(tmp_path)


# -- plotting --------------------------------------------------------------------------------------


def series(ax) -> dict[str, list[tuple[float, float]]]:
    """What an axis shows: {legend label: [(x, y), ...]} of each line drawn on it."""
    return {line.get_label(): [(float(x), float(y)) for x, y in zip(*line.get_data(), strict=True)]
            for line in ax.get_lines()}


def test_plot_run_draws_the_merged_series(resumed_run: Path, monkeypatch):
    """What goes into the PNG, through the command line: the losses, evaluations, θ and depth of the run as
    merged across its resume, each on its own axis, and nothing else."""
    drawn = []
    monkeypatch.setattr(plot, "_save", lambda fig, out: drawn.append(fig) or Path(out))
    plot.main([str(resumed_run)])
    (fig,) = drawn
    loss_ax, theta_ax, depth_ax = fig.axes
    merged = [(range(1, 11), 0), (range(7, 9), 1)]
    assert series(loss_ax) == {"train/loss": expected("train/loss", merged),
                               "train/mlm_loss": expected("train/mlm_loss", merged),
                               "eval/mlm_loss": [(5, value("eval/mlm_loss", 5, 0)), (8, value("eval/mlm_loss", 8, 1))]}
    assert [line.get_linestyle() for line in loss_ax.get_lines()] == ["-", "-", "None"]  # evaluations are markers
    assert series(theta_ax) == {"θ (keep prob. of the last layer)": expected("train/pld_theta", merged)}
    assert theta_ax.get_ylim() == (0, 1.05)
    assert series(depth_ax) == {"expected depth": expected("train/expected_depth", merged)}
    assert loss_ax.get_title() == resumed_run.name and theta_ax.get_xlabel() == "optimizer step"


def test_plot_run_without_pld_or_eval_draws_only_what_was_logged():
    fig = plot.run_figure({"train/loss": [(1, 5.0), (2, 4.0)], "train/lr": [(1, 0.1), (2, 0.2)]})
    assert [series(ax) for ax in fig.axes] == [{"train/loss": [(1, 5.0), (2, 4.0)]}, {}]


def test_plot_run_writes_a_png(resumed_run: Path, tmp_path: Path):
    out = plot.plot_run(resumed_run, tmp_path / "figs" / "run.png")
    assert out == tmp_path / "figs" / "run.png"
    assert png_size(out) == (800, 700)
    assert [p.name for p in out.parent.iterdir()] == ["run.png"], "no temporary file left behind"


def test_plot_run_from_scalars_without_pld_or_eval(tmp_path: Path):
    scalars = {"train/loss": [(1, 5.0), (2, 4.0)]}
    assert png_size(plot.plot_run(scalars, tmp_path / "a.png")) == (800, 700)
    with pytest.raises(UserError, match="nothing to plot"):
        plot.plot_run({"train/lr": [(1, 0.1)]}, tmp_path / "b.png")
    with pytest.raises(UserError, match="expected a .png"):
        plot.plot_run(scalars, tmp_path / "c.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_failed_write_keeps_the_old_png(tmp_path: Path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "plot.png"
    out.write_bytes(b"old")

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_MAGIC)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(UserError, match="plot.png: cannot write the plot: No space left"):
        plot.plot_run({"train/loss": [(1, 5.0)]}, out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_plot_runs_overlays_runs(resumed_run: Path, tmp_path: Path):
    pld_run = plot.read_scalars(resumed_run)
    baseline = {"train/mlm_loss": [(1, 6.0), (8, 5.0)]}  # no θ, no evaluation: left out of those panels
    fig = plot.runs_figure({"pld": pld_run, "baseline": baseline})
    assert [ax.get_ylabel() for ax in fig.axes] == list(plot.COMPARE_TAGS)
    mlm, evals, theta = (series(ax) for ax in fig.axes)
    assert mlm == {"pld": pld_run["train/mlm_loss"], "baseline": baseline["train/mlm_loss"]}
    assert evals == {"pld": pld_run["eval/mlm_loss"]} and theta == {"pld": pld_run["train/pld_theta"]}
    out = plot.plot_runs({"pld": pld_run, "baseline": baseline}, tmp_path / "compare.png")
    assert png_size(out) == (800, 900)
    hours = {tag: [(s / 3600, v) for s, v in points] for tag, points in pld_run.items()}
    out = plot.plot_runs({"pld": hours}, tmp_path / "hours.png", tags=["train/loss"], x_label="hours")
    assert png_size(out) == (800, 300)
    with pytest.raises(UserError, match="nothing to compare"):
        plot.plot_runs({}, tmp_path / "none.png")


# -- command line ----------------------------------------------------------------------------------


def test_cli_default_and_explicit_output(resumed_run: Path, tmp_path: Path, capsys):
    plot.main([str(resumed_run)])
    assert capsys.readouterr().out.strip() == str(resumed_run / "plot.png")
    assert png_size(resumed_run / "plot.png") == (800, 700)
    plot.main([str(resumed_run), "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("case, fragment", [("missing", "no such run folder"), ("empty", "no TensorBoard event files"),
                                            ("jpg", "expected a .png file name"),
                                            ("only_lr", "only_lr: nothing to plot: none of train/loss")])
def test_cli_errors_are_one_line(case: str, fragment: str, resumed_run: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    writer = SummaryWriter(log_dir=str(tmp_path / "only_lr" / "tensorboard"))
    writer.add_scalar("train/lr", 0.1, 1)
    writer.close()
    argv = {"missing": [str(tmp_path / "missing")], "empty": [str(tmp_path / "empty")],
            "jpg": [str(resumed_run), "--out", str(tmp_path / "x.jpg")], "only_lr": [str(tmp_path / "only_lr")]}[case]
    with pytest.raises(SystemExit) as exit_info:
        plot.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pld-plot: error: ") and fragment in err and err.count("\n") == 1
    with pytest.raises(UserError):
        plot.main([*argv, "--debug"])


def test_python_dash_m(resumed_run: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "pld_ds.plot", str(resumed_run), "--out", str(tmp_path / "m.png")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "m.png") == (800, 700)
    proc = subprocess.run([sys.executable, "-m", "pld_ds.plot", str(tmp_path / "missing")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"pld-plot: error: {tmp_path / 'missing'}: no such run folder"


# -- a real run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_events_of_a_resumed_pretrain_run(tmp_path: Path):
    """pld-pretrain's own events, resumed from step 2 after reaching 4: TensorBoard agrees with the CSVs."""
    data = make_shard_dir(tmp_path / "data")
    out = tmp_path / "run"
    config = REPO / "ds_configs" / "tiny_cpu_pld.json"
    common = [sys.executable, "-m", "pld_ds.pretrain", "--deepspeed_config", str(config), "--data", str(data),
              "--output", str(out), "--model", "tiny", "--log-interval", "1"]
    for extra in (["--max-steps", "4", "--save-interval", "2"],
                  ["--max-steps", "5", "--resume", str(out / "checkpoints" / "global_step2")]):
        proc = subprocess.run(common + extra, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = plot.read_scalars(out)
    assert len(plot.event_files(out)) == 2
    for tag in ("train/loss", "train/pld_theta", "train/samples_per_sec"):
        first, resumed = csv_segments(out / "csv" / "run" / f"{tag.replace('/', '_')}.csv")
        assert [s for s, _ in first] == [1, 2, 3, 4] and [s for s, _ in resumed] == [3, 4, 5]
        want = first[:2] + resumed  # samples_per_sec is timed, so steps 3-4 differ between the processes
        assert [s for s, _ in scalars[tag]] == [s for s, _ in want]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert png_size(plot.plot_run(out, out / "plot.png")) == (800, 700)
    loss_ax, theta_ax, _ = plot.run_figure(scalars).axes
    assert series(loss_ax)["train/loss"] == [(float(s), v) for s, v in scalars["train/loss"]]
    assert [s for s, _ in series(theta_ax)["θ (keep prob. of the last layer)"]] == [1, 2, 3, 4, 5]
