"""Plot a run's loss, θ and expected depth from its TensorBoard events.

    pld-plot RUN_DIR [--out FILE.png]          (also: python -m pld_ds.plot RUN_DIR)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pld_ds.errors import ArgumentParser, UserError, one_line_errors

Points = list[tuple[int, float]]
Scalars = dict[str, Points]
EVENT_GLOB = "events.out.tfevents.*"
LOSS_TAGS = ("train/loss", "train/mlm_loss")
EVAL_LOSS_TAG = "eval/mlm_loss"
THETA_TAG = "train/pld_theta"
DEPTH_TAG = "train/expected_depth"
COMPARE_TAGS = ("train/mlm_loss", "eval/mlm_loss", "train/pld_theta")
RunOrScalars = str | Path | Mapping[str, Sequence[tuple[int, float]]]


def event_files(run_dir: str | Path) -> list[Path]:
    """Every TensorBoard event file under the run folder (any job name, any depth)."""
    return sorted(p for p in Path(run_dir).rglob(EVENT_GLOB) if p.is_file())


def _scalar_value(value: Any) -> float | None:
    """The number in one summary value: torch's SummaryWriter writes simple_value, TF2 writers a 0-d tensor."""
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
        from tensorboard.util import tensor_util

        array = tensor_util.make_ndarray(value.tensor)
        if array.dtype.kind in "fiub":
            return float(array)
    return None


def _read_file(path: Path) -> tuple[float, dict[str, dict[int, float]]]:
    """(wall time of the file's first event, {tag: {step: value}}); a later record for a step wins."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    started = None
    tags: dict[str, dict[int, float]] = {}
    # A file cut short by a killed run ends at its last complete record; the loader stops there.
    for event in LegacyEventFileLoader(str(path)).Load():
        if started is None:  # the writer's file_version record, written when the file was opened
            started = event.wall_time
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            number = _scalar_value(value)
            if number is not None:
                tags.setdefault(value.tag, {})[int(event.step)] = number
    return (float("inf") if started is None else started), tags


def merge(timelines: Iterable[Mapping[str, Mapping[int, float]]]) -> Scalars:
    """Merge per-file scalars, oldest file first.

    A resumed run starts a new event file and logs again every step after its checkpoint, so when a
    newer file has a tag from step s on, the older points of that tag at steps >= s belong to the
    abandoned timeline and go (what TensorBoard does with out-of-order steps, also per tag).
    """
    merged: dict[str, dict[int, float]] = {}
    for timeline in timelines:
        for tag, points in timeline.items():
            if not points:
                continue
            first = min(points)
            kept = {s: v for s, v in merged.get(tag, {}).items() if s < first}
            kept.update(points)
            merged[tag] = kept
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def read_scalars(run_dir: str | Path) -> Scalars:
    """{tag: [(step, value), ...] sorted by step} from every event file under `run_dir`, merged across
    resumed runs and job folders (see `merge`). Raises UserError if there is no folder or no scalar."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such run folder")
    files = event_files(root)
    if not files:
        raise UserError(f"{root}: no TensorBoard event files ({EVENT_GLOB}) under it; "
                        "was the DeepSpeed config's tensorboard block enabled?")
    # Oldest file first, by its first event's time (file names carry whole seconds only).
    read = sorted(((*_read_file(path), path.name) for path in files), key=lambda r: (r[0], r[2]))
    scalars = merge(tags for _started, tags, _name in read)
    if not scalars:
        raise UserError(f"{root}: {len(files)} event file(s) but no scalars in them")
    return scalars


def _figure(rows: int, height: float):
    # A bare Figure renders with the Agg canvas: no pyplot, no display, no global figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]


def _save(fig, out_png: str | Path) -> Path:
    """Write the PNG under a temporary name and rename it, so no reader ever sees half a file."""
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: expected a .png file name")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"{out}: cannot write the plot: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _xy(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run: RunOrScalars, out_png: str | Path, title: str | None = None, baseline: float | None = None) -> Path:
    """Loss against step (train lines, evaluation markers) above θ and expected depth (twin axis), as a PNG.
    `baseline`: a reference loss drawn as a horizontal line (e.g. pld_ds.probe's unigram baseline)."""
    if isinstance(run, (str, Path)):
        title = Path(run).resolve().name if title is None else title
        folder, run = run, read_scalars(run)
        try:
            fig = run_figure(run, title, baseline)
        except UserError as err:  # say which run folder had nothing to plot
            raise UserError(f"{folder}: {err}") from None
        return _save(fig, out_png)
    return _save(run_figure(run, title, baseline), out_png)


def run_figure(run: Mapping[str, Sequence[tuple[int, float]]], title: str | None = None,
               baseline: float | None = None):
    """plot_run's matplotlib Figure: axes[0] the losses, axes[1] θ, axes[2] (a twin of axes[1]) expected depth."""
    from matplotlib.ticker import MaxNLocator

    wanted = (*LOSS_TAGS, EVAL_LOSS_TAG, THETA_TAG, DEPTH_TAG)
    if not any(run.get(tag) for tag in wanted):
        raise UserError(f"nothing to plot: none of {', '.join(wanted)} was logged")
    fig, (loss_ax, theta_ax) = _figure(2, 3.5)
    for tag in LOSS_TAGS:
        if run.get(tag):
            loss_ax.plot(*_xy(run[tag]), label=tag, linewidth=1)
    if run.get(EVAL_LOSS_TAG):
        loss_ax.plot(*_xy(run[EVAL_LOSS_TAG]), "o", label=EVAL_LOSS_TAG, markersize=5)
    if baseline is not None:
        loss_ax.axhline(baseline, color="gray", linestyle=":", label=f"unigram baseline ({baseline:.2f})")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    if loss_ax.lines:
        loss_ax.legend(loc="upper right")
    if title:
        loss_ax.set_title(title)

    handles = []
    if run.get(THETA_TAG):
        handles += theta_ax.plot(*_xy(run[THETA_TAG]), color="tab:red", label="θ (keep prob. of the last layer)")
    theta_ax.set_ylim(0, 1.05)  # θ lives in (0, 1]; a fixed scale shows how far the schedule has gone
    theta_ax.set_ylabel("θ")
    theta_ax.set_xlabel("optimizer step")
    theta_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    theta_ax.grid(alpha=0.3)
    if run.get(DEPTH_TAG):
        depth_ax = theta_ax.twinx()
        handles += depth_ax.plot(*_xy(run[DEPTH_TAG]), color="tab:blue", linestyle="--", label="expected depth")
        # The same headroom as θ's axis: at θ = 1 both curves start at the same height.
        depth_ax.set_ylim(0, 1.05 * max(max(v for _, v in run[DEPTH_TAG]), 1.0))
        depth_ax.set_ylabel("expected layers run")
    if handles:
        theta_ax.legend(handles=handles, loc="lower left")
    return fig


def plot_runs(runs: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], out_png: str | Path,
              tags: Sequence[str] = COMPARE_TAGS, x_label: str = "optimizer step") -> Path:
    """Overlay several runs, one panel per tag, one line per run ({label: scalars}).

    The x values are whatever the points hold: steps as read, or anything the caller mapped them to
    (samples, hours) and names in `x_label`. A run lacking a tag is left out of that panel.
    """
    return _save(runs_figure(runs, tags, x_label), out_png)


def runs_figure(runs: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                tags: Sequence[str] = COMPARE_TAGS, x_label: str = "optimizer step"):
    """plot_runs's matplotlib Figure: one axis per tag, one line per run that has the tag."""
    if not runs or not tags:
        raise UserError("nothing to compare: no runs or no tags given")
    fig, axes = _figure(len(tags), 3.0)
    for ax, tag in zip(axes, tags, strict=True):
        for label, scalars in runs.items():
            points = scalars.get(tag)
            if points:
                ax.plot(*_xy(points), "o-" if tag.startswith("eval/") else "-", label=label,
                        linewidth=1, markersize=4)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    axes[-1].set_xlabel(x_label)
    return fig


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="pld-plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pld-pretrain --output folder (or any folder of event files)")
    p.add_argument("--out", metavar="FILE.png", help="where to write the plot (default: RUN_DIR/plot.png)")
    p.add_argument("--title", help="the plot's title (default: the run folder's name)")
    p.add_argument("--baseline", type=float, metavar="NATS", help="draw this loss as a horizontal baseline")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    with one_line_errors("pld-plot", args.debug):
        out = plot_run(args.run_dir, args.out or Path(args.run_dir) / "plot.png", title=args.title,
                       baseline=args.baseline)
    print(out)


if __name__ == "__main__":
    main()
