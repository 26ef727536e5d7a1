"""pld-compare: does PLD reach the baseline's quality sooner? Two runs, one report.

    pld-compare --deepspeed_config ds_configs/X.json --data DIR --model mini --output OUT --samples 200000 \\
        [--eval-every 20000] [--baseline-lr 4e-4] [--pld-lr 1e-3] [--theta 0.5 --gamma 0.001] [-- extra pretrain flags]

Trains the preset twice on the same shards with the same seed and the same number of samples: a
baseline (the config with PLD disabled) and a PLD run (enabled; θ̄ and γ from the config's block
unless given). Each run evaluates validation MLM loss/accuracy every --eval-every samples. The
report (OUT/report.md, OUT/report.png) has loss against samples and against training wall-clock
time for both, the time at which PLD first reaches the baseline's final validation loss and its
ratio to the baseline's time, and the loss gap at equal samples. The learning rates used are
recorded: PLD usually wants a larger one (the paper used 1e-3 where the baseline used 1e-4 to 4e-4).

Runs are ordinary pld-pretrain runs (OUT/baseline, OUT/pld) resumed with --resume auto, so an
interrupted comparison continues where it stopped; --launcher runs them through the deepspeed
launcher (e.g. --launcher "deepspeed --num_gpus 8" --world-size 8).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pld_ds.config import PLD_KEY, ConfigError, read_json, split_ds_config
from pld_ds.errors import ArgumentParser, UserError, one_line_errors

RUNS = ("baseline", "pld")
EVAL_TAG = "eval/mlm_loss"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-compare", description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, metavar="FILE",
                   help="DeepSpeed JSON for both runs (its PLD block is turned off for the baseline)")
    p.add_argument("--data", required=True, metavar="DIR", help="pld-prep output folder (train/ and validation/)")
    p.add_argument("--output", required=True, metavar="DIR", help="runs and report go here")
    p.add_argument("--model", default="mini", help="preset or model JSON (a slim EarlyBERT model too)")
    p.add_argument("--samples", type=int, required=True, help="training samples per run")
    p.add_argument("--eval-every", type=int, default=0, metavar="SAMPLES",
                   help="evaluate every this many samples (default: 10 points per run)")
    p.add_argument("--eval-batches", type=int, default=50, help="validation micro-batches per evaluation")
    p.add_argument("--baseline-lr", type=float, help="peak learning rate of the baseline (default: the config's)")
    p.add_argument("--pld-lr", type=float, help="peak learning rate of the PLD run (default: the config's)")
    p.add_argument("--theta", type=float, help="θ̄ of the PLD run (default: the config's block, else 0.5)")
    p.add_argument("--gamma", type=float, help="γ of the PLD run (default: the config's block, else 0.001)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--world-size", type=int, default=1, help="processes the launcher starts (for the batch size)")
    p.add_argument("--launcher", default="", help='e.g. "deepspeed --num_gpus 8" (default: one process)')
    p.add_argument("--only-report", action="store_true", help="write the report from finished runs")
    p.add_argument("extra", nargs="*", help="after --: flags passed to both pld-pretrain runs")
    args = p.parse_args(argv)
    for name in ("samples", "world_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_every", "eval_batches"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("baseline_lr", "pld_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return args


# -- the two runs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    steps: int
    global_batch: int
    eval_interval: int  # steps
    lrs: dict[str, float | None]
    pld: dict[str, Any]


def _set_lr(config: dict[str, Any], lr: float, source: str) -> None:
    optimizer = config.get("optimizer", {}).get("params")
    if not isinstance(optimizer, dict):
        raise ConfigError(f"{source}: optimizer.params: expected an object holding lr, to set a run's learning rate")
    optimizer["lr"] = lr
    scheduler = config.get("scheduler", {}).get("params", {})
    for key in ("warmup_max_lr", "max_lr"):
        if key in scheduler:
            scheduler[key] = lr


def run_configs(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], Plan]:
    """The DeepSpeed JSON of each run, and the shared plan (steps, evaluation cadence)."""
    source = args.deepspeed_config
    full = read_json(source, "DeepSpeed config")
    ds_config, pld_cfg, _ = split_ds_config(full)  # validates the PLD block
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or not isinstance(accumulation, int) or micro < 1 or accumulation < 1:
        raise ConfigError(f"{source}: train_micro_batch_size_per_gpu and gradient_accumulation_steps: "
                          "expected positive integers (pld-compare counts samples with them)")
    global_batch = micro * accumulation * args.world_size
    steps = max(1, math.ceil(args.samples / global_batch))
    eval_every = args.eval_every or max(global_batch, args.samples // 10)
    eval_interval = max(1, round(eval_every / global_batch))
    block = {"enabled": True, "theta": args.theta if args.theta is not None else (pld_cfg.theta if pld_cfg.enabled
                                                                                     else 0.5),
             "gamma": args.gamma if args.gamma is not None else (pld_cfg.gamma if pld_cfg.enabled else 0.001)}
    configs = {}
    for name in RUNS:
        config = copy.deepcopy(full)
        config[PLD_KEY] = block if name == "pld" else {"enabled": False}
        lr = args.pld_lr if name == "pld" else args.baseline_lr
        if lr is not None:
            _set_lr(config, lr, source)
        scheduler = config.get("scheduler", {})
        if scheduler.get("type") == "WarmupDecayLR":  # decay over this budget, as a run of this length would
            params = scheduler.setdefault("params", {})
            params["total_num_steps"] = steps
            params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(1, steps // 10))
        configs[name] = config
    split_ds_config(configs["pld"])  # the block we wrote must be valid (θ̄ and γ from flags)
    lrs = {name: configs[name].get("optimizer", {}).get("params", {}).get("lr") for name in RUNS}
    return configs, Plan(steps, global_batch, eval_interval, lrs, block)


def pretrain_command(args: argparse.Namespace, config: Path, out: Path, plan: Plan) -> list[str]:
    prefix = [*shlex.split(args.launcher), "--module", "pld_ds.pretrain"] if args.launcher else \
        [sys.executable, "-m", "pld_ds.pretrain"]
    return [*prefix, "--deepspeed_config", str(config), "--data", args.data, "--output", str(out),
            "--model", args.model, "--max-steps", str(plan.steps), "--seed", str(args.seed),
            "--eval-interval", str(plan.eval_interval), "--eval-batches", str(args.eval_batches),
            "--log-interval", str(max(1, plan.eval_interval // 5)), "--resume", "auto", *args.extra]


# -- reading the results ----------------------------------------------------------------------------

def eval_points(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, seconds of training, eval MLM loss) for each evaluation, the clock starting at the run's first
    logged step; a resumed run's segments are joined, re-done steps replacing earlier ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"{run_dir}: no TensorBoard events (did the run start?)")
    steps: dict[int, tuple[float, float]] = {}  # step -> (training seconds, loss)
    offset, last_clock = 0.0, 0.0
    for path in sorted(files, key=lambda f: f.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        train = acc.Scalars("train/loss") if "train/loss" in tags else []
        if not train:
            continue
        start = train[0].wall_time  # each process's clock starts at its first logged step
        for event in acc.Scalars(EVAL_TAG) if EVAL_TAG in tags else []:
            steps[event.step] = (offset + event.wall_time - start, event.value)
        last_clock = offset + max(e.wall_time for e in train) - start
        offset = last_clock
    return [(step, seconds, loss) for step, (seconds, loss) in sorted(steps.items())]


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((step, seconds) for step, seconds, loss in points if loss <= target), None)


def report(args: argparse.Namespace, plan: Plan) -> str:
    from pld_ds.plot import plot_runs

    out = Path(args.output)
    points = {name: eval_points(out / name) for name in RUNS}
    for name in RUNS:
        if not points[name]:
            raise UserError(f"{out / name}: no {EVAL_TAG} logged (needs validation shards under --data)")
    base, pld_pts = points["baseline"], points["pld"]
    target = base[-1][2]
    base_time = base[-1][1]
    reached = first_reaching(pld_pts, target)
    samples = {name: {step * plan.global_batch: loss for step, _, loss in pts} for name, pts in points.items()}
    common = sorted(set(samples["baseline"]) & set(samples["pld"]))
    speed = {name: (pts[-1][0] * plan.global_batch) / pts[-1][1] if pts[-1][1] > 0 else float("nan")
             for name, pts in points.items()}

    curves = {name: {"eval/mlm_loss (samples)": [(s * plan.global_batch, v) for s, _, v in pts],
                     "eval/mlm_loss (seconds)": [(t, v) for _, t, v in pts]} for name, pts in points.items()}
    png = out / "report.png"
    plot_runs({n: {"eval/mlm_loss": c["eval/mlm_loss (samples)"]} for n, c in curves.items()},
              out / "loss_vs_samples.png", tags=("eval/mlm_loss",), x_label="training samples")
    plot_runs({n: {"eval/mlm_loss": c["eval/mlm_loss (seconds)"]} for n, c in curves.items()},
              out / "loss_vs_time.png", tags=("eval/mlm_loss",), x_label="training seconds")
    _combine([out / "loss_vs_samples.png", out / "loss_vs_time.png"], png)

    lines = [f"# pld-compare: {args.model} on {args.data}", "",
             f"Same shards, seed {args.seed}, {plan.steps} steps x {plan.global_batch} samples "
             f"= {plan.steps * plan.global_batch:,} samples per run; validation MLM loss every {plan.eval_interval} "
             f"steps ({args.eval_batches} micro-batches). Config `{args.deepspeed_config}`; PLD run θ̄ "
             f"{plan.pld['theta']}, γ {plan.pld['gamma']}; peak learning rate baseline {plan.lrs['baseline']}, "
             f"PLD {plan.lrs['pld']}. Clock: training wall time from each run's first logged step "
             "(evaluation included, start-up excluded).", "",
             "| | baseline | PLD |", "|---|---|---|",
             f"| final validation MLM loss | {base[-1][2]:.4f} | {pld_pts[-1][2]:.4f} |",
             f"| training time (s) | {base_time:.0f} | {pld_pts[-1][1]:.0f} |",
             f"| samples/s (with evaluation) | {speed['baseline']:.1f} | {speed['pld']:.1f} |", ""]
    if reached:
        step, seconds = reached
        lines.append(f"PLD first reaches the baseline's final loss ({target:.4f}) at step {step} "
                     f"({step * plan.global_batch:,} samples) after {seconds:.0f} s: **{base_time / seconds:.2f}x** "
                     f"the baseline's speed to that quality ({seconds / base_time:.2f} of its time).")
    else:
        lines.append(f"PLD does not reach the baseline's final loss ({target:.4f}) within the budget "
                     f"(its best: {min(v for *_, v in pld_pts):.4f}).")
    lines += ["", "Loss gap at equal samples (PLD - baseline):", "", "| samples | baseline | PLD | gap |",
              "|---|---|---|---|"]
    lines += [f"| {s:,} | {samples['baseline'][s]:.4f} | {samples['pld'][s]:.4f} | "
              f"{samples['pld'][s] - samples['baseline'][s]:+.4f} |" for s in common]
    lines += ["", "![loss against samples and time](report.png)", ""]
    text = "\n".join(lines)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "report.md")
    (out / "report.json").write_text(json.dumps({
        "samples_per_run": plan.steps * plan.global_batch, "lrs": plan.lrs, "pld": plan.pld,
        "eval": {name: [{"step": s, "seconds": t, "mlm_loss": v} for s, t, v in pts] for name, pts in points.items()},
        "baseline_final_loss": target, "pld_reaches_at": reached,
        "time_ratio": (base_time / reached[1]) if reached else None}, indent=2))
    return text


def _combine(parts: list[Path], out: Path) -> None:
    """Stack two PNGs vertically into one (matplotlib reads and writes PNG)."""
    import matplotlib.image as mpimg
    import numpy as np

    images = [mpimg.imread(p) for p in parts]
    width = max(img.shape[1] for img in images)
    padded = [np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=1.0) for img in images]
    tmp = out.with_name(f".{out.name}.tmp.png")
    mpimg.imsave(tmp, np.concatenate(padded))
    tmp.replace(out)


# Rendezvous variables of this process (set when it is itself a rank): a one-process child must pick its own.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child_env(launcher: bool) -> dict[str, str]:
    return dict(os.environ) if launcher else {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}


def run(args: argparse.Namespace) -> str:
    configs, plan = run_configs(args)
    out = Path(args.output)
    if not args.only_report:
        (out / "configs").mkdir(parents=True, exist_ok=True)
        for name in RUNS:
            config_path = out / "configs" / f"{name}.json"
            config_path.write_text(json.dumps(configs[name], indent=2))
            cmd = pretrain_command(args, config_path, out / name, plan)
            print(f"pld-compare: {name}: {shlex.join(cmd)}", flush=True)
            code = subprocess.call(cmd, env=_child_env(bool(args.launcher)))
            if code != 0:
                raise UserError(f"{out / name}: the {name} run exited with status {code} (see its output above)")
    return report(args, plan)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-compare"):
        text = run(args)
    print(text)
    print(f"pld-compare: report in {Path(args.output) / 'report.md'}")


if __name__ == "__main__":
    main()
