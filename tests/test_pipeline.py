"""The pipeline engine: partition, config checks, and multi-process runs on CPU ranks (gloo).

Multi-process runs go through tests/pipeline_worker.py (torch.multiprocessing) and, for the command line,
through DeepSpeed's launcher as tests/test_distributed.py does; they are marked slow.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from pld_helpers import (
    REPO,
    child_env,
    console_script,
    free_port,
    load_ds_config,
    read_csv_scalar,
    synthetic_batch,
    tiny_config,
    write_json,
)
from shard_fixtures import make_shard_dir

from pld_ds import pld
from pld_ds.config import ConfigError, PipelineConfig, model_config, pipeline_config, split_ds_config
from pld_ds.model import BertForPreTraining
from pld_ds.pipeline import Stage, make_engine, partition_layers, unit_costs

TIMEOUT = 600

# -- partition and stages (one process) --------------------------------------------------------------


def test_partition_is_contiguous_and_balances_compute():
    cfg = model_config("base")
    for stages in (1, 2, 3, 4, 12):
        bounds = partition_layers(unit_costs(cfg, "compute"), stages)
        assert [r.start for r in bounds][0] == 0 and bounds[-1].stop == cfg.num_layers
        assert all(a.stop == b.start for a, b in zip(bounds, bounds[1:], strict=False))
        assert all(len(r) >= 1 for r in bounds)
    assert [len(r) for r in partition_layers(unit_costs(cfg, "compute"), 4)] == [3, 3, 3, 3]  # heads: half a layer
    # mini (H 256): the MLM decoder (H x V at 15% of the positions) costs more than a layer, so the last stage
    # gets fewer layers than a uniform cut gives it
    mini = model_config("mini")
    assert partition_layers(unit_costs(mini, "compute"), 2) == [range(0, 3), range(3, 4)]
    assert partition_layers(unit_costs(mini, "uniform"), 2) == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError):
        partition_layers(unit_costs(cfg, "uniform"), 13)


def test_stages_compose_to_the_model():
    """Stage slices of one BertForPreTraining, run one after another with the same gates, give its loss."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).train()
    batch = synthetic_batch(seed=3)
    theta_now = 0.4
    out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now, pld_generator=pld.gate_generator(5, 2, 1))
    gates = pld.sample_gates(4, theta_now, pld.gate_generator(5, 2, 1))
    assert not all(kept for kept, _ in gates)  # something is dropped
    bounds = partition_layers(unit_costs(model.config, "uniform"), 3)
    stages = [Stage(model, k, 3, bounds[k]) for k in range(3)]
    hidden = None
    for stage in stages[:-1]:
        hidden = stage(hidden, batch, gates)
    piped = stages[-1](hidden, batch, gates)
    torch.testing.assert_close(piped.loss, out.loss, rtol=0, atol=0)
    assert stages[0].tied_weight() is stages[-1].tied_weight()  # one process: the same tensor
    names = {n for s in stages for n in s.model_names().values()}
    assert names == {n for n, _ in model.named_parameters()} | {"heads.decoder.weight"}


# -- config and bad input ------------------------------------------------------------------------------


def test_pipeline_block_defaults_and_rules():
    assert PipelineConfig.from_dict({}) == PipelineConfig()
    ouro = PipelineConfig.from_dict({"stages": 4, "schedule": "ouroboros", "warmup_steps": 3})
    assert ouro.staleness == 1  # "ddg" by default
    assert [ouro.stage_staleness(k, 10) for k in range(4)] == [3, 2, 1, 0]
    assert [ouro.stage_staleness(k, 2) for k in range(4)] == [0, 0, 0, 0]  # warm-up: synchronous
    assert PipelineConfig.from_dict({"stages": 4, "schedule": "ouroboros", "staleness": 0}).stage_staleness(0, 9) == 0
    assert PipelineConfig.from_dict({"stages": "auto"}).stages == 1


@pytest.mark.parametrize("block, key", [
    ({"stages": 2, "schedule": "gpipe"}, "pipeline.schedule"),
    ({"stages": 0}, "pipeline.stages"),
    ({"stages": 2, "staleness": 1}, "pipeline.staleness"),
    ({"stages": 2, "schedule": "ouroboros", "staleness": "fast"}, "pipeline.staleness"),
    ({"stages": 2, "partition": "type:Layer"}, "pipeline.partition"),
    ({"stages": 2, "pipe_partitioned": True}, "pipeline.pipe_partitioned"),
    ({"stages": 2, "warmup_steps": -1}, "pipeline.warmup_steps"),
    ([2], "pipeline"),
])
def test_bad_pipeline_block_names_the_key(block, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        split_ds_config({"pipeline": block}, pipeline_engine=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("world, layers, zero, match", [
    (3, 4, 0, "do not divide the world size 3"),
    (8, 4, 0, "8 stages for a model of 4 layers"),
    (4, 12, 3, "zero_optimization.stage: ZeRO stage 3"),
    (4, 12, 2, "zero_optimization.stage: ZeRO stage 2"),
])
def test_pipeline_that_does_not_fit_the_launch(world, layers, zero, match):
    stages = 8 if world == 8 else 2
    with pytest.raises(ConfigError, match=match) as err:
        PipelineConfig.from_dict({"stages": stages}).check_fit(world, layers, zero, "x.json")
    assert str(err.value).startswith("x.json: ")


def test_data_parallel_commands_refuse_a_pipeline_instead_of_ignoring_it(tmp_path):
    path = write_json(tmp_path / "ds.json", {**load_ds_config(), "pipeline": {"stages": 2}})
    with pytest.raises(ConfigError, match=r"pipeline\.stages: 2 stages need the pipeline engine"):
        split_ds_config(path)
    rest, _, _ = split_ds_config(path, pipeline_engine=True)
    assert "pipeline" not in rest  # never reaches deepspeed.initialize
    assert pipeline_config(path)[0].stages == 2
    # one stage is plain data parallelism, as in DeepSpeed
    assert "pipeline" not in split_ds_config({**load_ds_config(), "pipeline": {"stages": 1}})[0]


def test_make_engine_refuses_earlybert_on_a_pipeline():
    config = {**load_ds_config(), "pipeline": {"stages": 2}, "earlybert": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"earlybert\.enabled"):
        make_engine(BertForPreTraining(tiny_config()), config)


# -- multi-process runs ----------------------------------------------------------------------------------


def run_worker(tmp_path, world: int, scenarios: list[dict]) -> dict:
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "tests" / "pipeline_worker.py"), "--out", str(out), "--world", str(world),
           "--port", str(free_port()), "--scenarios", json.dumps(scenarios)]
    env = {**child_env(), "PIPELINE_WORKER_TIMEOUT": str(TIMEOUT - 60)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    (tmp_path / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def losses_of(ranks: list[dict]) -> list[float]:
    """The loss per step, averaged over the data-parallel replicas' last stages."""
    last = [r for r in ranks if r["records"][0]["loss"] is not None]
    return [sum(r["records"][i]["loss"] for r in last) / len(last) for i in range(len(last[0]["records"]))]


def tail_mean(values: list[float], n: int = 6) -> float:
    return sum(values[-n:]) / n


def assert_close_trace(got: list[float], want: list[float], rel: float = 1e-5) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= rel * abs(b), (step, a, b)


TWO_STAGE_SCENARIOS = [
    {"name": "sync", "stages": 2, "steps": 10, "reference": True},
    {"name": "sync_pld", "stages": 2, "steps": 10, "pld": True, "reference": True},
    {"name": "ouro_s0", "stages": 2, "steps": 10, "schedule": "ouroboros", "staleness": 0, "reference": True},
    {"name": "sync_long", "stages": 2, "steps": 30},
    {"name": "ouro_long", "stages": 2, "steps": 30, "schedule": "ouroboros"},
    {"name": "ouro_pld", "stages": 2, "steps": 10, "schedule": "ouroboros", "pld": True, "warmup_steps": 2},
    {"name": "ouro_pld_resumed", "stages": 2, "steps": 10, "schedule": "ouroboros", "pld": True, "warmup_steps": 2,
     "resume_at": 5},
]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("pipe2"), 2, TWO_STAGE_SCENARIOS)


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("pipe3"), 3, [
        {"name": "sync_long", "stages": 3, "steps": 30},
        # stage 0 is two steps stale: ten synchronous warm-up steps, as Ouroboros warms up (4% apart without)
        {"name": "ouro_long", "stages": 3, "steps": 30, "schedule": "ouroboros", "warmup_steps": 10},
    ])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sync", "sync_pld"])
def test_sync_pipeline_equals_one_process(two_stages, name):
    assert_close_trace(losses_of(two_stages["runs"][name]), two_stages["reference"][name])


@pytest.mark.slow
def test_staleness_zero_reproduces_sync(two_stages):
    assert losses_of(two_stages["runs"]["ouro_s0"]) == losses_of(two_stages["runs"]["sync"])
    assert_close_trace(losses_of(two_stages["runs"]["ouro_s0"]), two_stages["reference"]["ouro_s0"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sync_pld", "ouro_pld"])
def test_gates_agree_on_every_stage(two_stages, name):
    ranks = two_stages["runs"][name]
    first, last = sorted(ranks, key=lambda r: r["stage"])
    dropped = 0
    for a, b in zip(first["records"], last["records"], strict=True):
        assert a["gates"] == b["gates"]  # drawn on each rank, with no message
        assert len(a["gates"]) == 2  # one gate list per micro-batch
        for rank in (first, last):
            # the layers that ran on this rank: its kept layers, once per micro-batch (Ouroboros recomputes on
            # stage 0, so there its forward hooks also fire for the delayed batch)
            kept = [[i for i in rank["layer_ids"] if g[i][0]] for g in a["gates"]]
            if name.startswith("sync") or rank is last:
                assert rank["records"][a["step"]]["layers_run"] == [i for micro in kept for i in micro]
        dropped += sum(not kept for g in a["gates"] for kept, _ in g)
    assert dropped > 0


@pytest.mark.slow
def test_tied_weight_copies_stay_equal(two_stages):
    for name, ranks in two_stages["runs"].items():
        tied = {r["tied"] for r in ranks}
        assert len(tied) == 1, name


@pytest.mark.slow
def test_ouroboros_staleness_per_stage(two_stages):
    first, last = sorted(two_stages["runs"]["ouro_pld"], key=lambda r: r["stage"])
    assert [r["staleness"] for r in first["records"]] == [0, 0] + [1] * 8  # two warm-up steps, then K-1-k
    assert all(r["staleness"] == 0 for r in last["records"])
    assert first["scalars"]["pipeline/staleness_stage0"] == 1.0
    assert 0.0 <= first["scalars"]["pipeline/idle_fraction_stage0"] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 3])
def test_ouroboros_trains_within_5_percent_of_sync(two_stages, three_stages, stages):
    runs = (two_stages if stages == 2 else three_stages)["runs"]
    sync, ouro = losses_of(runs["sync_long"]), losses_of(runs["ouro_long"])
    assert tail_mean(sync) < 0.6 * sync[0]  # both learn the batches they cycle over
    assert abs(tail_mean(ouro) - tail_mean(sync)) <= 0.05 * tail_mean(sync), (tail_mean(ouro), tail_mean(sync))
    assert ouro != sync  # the gradients were stale


@pytest.mark.slow
def test_resumed_ouroboros_run_continues_exactly(two_stages):
    """Saved mid-run (stored inputs, received error gradients and tied contributions included), loaded into a
    fresh engine with other initial weights: the loss at every later step is the uninterrupted run's."""
    straight, resumed = two_stages["runs"]["ouro_pld"], two_stages["runs"]["ouro_pld_resumed"]
    assert losses_of(resumed) == losses_of(straight)
    assert sorted(r["checksum"] for r in resumed) == sorted(r["checksum"] for r in straight)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("pipe4"), 4, [
        {"name": "zero1", "stages": 2, "steps": 6, "zero": 1, "clip": 0.0, "reference": True},
        {"name": "ouro4", "stages": 4, "steps": 12, "schedule": "ouroboros", "pld": True},
        {"name": "ouro4_resumed", "stages": 4, "steps": 12, "schedule": "ouroboros", "pld": True, "resume_at": 5},
    ])


@pytest.mark.slow
def test_four_stages_of_one_layer_with_ouroboros(four_ranks):
    """K = 4 on four ranks: staleness 3, 2, 1, 0; it trains, the tied copies agree, and it resumes exactly."""
    ranks = sorted(four_ranks["runs"]["ouro4"], key=lambda r: r["stage"])
    assert [r["layer_ids"] for r in ranks] == [[0], [1], [2], [3]]
    assert [r["records"][-1]["staleness"] for r in ranks] == [3, 2, 1, 0]
    losses = losses_of(ranks)
    assert all(math.isfinite(v) for v in losses) and tail_mean(losses, 3) < losses[0]
    assert len({r["tied"] for r in ranks if r["tied"]}) == 1
    assert losses_of(four_ranks["runs"]["ouro4_resumed"]) == losses


@pytest.mark.slow
def test_two_stages_two_replicas_with_zero1(four_ranks):
    result = four_ranks
    ranks = result["runs"]["zero1"]
    assert sorted((r["stage"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # the replicas' mean loss is one process's loss over both replicas' micro-batches
    assert_close_trace(losses_of(ranks), result["reference"]["zero1"])
    for stage in (0, 1):
        assert len({r["checksum"] for r in ranks if r["stage"] == stage}) == 1  # replicas agree


# -- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shard_dir(tmp_path_factory.mktemp("pipe_data"), shard_sizes=(64, 64), seq_len=32, validation=32)


def pipeline_ds_config(tmp_path, **block) -> str:
    config = load_ds_config("tiny_cpu_pld.json")
    config["train_micro_batch_size_per_gpu"] = 4
    config["gradient_accumulation_steps"] = 2
    config["pipeline"] = {"stages": 2, **block}
    return str(write_json(tmp_path / "pipe.json", config))


def test_one_process_cannot_hold_two_stages(tmp_path, shard_dir):
    proc = subprocess.run([console_script("pld-pretrain"), "--deepspeed_config", pipeline_ds_config(tmp_path),
                           "--data", str(shard_dir), "--output", str(tmp_path / "out"), "--model", "tiny",
                           "--max-steps", "2"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "pipeline.stages: 2 stages do not divide the world size 1" in lines[0]


def launch(tmp_path, args: list[str], name: str) -> subprocess.CompletedProcess:
    cmd = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "pld_ds.pretrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    (tmp_path / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_pretrain_on_a_pipeline_stops_and_resumes(tmp_path, shard_dir):
    """pld-pretrain through the launcher with an Ouroboros pipeline: a run stopped after 3 steps and resumed with
    --resume auto logs the same losses for steps 4-6 as an uninterrupted run (same batches, none repeated), and
    ends with the same weights."""
    config = pipeline_ds_config(tmp_path, schedule="ouroboros")
    common = ["--deepspeed_config", config, "--data", str(shard_dir), "--model", "tiny", "--log-interval", "1",
              "--eval-batches", "2"]
    launch(tmp_path, [*common, "--output", str(tmp_path / "straight"), "--max-steps", "6"], "straight")
    # the split run also evaluates every 2 steps: evaluation between Ouroboros steps must not disturb training
    split = [*common, "--output", str(tmp_path / "split"), "--eval-interval", "2"]
    proc = launch(tmp_path, [*split, "--max-steps", "3"], "first")
    assert "world 2" in proc.stdout
    launch(tmp_path, [*split, "--max-steps", "6", "--resume", "auto"], "second")
    straight = read_csv_scalar(tmp_path / "straight" / "csv" / "run" / "train_loss.csv")
    split = read_csv_scalar(tmp_path / "split" / "csv" / "run" / "train_loss.csv")
    assert [s for s, _ in straight] == [1, 2, 3, 4, 5, 6]
    assert dict(split) == pytest.approx(dict(straight), rel=1e-6)
    assert all(math.isfinite(v) for _, v in straight)
    parts = sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "global_step6").iterdir())
    assert parts == ["stage00", "stage01"]
    eval_loss = read_csv_scalar(tmp_path / "split" / "csv" / "run" / "eval_mlm_loss.csv")
    assert {2, 4, 6} <= {step for step, _ in eval_loss} and all(math.isfinite(v) for _, v in eval_loss)
    # pld-export's reader merges the stages into BertForPreTraining's state dict: the same weights either way
    from pld_ds import export

    merged, reference = (export.load_checkpoint(tmp_path / run) for run in ("split", "straight"))
    assert set(merged.state_dict) == set(BertForPreTraining(merged.config).state_dict())
    for name, tensor in reference.state_dict.items():
        assert torch.equal(merged.state_dict[name], tensor), name


def test_pld_compare_runs_both_arms_on_the_same_pipeline(tmp_path):
    """pld-compare takes a config with a pipeline block: both arms keep it, and the global batch counts the
    replicas (world / K), not the ranks."""
    from pld_ds import compare

    config = pipeline_ds_config(tmp_path, schedule="ouroboros")
    args = compare.parse_args(["--deepspeed_config", config, "--data", str(tmp_path / "data"), "--output",
                               str(tmp_path / "out"), "--model", "tiny", "--samples", "640", "--world-size", "4",
                               "--launcher", "deepspeed --num_gpus 4"])
    configs, plan = compare.run_configs(args)
    assert plan.global_batch == 4 * 2 * 2  # micro-batch x accumulation x 2 replicas of 2 stages
    assert all(c["pipeline"] == {"stages": 2, "schedule": "ouroboros"} for c in configs.values())
    bad = compare.parse_args(["--deepspeed_config", config, "--data", str(tmp_path / "data"), "--output",
                              str(tmp_path / "out"), "--model", "tiny", "--samples", "640", "--world-size", "3",
                              "--launcher", "deepspeed --num_gpus 3"])
    with pytest.raises(ConfigError, match=r"pipeline\.stages: 2 stages do not divide --world-size 3"):
        compare.run_configs(bad)


@pytest.mark.slow
def test_sigterm_to_one_stage_stops_both_at_one_step_and_resumes(tmp_path, shard_dir):
    """SIGTERM reaches only stage 0 (rank 1) of an Ouroboros pipeline run through the launcher: both stages stop at
    the same step (the pre-emption check agrees one step late), save it and exit 143; --resume auto then logs the
    losses of an uninterrupted run for every step (no batch repeated or skipped)."""
    import re
    import signal

    import psutil
    from fault_injection import Run

    config = pipeline_ds_config(tmp_path, schedule="ouroboros")
    common = ["--deepspeed_config", config, "--data", str(shard_dir), "--model", "tiny", "--log-interval", "1",
              "--eval-batches", "2", "--max-steps", "8"]
    launch(tmp_path, [*common, "--output", str(tmp_path / "straight")], "straight")
    split = [*common, "--output", str(tmp_path / "split"), "--resume", "auto"]
    run = Run([console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
               "pld_ds.pretrain", *split])
    try:
        assert run.wait_for(lambda: run.last_step >= 2, timeout=TIMEOUT), "".join(run.lines[-20:])
        stage0 = [p for p in psutil.Process(run.proc.pid).children(recursive=True)
                  if "pld_ds.pretrain" in " ".join(p.cmdline()) and "--local_rank=1" in " ".join(p.cmdline())]
        assert len(stage0) == 1
        stage0[0].send_signal(signal.SIGTERM)
        run.proc.wait(timeout=TIMEOUT)
        assert run.finish() == 128 + signal.SIGTERM, "".join(run.lines[-30:])
    finally:
        if run.proc.poll() is None:
            for child in psutil.Process(run.proc.pid).children(recursive=True):
                child.kill()
            run.proc.kill()
            run.finish()
    text = "".join(run.lines)
    (tmp_path / "stopped.log").write_text(text)
    stopped = {int(n) for n in re.findall(r"stopped by SIGTERM at step (\d+)", text)}
    assert len(stopped) == 1 and 3 <= min(stopped) < 8, stopped  # the stop the ranks agreed on, after step 2
    step = stopped.pop()
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints" / f"global_step{step}").iterdir()) == [
        "stage00", "stage01"]
    launch(tmp_path, split, "resumed")
    straight = read_csv_scalar(tmp_path / "straight" / "csv" / "run" / "train_loss.csv")
    resumed = read_csv_scalar(tmp_path / "split" / "csv" / "run" / "train_loss.csv")
    assert [s for s, _ in straight] == list(range(1, 9))
    assert dict(resumed) == pytest.approx(dict(straight), rel=1e-6)
