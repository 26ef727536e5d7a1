"""pld-compare: two runs from one config, and the report's arithmetic on events with known times."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pld_helpers import REPO, torch_threads
from shard_fixtures import make_shard_dir

from pld_ds import compare

CONFIG = str(REPO / "ds_configs" / "tiny_cpu_pld.json")


def args_for(tmp_path: Path, *extra: str):
    return compare.parse_args(["--deepspeed_config", CONFIG, "--data", str(tmp_path / "data"), "--output",
                               str(tmp_path / "out"), "--model", "tiny", *extra])


def test_run_configs_differ_only_in_pld_and_lr(tmp_path):
    args = args_for(tmp_path, "--samples", "1000", "--baseline-lr", "4e-4", "--pld-lr", "1e-3", "--eval-every", "160")
    configs, plan = compare.run_configs(args)
    base, pld_run = configs["baseline"], configs["pld"]
    assert base["progressive_layer_drop"] == {"enabled": False}
    assert pld_run["progressive_layer_drop"] == {"enabled": True, "theta": 0.5, "gamma": 0.01}  # the config's block
    assert base["optimizer"]["params"]["lr"] == 4e-4 and base["scheduler"]["params"]["warmup_max_lr"] == 4e-4
    assert pld_run["optimizer"]["params"]["lr"] == 1e-3 and pld_run["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    for config in configs.values():  # one schedule, long enough for an arm that continues to the cap
        assert config["scheduler"]["params"]["total_num_steps"] == plan.cap_steps == 95  # ceil(63 * 1.5)
    assert (plan.global_batch, plan.steps, plan.eval_interval) == (16, 63, 10)  # ceil(1000 / 16), 160 / 16
    assert plan.lrs == {"baseline": 4e-4, "pld": 1e-3}
    strip = {k: v for k, v in base.items() if k not in ("progressive_layer_drop", "optimizer", "scheduler")}
    assert strip == {k: v for k, v in pld_run.items() if k not in ("progressive_layer_drop", "optimizer", "scheduler")}


def test_theta_and_gamma_flags_are_validated(tmp_path):
    configs, plan = compare.run_configs(args_for(tmp_path, "--samples", "64", "--theta", "0.7", "--gamma", "0.02"))
    assert plan.pld == {"enabled": True, "theta": 0.7, "gamma": 0.02}
    with pytest.raises(compare.ConfigError, match="theta"):
        compare.run_configs(args_for(tmp_path, "--samples", "64", "--theta", "1.5"))


@pytest.mark.parametrize("flags, message", [(["--samples", "0"], "--samples must be >= 1"),
                                            (["--samples", "9", "--pld-lr", "-1"], "--pld-lr must be a positive")])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        args_for(tmp_path, *flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_arms_postln_model_and_per_arm_pld(tmp_path):
    args = args_for(tmp_path, "--samples", "320", "--arm", "post:ln=post,lr=1e-4", "--arm", "pre:lr=1e-3",
                    "--arm", "pld:pld=on,lr=2e-3,theta=0.6", "--reference", "post", "--seeds", "1", "2")
    configs, plan = compare.run_configs(args)
    assert list(configs) == ["post", "pre", "pld"] and compare.reference_of(args) == "post"
    assert configs["post"]["progressive_layer_drop"] == {"enabled": False} == configs["pre"]["progressive_layer_drop"]
    assert configs["pld"]["progressive_layer_drop"] == {"enabled": True, "theta": 0.6, "gamma": 0.01}
    assert plan.lrs == {"post": 1e-4, "pre": 1e-3, "pld": 2e-3}
    assert plan.arms["post"]["layer_norm"] == "post" and plan.arms["pld"]["layer_norm"] == "pre"
    assert compare.run_dir(args, "pld", 2) == tmp_path / "out" / "pld" / "seed2"
    (tmp_path / "m").mkdir()
    post_model = compare.model_file(args, compare.parse_arm("post:ln=post"), tmp_path / "m")
    from pld_ds.config import model_config

    assert model_config(post_model).layer_norm == "post" and model_config(post_model).num_layers == 4
    assert compare.model_file(args, compare.parse_arm("pre"), tmp_path / "m") == "tiny"


@pytest.mark.parametrize("flags, message", [
    (["--samples", "9", "--arm", "a:ln=side"], "arm a: 'ln=side': expected ln=pre|post"),
    (["--samples", "9", "--arm", "a:lr=0"], "arm a: 'lr=0'"),
    (["--samples", "9", "--arm", "a b"], "arm 'a b': expected NAME:KEY=VALUE"),
    (["--samples", "9", "--arm", "a", "--arm", "a:lr=1"], "names must differ"),
    (["--samples", "9", "--arm", "a", "--reference", "b"], "--reference b: no such arm"),
    (["--samples", "9", "--arm", "a", "--pld-lr", "1e-3"], "with --arm give each arm its lr="),
    (["--samples", "9", "--cap", "0.5"], "--cap must be a number >= 1")])
def test_bad_arms_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        args_for(tmp_path, *flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


def write_run(run_dir: Path, evals: list[tuple[int, float, float]], train_start: float,
              samples_per_sec: float | None = None) -> None:
    """Events with chosen wall times: train/loss at step 1 (the clock's start), eval points (step, time, loss),
    and a constant logged throughput (plus one slow interval that holds an evaluation)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard" / "run"))
    writer.add_scalar("train/loss", 9.0, 1, walltime=train_start)
    for step, seconds, loss in evals:
        writer.add_scalar("train/loss", loss + 0.1, step, walltime=train_start + seconds)
        writer.add_scalar("eval/mlm_loss", loss, step, walltime=train_start + seconds)
        if samples_per_sec is not None:
            writer.add_scalar("train/samples_per_sec", samples_per_sec / (5 if step == evals[0][0] else 1), step,
                              walltime=train_start + seconds)
    writer.close()


def test_report_time_to_the_references_final_loss(tmp_path):
    args = args_for(tmp_path, "--samples", str(16 * 40), "--eval-every", str(16 * 10))
    _, plan = compare.run_configs(args)
    out = tmp_path / "out"
    write_run(out / "baseline", [(10, 100.0, 6.0), (20, 200.0, 5.0), (30, 300.0, 4.5), (40, 400.0, 4.2)], 1e9, 10.0)
    write_run(out / "pld", [(10, 80.0, 6.1), (20, 160.0, 5.1), (30, 240.0, 4.15), (40, 320.0, 4.1)], 2e9, 12.5)
    text = compare.report(args, plan)
    result = json.loads((out / "report.json").read_text())
    assert result["target"] == pytest.approx(4.2)
    pld_run = result["arms"]["pld"]["42"]
    assert pld_run["reached"] == [30, pytest.approx(240.0)]  # first PLD point <= 4.2
    assert pld_run["samples_to_target"] == 30 * 16
    assert pld_run["time_ratio"] == pytest.approx(400 / 240)
    assert pld_run["time_per_sample_vs_reference"] == pytest.approx(10 / 12.5)  # medians: the slow interval is out
    assert "| pld | dp x1 | pre | on (0.5, 0.01) | 0.003 | 4.1000 | 1/1 | 480 | 240 | 1.67 | 1.33 | 0.800 |" in text
    assert "**pld** reaches 4.2000 sooner than baseline: 1.67x its speed, 1.33x in samples." in text
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_means_and_spreads_over_seeds(tmp_path):
    args = args_for(tmp_path, "--samples", str(16 * 20), "--eval-every", str(16 * 10), "--seeds", "1", "2",
                    "--arm", "ref", "--arm", "fast:pld=on")
    _, plan = compare.run_configs(args)
    out = tmp_path / "out"
    write_run(out / "ref" / "seed1", [(10, 10.0, 5.0), (20, 20.0, 4.1)], 1e9)
    write_run(out / "ref" / "seed2", [(10, 10.0, 5.0), (20, 30.0, 3.9)], 1e9)  # target: mean 4.0
    write_run(out / "fast" / "seed1", [(10, 5.0, 3.95), (20, 10.0, 3.5)], 1e9)  # 20 / 5 = 4x
    write_run(out / "fast" / "seed2", [(10, 5.0, 4.5), (20, 15.0, 3.8), (30, 20.0, 3.6)], 1e9)  # 30 / 15 = 2x
    text = compare.report(args, plan)
    result = json.loads((out / "report.json").read_text())
    assert result["target"] == pytest.approx(4.0)
    assert [result["arms"]["fast"][s]["time_ratio"] for s in ("1", "2")] == [pytest.approx(4.0), pytest.approx(2.0)]
    assert result["arms"]["fast"]["2"]["final_loss"] == pytest.approx(3.8)  # at the budget (step 20), not the cap
    assert "3.00 ± 1.41" in text and "| 4.0000 ± 0.1414 |" in text  # ratios 4 and 2; ref finals 4.1 and 3.9
    assert "fast** reaches 4.0000 sooner than ref: 3.00x its speed (± 1.41 over 2 seeds), 1.50x in samples" in text


def test_report_when_an_arm_never_gets_there(tmp_path):
    args = args_for(tmp_path, "--samples", str(16 * 20), "--eval-every", str(16 * 10))
    _, plan = compare.run_configs(args)
    out = tmp_path / "out"
    write_run(out / "baseline", [(10, 10.0, 5.0), (20, 20.0, 4.0)], 1e9)
    write_run(out / "pld", [(10, 8.0, 5.5), (20, 16.0, 4.5), (30, 24.0, 4.2)], 1e9)
    text = compare.report(args, plan)
    assert "**pld** does not reach 4.0000 in the 30 steps it ran (cap 30; its best: 4.2000)" in text
    assert json.loads((out / "report.json").read_text())["arms"]["pld"]["42"]["time_ratio"] is None


@pytest.mark.slow
def test_three_arms_end_to_end_on_cpu(tmp_path, capsys):
    """PostLN baseline, PreLN baseline and PreLN + PLD, real runs on a tiny model; the PLD arm's learning rate is
    too small to reach the reference's loss, so it goes on to the cap. (Several seeds: the report tests above.)"""
    make_shard_dir(tmp_path / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    with torch_threads(1):
        compare.main(["--deepspeed_config", CONFIG, "--data", str(tmp_path / "data"), "--output",
                      str(tmp_path / "out"), "--model", "tiny", "--samples", str(16 * 4), "--eval-every", "32",
                      "--eval-batches", "2", "--seeds", "7", "--cap", "1.5",
                      "--arm", "postln:ln=post,lr=3e-3", "--arm", "preln:lr=3e-3", "--arm", "pld:pld=on,lr=1e-9",
                      "--reference", "postln"])
    out = tmp_path / "out"
    result = json.loads((out / "report.json").read_text())
    assert result["seeds"] == [7] and set(result["arms"]) == {"postln", "preln", "pld"}
    assert [p["step"] for p in result["arms"]["postln"]["7"]["eval"]] == [2, 4]
    assert [p["step"] for p in result["arms"]["pld"]["7"]["eval"]] == [2, 4, 6]  # continued to the cap
    assert result["arms"]["pld"]["7"]["reached"] is None
    assert all(math.isfinite(p["mlm_loss"]) for arm in result["arms"].values() for p in arm["7"]["eval"])
    assert all(arm["7"]["samples_per_sec"] > 0 for arm in result["arms"].values())
    post = json.loads((out / "postln" / "run_config.json").read_text())
    assert post["model"]["layer_norm"] == "post" and not post["pld"]["enabled"]
    pld_run = json.loads((out / "pld" / "run_config.json").read_text())
    assert pld_run["model"]["layer_norm"] == "pre" and pld_run["pld"]["enabled"] and pld_run["args"]["seed"] == 7
    report = (out / "report.md").read_text()
    assert "| postln | dp x1 | post | off |" in report and "| pld | dp x1 | pre | on (0.5, 0.01) | 1e-09 |" in report
    assert "pld-compare: report in" in capsys.readouterr().out


@pytest.mark.slow
def test_pld_compare_on_the_mini_preset_over_real_text(tmp_path):
    """pld-prep on one real WikiExtractor file, then pld-compare with the mini preset on a tiny budget."""
    from conftest import SHARED_DATA

    from data_prep import cli as prep_cli

    wiki = sorted((SHARED_DATA / "wiki").glob("*.txt"))
    if not wiki:
        pytest.skip("no ../shared/data/wiki here")
    data = tmp_path / "shards"
    assert prep_cli.main(["--input", str(wiki[0]), "--output", str(data), "--train-vocab", "2000",
                          "--max-seq-length", "64", "--max-predictions-per-seq", "10", "--dupe-factor", "1",
                          "--num-shards", "2", "--workers", "1", "--validation-fraction", "0.05"]) == 0
    with torch_threads(1):
        compare.main(["--deepspeed_config", str(REPO / "ds_configs" / "quickstart_cpu.json"), "--data", str(data),
                      "--output", str(tmp_path / "out"), "--model", "mini", "--samples", str(32 * 6),
                      "--eval-every", str(32 * 3), "--eval-batches", "2", "--pld-lr", "2e-3", "--gamma", "0.1",
                      "--cap", "1"])
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["step"] for p in result["arms"]["pld"]["42"]["eval"]] == [3, 6]
    assert [p["step"] for p in result["arms"]["baseline"]["42"]["eval"]] == [3, 6]
    assert result["lrs"]["pld"] == 0.002 and result["pld"]["gamma"] == 0.1
    assert (tmp_path / "out" / "report.md").read_text().startswith("# pld-compare: mini")


# -- arms with their own parallel layout ----------------------------------------------------------------------


def layout_args(tmp_path: Path, world: int, *arms: str, config: str = CONFIG):
    return compare.parse_args(["--deepspeed_config", config, "--data", str(tmp_path / "data"), "--output",
                               str(tmp_path / "out"), "--model", "tiny", "--samples", "320", "--world-size",
                               str(world), "--launcher", f"deepspeed --num_gpus {world}",
                               *[x for arm in arms for x in ("--arm", arm)]])


def test_arms_with_their_own_layout_keep_the_global_batch(tmp_path):
    """Data parallel over two ranks against a two-stage pipeline, sync and Ouroboros, on the same two ranks: one
    replica instead of two, so two micro-batches per step instead of one; nothing else differs."""
    args = layout_args(tmp_path, 2, "dp:stages=1", "sync:stages=2", "ouro:stages=2,schedule=ouroboros,warmup=3",
                       "slow:stages=2,schedule=ouroboros,staleness=2")
    configs, plan = compare.run_configs(args)
    assert plan.global_batch == 16 * 2  # the config's: micro-batch 16, no accumulation, two replicas
    assert "pipeline" not in configs["dp"] and configs["dp"]["gradient_accumulation_steps"] == 1
    assert configs["sync"]["pipeline"] == {"stages": 2} and configs["sync"]["gradient_accumulation_steps"] == 2
    assert configs["ouro"]["pipeline"] == {"stages": 2, "schedule": "ouroboros", "warmup_steps": 3}
    assert configs["slow"]["pipeline"]["staleness"] == 2 and configs["ouro"]["gradient_accumulation_steps"] == 2
    assert {name: arm["layout"] for name, arm in plan.arms.items()} == {
        "dp": "dp x2", "sync": "sync K=2", "ouro": "ouroboros K=2, warm-up 3", "slow": "ouroboros K=2, staleness 2"}
    common = [{k: v for k, v in c.items() if k not in ("pipeline", "gradient_accumulation_steps")}
              for c in configs.values()]
    assert all(c == common[0] for c in common)


def test_an_arm_overrides_the_configs_pipeline(tmp_path):
    config = json.loads(Path(CONFIG).read_text())
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
                  pipeline={"stages": 2, "schedule": "ouroboros", "warmup_steps": 5})
    (tmp_path / "pipe.json").write_text(json.dumps(config))
    args = layout_args(tmp_path, 4, "as_is", "dp:stages=1", "sync:schedule=sync", "k4:stages=4",
                       config=str(tmp_path / "pipe.json"))
    configs, plan = compare.run_configs(args)
    assert plan.global_batch == 4 * 2 * 2  # two replicas of the config's two stages
    assert configs["as_is"]["pipeline"] == config["pipeline"] and plan.arms["as_is"]["layout"] == (
        "ouroboros K=2 x2, warm-up 5")
    assert "pipeline" not in configs["dp"] and configs["dp"]["gradient_accumulation_steps"] == 1  # 4 replicas
    assert configs["sync"]["pipeline"] == {"stages": 2, "schedule": "sync"}  # Ouroboros' warm-up left behind
    assert configs["k4"]["pipeline"]["stages"] == 4 and configs["k4"]["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize("arm, message", [
    ("a:stages=0", "arm a: 'stages=0': expected stages=INTEGER>=1"),
    ("a:schedule=gpipe", "arm a: 'schedule=gpipe': expected schedule=sync|ouroboros"),
    ("a:staleness=-1", "arm a: 'staleness=-1': expected staleness=ddg|INTEGER>=0"),
    ("a:stage=2", "arm a: 'stage=2': unknown key 'stage' (expected KEY=VALUE with KEY one of ln, pld, lr")])
def test_bad_layout_keys_are_one_line(tmp_path, capsys, arm, message):
    with pytest.raises(SystemExit) as exit_:
        layout_args(tmp_path, 2, arm)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("world, arm, message", [
    (2, "a:stages=3", "arm a: pipeline.stages: 3 stages do not divide the world size 2"),
    (8, "a:stages=8", "arm a: pipeline.stages: 8 stages for a model of 4 layers"),
    (2, "a:schedule=ouroboros", "arm a: schedule=ouroboros: needs a pipeline"),
    (2, "a:stages=1,warmup=2", "arm a: warmup=2: needs a pipeline"),
    (2, "a:stages=2,warmup=2", "arm a: warmup=2: only the ouroboros schedule has a warm-up"),
    (2, "a:stages=2,staleness=1", "arm a: pipeline.staleness: the sync schedule has no stale gradients"),
    (1, "a:stages=2", "arm a: pipeline.stages: 2 stages do not divide the world size 1")])
def test_layouts_that_do_not_fit_name_the_arm_and_key(tmp_path, world, arm, message):
    with pytest.raises(compare.ConfigError) as err:
        compare.run_configs(layout_args(tmp_path, world, "ok", arm))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_arm_that_cannot_keep_the_global_batch_says_so(tmp_path):
    config = json.loads(Path(CONFIG).read_text())
    config.update(pipeline={"stages": 2})  # micro-batch 16 on 2 replicas of 2 stages: 32 samples a step
    (tmp_path / "pipe.json").write_text(json.dumps(config))
    with pytest.raises(compare.ConfigError, match=r"arm dp: stages=1: the global batch of 32 samples is not a whole "
                                                  r"number of micro-batches of 16 on each of its 4 replicas"):
        compare.run_configs(layout_args(tmp_path, 4, "pipe", "dp:stages=1", config=str(tmp_path / "pipe.json")))


@pytest.mark.slow
def test_data_parallel_sync_and_ouroboros_arms_end_to_end(tmp_path, monkeypatch):
    """Three layouts of the same two ranks in one report: data parallel, a sync pipeline of two stages and an
    Ouroboros one, real runs of a tiny model through the launcher, four steps of the same global batch each."""
    from pld_helpers import console_script, free_port, read_csv_scalar

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_shard_dir(tmp_path / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    config = json.loads(Path(CONFIG).read_text())
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    compare.main(["--deepspeed_config", str(tmp_path / "ds.json"), "--data", str(tmp_path / "data"), "--output",
                  str(out), "--model", "tiny", "--samples", str(8 * 4), "--eval-every", "16", "--eval-batches", "2",
                  "--seeds", "3", "--cap", "1", "--world-size", "2",
                  "--launcher", f"{console_script('deepspeed')} --num_gpus 2 --master_port {free_port()}",
                  "--arm", "dp:stages=1", "--arm", "sync:stages=2", "--arm", "ouro:stages=2,schedule=ouroboros"])
    result = json.loads((out / "report.json").read_text())
    assert result["global_batch"] == 8 and result["reference"] == "dp"
    for arm in ("dp", "sync", "ouro"):
        assert [p["step"] for p in result["arms"][arm]["3"]["eval"]] == [2, 4]
        assert all(math.isfinite(p["mlm_loss"]) for p in result["arms"][arm]["3"]["eval"])
        assert result["arms"][arm]["3"]["samples_per_sec"] > 0
    written = {arm: json.loads((out / "configs" / f"{arm}.json").read_text()) for arm in ("dp", "sync", "ouro")}
    assert "pipeline" not in written["dp"] and written["ouro"]["pipeline"] == {"stages": 2, "schedule": "ouroboros"}
    for arm, accumulation in (("dp", 1), ("sync", 2), ("ouro", 2)):  # what each run's engine took
        resolved = json.loads((out / arm / "run_config.json").read_text())["deepspeed"]
        assert resolved["gradient_accumulation_steps"] == accumulation
    # what each pipeline ran: the last stage is never stale; Ouroboros' stage 0 is one step stale, sync's is not
    for arm, stale in (("sync", 0.0), ("ouro", 1.0)):
        rows = read_csv_scalar(out / arm / "csv" / "run" / "pipeline_staleness_stage0.csv")
        assert rows and all(value == stale for _, value in rows), (arm, rows)
    assert not (out / "dp" / "csv" / "run" / "pipeline_staleness_stage0.csv").exists()
    report = (out / "report.md").read_text()
    assert "| dp | dp x2 | pre | off | 0.003 |" in report  # no arm asks for PLD
    assert "| sync | sync K=2 | pre |" in report and "| ouro | ouroboros K=2 | pre |" in report
    assert "micro-batches per rank and step: dp 1, sync 2, ouro 2" in report
