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
    for config in configs.values():
        assert config["scheduler"]["params"]["total_num_steps"] == plan.steps
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


def write_run(run_dir: Path, evals: list[tuple[int, float, float]], train_start: float) -> None:
    """Events with chosen wall times: train/loss at step 1 (the clock's start), eval points (step, time, loss)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard" / "run"))
    writer.add_scalar("train/loss", 9.0, 1, walltime=train_start)
    for step, seconds, loss in evals:
        writer.add_scalar("train/loss", loss + 0.1, step, walltime=train_start + seconds)
        writer.add_scalar("eval/mlm_loss", loss, step, walltime=train_start + seconds)
    writer.close()


def test_report_time_to_the_baselines_final_loss(tmp_path):
    args = args_for(tmp_path, "--samples", str(16 * 40), "--eval-every", str(16 * 10))
    _, plan = compare.run_configs(args)
    out = tmp_path / "out"
    write_run(out / "baseline", [(10, 100.0, 6.0), (20, 200.0, 5.0), (30, 300.0, 4.5), (40, 400.0, 4.2)], 1e9)
    write_run(out / "pld", [(10, 80.0, 6.1), (20, 160.0, 5.1), (30, 240.0, 4.15), (40, 320.0, 4.1)], 2e9)
    text = compare.report(args, plan)
    result = json.loads((out / "report.json").read_text())
    assert result["baseline_final_loss"] == pytest.approx(4.2)
    assert result["pld_reaches_at"] == [30, pytest.approx(240.0)]  # first PLD point <= 4.2
    assert result["time_ratio"] == pytest.approx(400 / 240)
    assert "**1.67x**" in text and "| 480 | 4.5000 | 4.1500 | -0.3500 |" in text
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_when_pld_never_gets_there(tmp_path):
    args = args_for(tmp_path, "--samples", str(16 * 20), "--eval-every", str(16 * 10))
    _, plan = compare.run_configs(args)
    out = tmp_path / "out"
    write_run(out / "baseline", [(10, 10.0, 5.0), (20, 20.0, 4.0)], 1e9)
    write_run(out / "pld", [(10, 8.0, 5.5), (20, 16.0, 4.5)], 1e9)
    text = compare.report(args, plan)
    assert "does not reach the baseline's final loss (4.0000)" in text
    assert json.loads((out / "report.json").read_text())["time_ratio"] is None


@pytest.mark.slow
def test_pld_compare_end_to_end_on_cpu(tmp_path, capsys):
    make_shard_dir(tmp_path / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    with torch_threads(1):
        compare.main(["--deepspeed_config", CONFIG, "--data", str(tmp_path / "data"), "--output",
                      str(tmp_path / "out"), "--model", "tiny", "--samples", str(16 * 12), "--eval-every", "64",
                      "--eval-batches", "2", "--pld-lr", "0.004"])
    out = tmp_path / "out"
    result = json.loads((out / "report.json").read_text())
    assert [p["step"] for p in result["eval"]["baseline"]] == [4, 8, 12] == [p["step"] for p in result["eval"]["pld"]]
    assert all(math.isfinite(p["mlm_loss"]) for run in result["eval"].values() for p in run)
    assert result["lrs"] == {"baseline": 0.003, "pld": 0.004}
    run_config = json.loads((out / "pld" / "run_config.json").read_text())
    assert run_config["pld"]["enabled"] and not json.loads((out / "baseline" / "run_config.json").read_text())[
        "pld"]["enabled"]
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
                      "--eval-every", str(32 * 3), "--eval-batches", "2", "--pld-lr", "2e-3", "--gamma", "0.1"])
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["step"] for p in result["eval"]["pld"]] == [3, 6] == [p["step"] for p in result["eval"]["baseline"]]
    assert result["lrs"] == {"baseline": 0.001, "pld": 0.002} and result["pld"]["gamma"] == 0.1
    assert (tmp_path / "out" / "report.md").read_text().startswith("# pld-compare: mini")
