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
    assert "| pld | pre | on (0.5, 0.01) | 0.003 | 4.1000 | 1/1 | 480 | 240 | 1.67 | 1.33 | 0.800 |" in text
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
    assert "| postln | post | off |" in report and "| pld | pre | on (0.5, 0.01) | 1e-09 |" in report
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
