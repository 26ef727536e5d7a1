"""pld-compare: does PLD reach a baseline's quality sooner? Any set of arms, same shards and seeds, one report.

    pld-compare --deepspeed_config ds_configs/X.json --data DIR --model mini --output OUT --samples 200000 \\
        --arm postln-1e-4:ln=post,lr=1e-4 --arm postln-3e-4:ln=post,lr=3e-4 --arm preln:lr=1e-3 \\
        --arm preln-pld:pld=on,lr=1e-3 --reference preln --seeds 1 2 [--cap 1.5] [--minutes M] [-- pretrain flags]

An arm is NAME:KEY=VALUE,... with keys ln (pre|post: the model's LayerNorm layout), pld (on|off), lr (peak
learning rate), theta and gamma (the PLD block), and its parallel layout over the --world-size ranks: stages
(K pipeline stages; 1: data parallel), schedule (sync|ouroboros), warmup (Ouroboros' synchronous steps) and
staleness (ddg|N), over the config's pipeline block (none: data parallel). So data-parallel, sync-pipeline and
Ouroboros runs compare on time to loss:

    pld-compare ... --launcher "deepspeed --num_gpus 2" --world-size 2 --arm dp:stages=1 --arm sync:stages=2 \
        --arm ouro:stages=2,schedule=ouroboros,warmup=10

Without --arm the two classic arms run: `baseline` (PLD off, --baseline-lr) and `pld` (PLD on, --pld-lr).
Every arm trains the same preset on the same shards for the same seeds and global batch (the config's; an arm
with fewer data-parallel replicas takes more micro-batches per step), with the same learning-rate schedule:
warm-up, then linear decay planned over --cap x --samples (so an arm that continues past the budget still has a
learning rate). Each run evaluates validation MLM loss every --eval-every samples.

The reference arm (--reference, default the first) stops at --samples; its mean final validation loss over
the seeds is the target. Every other arm stops at --samples too if it has reached the target by then, else it
goes on, up to --cap x --samples, so that its time to the target is measured rather than "not reached".
--minutes M also stops every run (gracefully, with a checkpoint) after M minutes of wall time, for a budget in
time rather than samples.

The report (OUT/report.md, report.json, report.png) has, per arm, mean and spread over the seeds of: final
loss at the budget, samples and training seconds to the target and their ratio to the reference's, and the
time per training sample (the median of the logged throughput, so evaluations do not count) next to the
reference's (the PLD paper: 24% less time per sample). Runs are ordinary pld-pretrain runs resumed with
--resume auto, so an interrupted comparison continues where it stopped; --launcher runs them through the
deepspeed launcher (e.g. --launcher "deepspeed --num_gpus 8" --world-size 8).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pld_ds.config import (
    MODEL_PRESETS,
    PIPELINE_KEY,
    PIPELINE_SCHEDULES,
    PLD_KEY,
    ConfigError,
    PipelineConfig,
    model_config,
    pipeline_config,
    read_json,
    split_ds_config,
)
from pld_ds.errors import ArgumentParser, UserError, one_line_errors

RUNS = ("baseline", "pld")  # the arms when none is given
EVAL_TAG = "eval/mlm_loss"
THROUGHPUT_TAG = "train/samples_per_sec"
PAPER_TIME_PER_SAMPLE = 0.76  # the PLD paper: 24% less time per sample than its baseline
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Arm:
    name: str
    layer_norm: str = "pre"
    pld: bool = False
    lr: float | None = None  # None: the config's
    theta: float | None = None  # None: the config's block, else 0.5
    gamma: float | None = None  # None: the config's block, else 0.001
    # The parallel layout; None: the config's pipeline block (no block: data parallel over every rank).
    stages: int | None = None  # K; 1 is data parallel
    schedule: str | None = None  # sync or ouroboros
    warmup: int | None = None  # Ouroboros' synchronous warm-up steps (the block's warmup_steps)
    staleness: int | None = None  # Ouroboros' delay per stage boundary ("ddg" is 1)

    @property
    def sets_layout(self) -> bool:
        return any(v is not None for v in (self.stages, self.schedule, self.warmup, self.staleness))


# key -> (what it expects, for the message; the Arm field it sets; value parser that raises ValueError)
def _number(low_open: bool) -> Any:
    def parse(value: str) -> float:
        number = float(value)
        if not math.isfinite(number) or number < 0 or (low_open and number == 0):
            raise ValueError
        return number
    return parse


def _integer(minimum: int) -> Any:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise ValueError
        return number
    return parse


def _choice(*options: str, to: Any = str) -> Any:
    def parse(value: str) -> Any:
        if value not in options:
            raise ValueError
        return to(value)
    return parse


ARM_KEYS: dict[str, tuple[str, str, Any]] = {
    "ln": ("pre|post", "layer_norm", _choice("pre", "post")),
    "pld": ("on|off", "pld", _choice("on", "off", to=lambda v: v == "on")),
    "lr": ("NUMBER>0", "lr", _number(low_open=True)),
    "theta": ("NUMBER in (0, 1]", "theta", _number(low_open=True)),
    "gamma": ("NUMBER>=0", "gamma", _number(low_open=False)),
    "stages": ("INTEGER>=1 (pipeline stages; 1: data parallel)", "stages", _integer(1)),
    "schedule": ("sync|ouroboros", "schedule", _choice(*PIPELINE_SCHEDULES)),
    "warmup": ("INTEGER>=0 (Ouroboros' synchronous steps)", "warmup", _integer(0)),
    "staleness": ("ddg|INTEGER>=0", "staleness", lambda v: 1 if v == "ddg" else _integer(0)(v)),
}


def parse_arm(text: str) -> Arm:
    """NAME:KEY=VALUE,... (keys ln, pld, lr, theta, gamma; stages, schedule, warmup, staleness), e.g.
    postln:ln=post,lr=1e-4 or ouro:stages=2,schedule=ouroboros."""
    name, _, spec = text.partition(":")
    if not _ARM_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"arm {text!r}: expected NAME:KEY=VALUE,... with a name of letters, digits, "
                                         "'_', '.', '+', '-' (e.g. postln:ln=post,lr=1e-4)")
    fields: dict[str, Any] = {"name": name}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if key not in ARM_KEYS:
            raise argparse.ArgumentTypeError(f"arm {name}: {item!r}: unknown key {key!r} (expected KEY=VALUE with KEY "
                                             f"one of {', '.join(ARM_KEYS)})")
        expected, field_name, parse = ARM_KEYS[key]
        try:
            if not eq:
                raise ValueError
            fields[field_name] = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"arm {name}: {item!r}: expected {key}={expected}") from None
    return Arm(**fields)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-compare", description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, metavar="FILE",
                   help="DeepSpeed JSON for every arm (each arm sets its own PLD block and learning rate)")
    p.add_argument("--data", required=True, metavar="DIR", help="pld-prep output folder (train/ and validation/)")
    p.add_argument("--output", required=True, metavar="DIR", help="runs and report go here")
    p.add_argument("--model", default="mini", help="preset or model JSON (a slim EarlyBERT model too)")
    p.add_argument("--samples", type=int, required=True, help="training samples per run (the budget)")
    p.add_argument("--arm", action="append", type=parse_arm, default=[], metavar="NAME:KEY=VALUE,...",
                   help="an arm (repeat): keys ln=pre|post, pld=on|off, lr, theta, gamma; its layout: stages=K (1: "
                        "data parallel), schedule=sync|ouroboros, warmup=N, staleness=ddg|N (default: the config's "
                        "pipeline block), e.g. --arm dp:stages=1 --arm ouro:stages=2,schedule=ouroboros")
    p.add_argument("--reference", help="the arm whose final loss is the target (default: the first)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds, each arm runs once per seed (default: --seed)")
    p.add_argument("--cap", type=float, default=1.5,
                   help="an arm short of the target continues up to CAP x --samples (default 1.5)")
    p.add_argument("--minutes", type=float, help="also stop each run after this many minutes of wall time")
    p.add_argument("--eval-every", type=int, default=0, metavar="SAMPLES",
                   help="evaluate every this many samples (default: 10 points per budget)")
    p.add_argument("--eval-batches", type=int, default=50, help="validation micro-batches per evaluation")
    p.add_argument("--baseline-lr", type=float, help="peak learning rate of the default baseline arm")
    p.add_argument("--pld-lr", type=float, help="peak learning rate of the default PLD arm")
    p.add_argument("--theta", type=float, help="θ̄ of PLD arms that set none (default: the config's, else 0.5)")
    p.add_argument("--gamma", type=float, help="γ of PLD arms that set none (default: the config's, else 0.001)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--world-size", type=int, default=1, help="processes the launcher starts (for the batch size)")
    p.add_argument("--launcher", default="", help='e.g. "deepspeed --num_gpus 8" (default: one process)')
    p.add_argument("--only-report", action="store_true", help="write the report from finished runs")
    p.add_argument("extra", nargs="*", help="after --: flags passed to every pld-pretrain run")
    args = p.parse_args(argv)
    for name in ("samples", "world_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_every", "eval_batches"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("baseline_lr", "pld_lr", "minutes"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not (math.isfinite(args.cap) and args.cap >= 1.0):
        p.error(f"--cap must be a number >= 1, got {args.cap}")
    if args.arm and (args.baseline_lr is not None or args.pld_lr is not None):
        p.error("--baseline-lr and --pld-lr set the default arms; with --arm give each arm its lr=")
    names = [arm.name for arm in args.arm]
    if len(set(names)) != len(names):
        p.error(f"--arm: names must differ, got {', '.join(names)}")
    if args.reference is not None and args.reference not in (names or RUNS):
        p.error(f"--reference {args.reference}: no such arm (expected one of {', '.join(names or RUNS)})")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: seeds must differ")
    return args


def arms_of(args: argparse.Namespace) -> list[Arm]:
    if args.arm:
        return list(args.arm)
    return [Arm("baseline", lr=args.baseline_lr), Arm("pld", pld=True, lr=args.pld_lr)]


def reference_of(args: argparse.Namespace) -> str:
    return args.reference or arms_of(args)[0].name


def seeds_of(args: argparse.Namespace) -> list[int]:
    return args.seeds or [args.seed]


def run_dir(args: argparse.Namespace, arm: str, seed: int) -> Path:
    """OUT/ARM with one seed (as a single run always was), OUT/ARM/seedN with several."""
    out = Path(args.output) / arm
    return out if len(seeds_of(args)) == 1 else out / f"seed{seed}"


# -- the runs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    steps: int  # the budget
    cap_steps: int  # where an arm short of the target stops; the learning-rate schedule's length
    global_batch: int
    eval_interval: int  # steps
    lrs: dict[str, float | None]
    pld: dict[str, Any]  # the block of the (first) PLD arm; {"enabled": False} when none has PLD
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ln, pld block, lr, layout


def _set_lr(config: dict[str, Any], lr: float, source: str) -> None:
    optimizer = config.get("optimizer", {}).get("params")
    if not isinstance(optimizer, dict):
        raise ConfigError(f"{source}: optimizer.params: expected an object holding lr, to set a run's learning rate")
    optimizer["lr"] = lr
    scheduler = config.get("scheduler", {}).get("params", {})
    for key in ("warmup_max_lr", "max_lr"):
        if key in scheduler:
            scheduler[key] = lr


def arm_layout(full: dict[str, Any], arm: Arm, world_size: int, num_layers: int, zero_stage: int
               ) -> dict[str, Any] | None:
    """The arm's pipeline block (None: data parallel over every rank): the config's, with the arm's keys over it."""
    where = f"arm {arm.name}"
    base = full.get(PIPELINE_KEY)
    block = dict(base) if isinstance(base, dict) else {}
    if arm.stages is not None:
        block["stages"] = arm.stages
    if arm.schedule == "sync":  # the inherited Ouroboros settings go with the schedule they belong to
        block.pop("staleness", None)
        block.pop("warmup_steps", None)
    for key, value in (("schedule", arm.schedule), ("warmup_steps", arm.warmup), ("staleness", arm.staleness)):
        if value is not None:
            block[key] = value
    pipe = PipelineConfig.from_dict(block, where)
    if pipe.stages == 1:
        given = next((f"{key}={value}" for key, value in (("schedule", arm.schedule), ("warmup", arm.warmup),
                                                          ("staleness", arm.staleness)) if value is not None), None)
        if given:
            raise ConfigError(f"{where}: {given}: needs a pipeline (expected stages=K with K > 1 as well; with one "
                              "stage the arm runs data parallel)")
        return None
    if pipe.schedule == "sync" and arm.warmup is not None:
        raise ConfigError(f"{where}: warmup={arm.warmup}: only the ouroboros schedule has a warm-up (expected "
                          "schedule=ouroboros, or no warmup)")
    pipe.check_fit(world_size, num_layers, zero_stage, where)
    return block


def layout_text(block: dict[str, Any] | None, world_size: int) -> str:
    """How an arm's ranks are laid out, for the report: `dp x2`, `sync K=2`, `ouroboros K=2 x2, warm-up 10`."""
    pipe = PipelineConfig.from_dict(block) if block is not None else PipelineConfig()
    if pipe.stages == 1:
        return f"dp x{world_size}"
    text = f"{pipe.schedule} K={pipe.stages}"
    if world_size // pipe.stages > 1:
        text += f" x{world_size // pipe.stages}"
    if pipe.schedule == "ouroboros":
        if pipe.staleness != 1:
            text += f", staleness {pipe.staleness}"
        if pipe.warmup_steps:
            text += f", warm-up {pipe.warmup_steps}"
    return text


def run_configs(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], Plan]:
    """The DeepSpeed JSON of each arm, and the shared plan (budget, cap, evaluation cadence). The global batch is
    the config's (micro-batch x gradient_accumulation_steps x replicas of its pipeline block, world / K); an arm
    with another layout keeps it by its gradient accumulation (a pipeline's micro-batches per step)."""
    source = args.deepspeed_config
    full = read_json(source, "DeepSpeed config")
    ds_config, pld_cfg, _ = split_ds_config(full, pipeline_engine=True)  # validates the PLD and pipeline blocks
    stages = pipeline_config(full)[0].stages  # a pipeline's stages read the same batches: replicas = world / K
    if args.world_size % stages:
        raise ConfigError(f"{source}: pipeline.stages: {stages} stages do not divide --world-size {args.world_size}")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or not isinstance(accumulation, int) or micro < 1 or accumulation < 1:
        raise ConfigError(f"{source}: train_micro_batch_size_per_gpu and gradient_accumulation_steps: "
                          "expected positive integers (pld-compare counts samples with them)")
    global_batch = micro * accumulation * (args.world_size // stages)
    steps = max(1, math.ceil(args.samples / global_batch))
    cap_steps = max(steps, math.ceil(steps * args.cap))
    eval_every = args.eval_every or max(global_batch, args.samples // 10)
    eval_interval = max(1, round(eval_every / global_batch))
    theta = args.theta if args.theta is not None else (pld_cfg.theta if pld_cfg.enabled else 0.5)
    gamma = args.gamma if args.gamma is not None else (pld_cfg.gamma if pld_cfg.enabled else 0.001)
    arms = arms_of(args)
    zero = ds_config.get("zero_optimization", {})
    zero_stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    num_layers = model_config(args.model).num_layers if any(arm.sets_layout for arm in arms) else 0
    configs, described = {}, {}
    for arm in arms:
        config = copy.deepcopy(full)
        block = {"enabled": True, "theta": arm.theta if arm.theta is not None else theta,
                 "gamma": arm.gamma if arm.gamma is not None else gamma} if arm.pld else {"enabled": False}
        config[PLD_KEY] = block
        if arm.lr is not None:
            _set_lr(config, arm.lr, source)
        pipe = config.get(PIPELINE_KEY)
        if arm.sets_layout:
            pipe = arm_layout(full, arm, args.world_size, num_layers, zero_stage)
            config.pop(PIPELINE_KEY, None)
            if pipe is not None:
                config[PIPELINE_KEY] = pipe
        arm_stages = PipelineConfig.from_dict(pipe).stages if pipe is not None else 1
        replicas = args.world_size // arm_stages
        if global_batch % (micro * replicas):
            raise ConfigError(f"arm {arm.name}: stages={arm_stages}: the global batch of {global_batch} samples is not "
                              f"a whole number of micro-batches of {micro} on each of its {replicas} replicas "
                              "(expected train_micro_batch_size_per_gpu x replicas to divide it)")
        config["gradient_accumulation_steps"] = global_batch // (micro * replicas)
        if "train_batch_size" in config:
            config["train_batch_size"] = global_batch
        scheduler = config.get("scheduler", {})
        if scheduler.get("type") == "WarmupDecayLR":  # one schedule for every arm, long enough for the cap
            params = scheduler.setdefault("params", {})
            params["total_num_steps"] = cap_steps
            params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(1, steps // 10))
        try:  # the blocks we wrote must be valid (θ̄, γ from flags or arm)
            split_ds_config(config, pipeline_engine=True)
        except ConfigError as err:
            raise ConfigError(f"arm {arm.name}: {err}") from None
        configs[arm.name] = config
        described[arm.name] = {"layer_norm": arm.layer_norm, "pld": block,
                               "lr": config.get("optimizer", {}).get("params", {}).get("lr"),
                               "pipeline": pipe, "layout": layout_text(pipe, args.world_size),
                               "gradient_accumulation_steps": config["gradient_accumulation_steps"]}
    lrs = {name: arm["lr"] for name, arm in described.items()}
    first_pld = next((arm["pld"] for arm in described.values() if arm["pld"]["enabled"]), {"enabled": False})
    return configs, Plan(steps, cap_steps, global_batch, eval_interval, lrs, first_pld, described)


def model_file(args: argparse.Namespace, arm: Arm, folder: Path) -> str:
    """--model as given for PreLN arms; for PostLN ones a JSON of the same fields with layer_norm post."""
    if arm.layer_norm == "pre":
        return args.model
    if args.model in MODEL_PRESETS:
        fields = dict(MODEL_PRESETS[args.model])
    elif args.model.endswith(".json"):
        fields = read_json(args.model, "model file")
    else:
        raise ConfigError(f"--model: expected one of {', '.join(MODEL_PRESETS)} or a .json file, got {args.model!r}")
    path = folder / f"{arm.name}.model.json"
    path.write_text(json.dumps({**fields, "layer_norm": "post"}, indent=2))
    return str(path)


def pretrain_command(args: argparse.Namespace, config: Path, out: Path, plan: Plan, *, model: str | None = None,
                     seed: int | None = None, max_steps: int | None = None) -> list[str]:
    prefix = [*shlex.split(args.launcher), "--module", "pld_ds.pretrain"] if args.launcher else \
        [sys.executable, "-m", "pld_ds.pretrain"]
    return [*prefix, "--deepspeed_config", str(config), "--data", args.data, "--output", str(out),
            "--model", model or args.model, "--max-steps", str(max_steps or plan.steps),
            "--seed", str(args.seed if seed is None else seed),
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
    offset = 0.0
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
        offset += max(e.wall_time for e in train) - start
    return [(step, seconds, loss) for step, (seconds, loss) in sorted(steps.items())]


def median_throughput(run_dir: Path) -> float | None:
    """Median of the logged training samples/s: the intervals holding an evaluation are the slow outliers."""
    from pld_ds.plot import read_scalars

    points = read_scalars(run_dir).get(THROUGHPUT_TAG, [])
    return statistics.median(v for _, v in points) if points else None


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((step, seconds) for step, seconds, loss in points if loss <= target), None)


def _at_budget(points: list[tuple[int, float, float]], steps: int) -> tuple[int, float, float]:
    """The last evaluation at or before the budget (a run continued past it has later ones)."""
    within = [p for p in points if p[0] <= steps]
    return within[-1] if within else points[0]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], spec: str = ".4f") -> str:
    if not values:
        return "-"
    mean, sd = _mean_sd(values)
    return f"{mean:{spec}}" if len(values) == 1 else f"{mean:{spec}} ± {sd:{spec}}"


def outcomes(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Every arm's per-seed results against the reference's mean final loss."""
    seeds, ref = seeds_of(args), reference_of(args)
    points = {arm: {seed: eval_points(run_dir(args, arm, seed)) for seed in seeds} for arm in plan.arms}
    for arm, by_seed in points.items():
        for seed, pts in by_seed.items():
            if not pts:
                raise UserError(f"{run_dir(args, arm, seed)}: no {EVAL_TAG} logged (needs validation shards "
                                "under --data)")
    ref_final = {seed: _at_budget(points[ref][seed], plan.steps) for seed in seeds}
    target = statistics.fmean(p[2] for p in ref_final.values())
    result: dict[str, Any] = {"target": target, "reference": ref, "arms": {}}
    for arm, by_seed in points.items():
        runs = {}
        for seed, pts in by_seed.items():
            final = _at_budget(pts, plan.steps)
            reached = (final[0], final[1]) if arm == ref else first_reaching(pts, target)
            throughput = median_throughput(run_dir(args, arm, seed))
            runs[seed] = {"final_loss": final[2], "final_seconds": final[1], "reached": reached,
                          "samples_to_target": reached[0] * plan.global_batch if reached else None,
                          "seconds_to_target": reached[1] if reached else None,
                          "samples_per_sec": throughput,
                          "last_step": pts[-1][0], "eval": [{"step": s, "seconds": t, "mlm_loss": v}
                                                            for s, t, v in pts]}
        result["arms"][arm] = runs
    ref_runs = result["arms"][ref]
    for runs in result["arms"].values():
        for seed, run in runs.items():
            ref_run = ref_runs[seed]
            run["time_ratio"] = (ref_run["seconds_to_target"] / run["seconds_to_target"]
                                 if run["seconds_to_target"] else None)
            # In samples: what the clock says without the machine's load (evaluation points bound its resolution).
            run["sample_ratio"] = (ref_run["samples_to_target"] / run["samples_to_target"]
                                   if run["samples_to_target"] else None)
            run["time_per_sample_vs_reference"] = (ref_run["samples_per_sec"] / run["samples_per_sec"]
                                                   if run["samples_per_sec"] and ref_run["samples_per_sec"] else None)
    return result


def report(args: argparse.Namespace, plan: Plan) -> str:
    from pld_ds.plot import plot_runs

    out = Path(args.output)
    seeds, ref = seeds_of(args), reference_of(args)
    result = outcomes(args, plan)
    target = result["target"]

    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for arm, runs in result["arms"].items():
        for seed, run in runs.items():
            label = arm if len(seeds) == 1 else f"{arm} s{seed}"
            curves[label] = {"samples": [(p["step"] * plan.global_batch, p["mlm_loss"]) for p in run["eval"]],
                             "seconds": [(p["seconds"], p["mlm_loss"]) for p in run["eval"]]}
    plot_runs({n: {EVAL_TAG: c["samples"]} for n, c in curves.items()}, out / "loss_vs_samples.png",
              tags=(EVAL_TAG,), x_label="training samples")
    plot_runs({n: {EVAL_TAG: c["seconds"]} for n, c in curves.items()}, out / "loss_vs_time.png",
              tags=(EVAL_TAG,), x_label="training seconds")
    _combine([out / "loss_vs_samples.png", out / "loss_vs_time.png"], out / "report.png")

    def column(arm: str, key: str) -> list[float]:
        return [run[key] for run in result["arms"][arm].values() if run[key] is not None]

    lines = [f"# pld-compare: {args.model} on {args.data}", "",
             f"Same shards; seeds {', '.join(map(str, seeds))}; budget {plan.steps} steps x {plan.global_batch} "
             f"samples = {plan.steps * plan.global_batch:,} samples per run, cap {plan.cap_steps} steps for an arm "
             f"short of the target; every arm's learning rate warms up and decays linearly over {plan.cap_steps} "
             f"steps. Validation MLM loss every {plan.eval_interval} steps ({args.eval_batches} micro-batches). "
             f"Config `{args.deepspeed_config}`."
             + (f" Runs also stopped after {args.minutes:g} minutes of wall time." if args.minutes else ""), "",
             f"Target: the reference arm **{ref}**'s mean final validation loss, {target:.4f}. Clock: training wall "
             "time from each run's first logged step (evaluations included, start-up excluded). Time per sample: "
             "the median logged training throughput, evaluations excluded. Values are mean ± sd over the seeds.",
             "", f"Layout: dp xN is data parallel over N ranks, sync or ouroboros K=k a pipeline of k stages (xN: N "
             f"replicas) on the same {args.world_size} rank(s); every arm steps on {plan.global_batch} samples "
             "(micro-batches per rank and step: " + ", ".join(
                 f"{arm} {desc.get('gradient_accumulation_steps', '-')}" for arm, desc in plan.arms.items()) + ").",
             "", "| arm | layout | LN | PLD (θ̄, γ) | peak lr | final loss at budget | reached target | samples to "
             "target | seconds to target | speed-up to target vs ref | in samples | time per sample vs ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, desc in plan.arms.items():
        block = desc["pld"]
        pld_text = f"on ({block['theta']:g}, {block['gamma']:g})" if block["enabled"] else "off"
        reached = sum(run["reached"] is not None for run in result["arms"][arm].values())
        lines.append(f"| {arm} | {desc.get('layout', '-')} | {desc['layer_norm']} | {pld_text} | {desc['lr']} "
                     f"| {_fmt(column(arm, 'final_loss'))} "
                     f"| {reached}/{len(seeds)} | {_fmt(column(arm, 'samples_to_target'), ',.0f')} "
                     f"| {_fmt(column(arm, 'seconds_to_target'), '.0f')} | {_fmt(column(arm, 'time_ratio'), '.2f')} "
                     f"| {_fmt(column(arm, 'sample_ratio'), '.2f')} "
                     f"| {_fmt(column(arm, 'time_per_sample_vs_reference'), '.3f')} |")
    lines += ["", f"Time per sample against the reference: the PLD paper reports {PAPER_TIME_PER_SAMPLE:.2f} "
              "(24% less) for PreLN+PLD against its baseline on GPUs.", ""]
    for arm in plan.arms:
        if arm == ref:
            continue
        ratios = column(arm, "time_ratio")
        missing = len(seeds) - len(ratios)
        if ratios:
            mean, sd = _mean_sd(ratios)
            verdict = "sooner" if mean > 1 else "later"
            in_samples = _mean_sd(column(arm, "sample_ratio"))[0]
            lines.append(f"- **{arm}** reaches {target:.4f} {verdict} than {ref}: {mean:.2f}x its speed"
                         + (f" (± {sd:.2f} over {len(ratios)} seeds)" if len(ratios) > 1 else "")
                         + f", {in_samples:.2f}x in samples"
                         + (f"; {missing} seed(s) did not reach it within the cap" if missing else "") + ".")
        else:
            best = min(run["eval"][i]["mlm_loss"] for run in result["arms"][arm].values()
                       for i in range(len(run["eval"])))
            ran = max(run["last_step"] for run in result["arms"][arm].values())
            lines.append(f"- **{arm}** does not reach {target:.4f} in the {ran} steps it ran (cap {plan.cap_steps}; "
                         f"its best: {best:.4f}).")
    lines += ["", "![loss against samples and time](report.png)", ""]
    text = "\n".join(lines)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "report.md")
    (out / "report.json").write_text(json.dumps({
        "samples_per_run": plan.steps * plan.global_batch, "cap_steps": plan.cap_steps,
        "global_batch": plan.global_batch, "seeds": seeds, "lrs": plan.lrs, "pld": plan.pld,
        "arms_config": plan.arms, **result}, indent=2, default=str))
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


def _train(args: argparse.Namespace, cmd: list[str], where: Path, name: str) -> None:
    """One pld-pretrain run; with --minutes it is asked to stop (SIGTERM: checkpoint, exit 143) when time is up."""
    print(f"pld-compare: {name}: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=_child_env(bool(args.launcher)))
    try:
        code = proc.wait(timeout=args.minutes * 60 if args.minutes else None)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        if code == 128 + signal.SIGTERM:
            print(f"pld-compare: {name}: stopped after {args.minutes:g} minutes", flush=True)
            return
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if code != 0:
        raise UserError(f"{where}: the {name} run exited with status {code} (see its output above)")


def run(args: argparse.Namespace) -> str:
    configs, plan = run_configs(args)
    out = Path(args.output)
    ref = reference_of(args)
    if not args.only_report:
        folder = out / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        arms = arms_of(args)
        paths, models = {}, {}
        for arm in arms:
            paths[arm.name] = folder / f"{arm.name}.json"
            paths[arm.name].write_text(json.dumps(configs[arm.name], indent=2))
            models[arm.name] = model_file(args, arm, folder)
        for seed in seeds_of(args):  # seed by seed: a stopped comparison has whole seeds to report
            for arm in arms:
                where = run_dir(args, arm.name, seed)
                _train(args, pretrain_command(args, paths[arm.name], where, plan, model=models[arm.name], seed=seed),
                       where, f"{arm.name} seed {seed}")
        # Arms short of the reference's loss go on to the cap: time to the target is then measured.
        target = outcomes(args, plan)["target"]
        for seed in seeds_of(args):
            for arm in arms:
                where = run_dir(args, arm.name, seed)
                if arm.name == ref or plan.cap_steps == plan.steps or first_reaching(eval_points(where), target):
                    continue
                _train(args, pretrain_command(args, paths[arm.name], where, plan, model=models[arm.name], seed=seed,
                                              max_steps=plan.cap_steps), where, f"{arm.name} seed {seed} (to the cap)")
    return report(args, plan)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-compare"):
        text = run(args)
    print(text)
    print(f"pld-compare: report in {Path(args.output) / 'report.md'}")


if __name__ == "__main__":
    main()
