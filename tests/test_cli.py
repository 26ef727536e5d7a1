"""pld-pretrain from the command line: one-line input errors, and an end-to-end run with resume."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from pld_helpers import REPO, child_env, csv_segments, load_ds_config, read_csv_scalar, write_json
from shard_fixtures import make_shard_dir

from pld_ds import pld

TIMEOUT = 300
GAMMA = load_ds_config("tiny_cpu_pld.json")["progressive_layer_drop"]["gamma"]


def pretrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pld_ds.pretrain", *args]


def start(cmd: list[str], out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=stdout, stderr=stderr)


def finish(proc: subprocess.Popen, out: Path) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return rc, (out / "stdout").read_text(), (out / "stderr").read_text()


# -- input errors: exit 2, one line on stderr -----------------------------------------------------


def config_with(tmp: Path, name: str, edit) -> Path:
    config = load_ds_config("tiny_cpu_pld.json")
    edit(config)
    return write_json(tmp / name, config)


def set_pld(key, value):
    return lambda c: c["progressive_layer_drop"].__setitem__(key, value)


def error_cases(tmp: Path, data: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, fragments the one error line must contain)."""
    good = str(REPO / "ds_configs" / "tiny_cpu_pld.json")
    malformed = tmp / "malformed.json"
    malformed.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "gradient_accumulation_steps" 1\n}\n')
    empty = tmp / "empty_data"
    empty.mkdir()
    (empty / "README").write_text("no shards")
    cases = {
        "malformed_json": (str(malformed), str(data), "tiny", [str(malformed), "line 3 column 33"]),
        "theta_zero": (str(config_with(tmp, "theta0.json", set_pld("theta", 0))), str(data), "tiny",
                       ["theta0.json", "progressive_layer_drop.theta"]),
        "theta_1_5": (str(config_with(tmp, "theta15.json", set_pld("theta", 1.5))), str(data), "tiny",
                      ["theta15.json", "progressive_layer_drop.theta", "1.5"]),
        "negative_gamma": (str(config_with(tmp, "gamma.json", set_pld("gamma", -0.01))), str(data), "tiny",
                           ["gamma.json", "progressive_layer_drop.gamma"]),
        "unknown_pld_key": (str(config_with(tmp, "unknown.json", set_pld("theta_bar", 0.5))), str(data), "tiny",
                            ["unknown.json", "progressive_layer_drop.theta_bar", "unknown key"]),
        "missing_data_dir": (good, str(tmp / "no_such_dir"), "tiny", ["--data", str(tmp / "no_such_dir"),
                                                                        "no such directory"]),
        "data_dir_without_shards": (good, str(empty), "tiny", ["--data", str(empty), "no *.hdf5 shards"]),
        "unknown_model": (good, str(data), "gigantic", ["--model", "gigantic"]),
        # a bad optimizer value in the DeepSpeed JSON is an input error like the others
        "negative_lr": (str(config_with(tmp, "negative_lr.json",
                                        lambda c: c["optimizer"]["params"].__setitem__("lr", -0.001))),
                        str(data), "tiny", ["negative_lr.json"]),
        "deepspeed_batch_mismatch": (str(config_with(tmp, "batch7.json",
                                                     lambda c: c.__setitem__("train_batch_size", 7))),
                                     str(data), "tiny", ["batch7.json", "train_batch_size"]),
    }
    runs = {name: (["--deepspeed_config", cfg, "--data", d, "--output", str(tmp / "out" / name), "--model", model,
                    "--max-steps", "2"], fragments) for name, (cfg, d, model, fragments) in cases.items()}
    missing = str(tmp / "no_checkpoint_here")
    runs["resume_missing"] = (["--deepspeed_config", good, "--data", str(data), "--output", str(tmp / "out" / "r"),
                               "--model", "tiny", "--max-steps", "2", "--resume", missing],
                              ["--resume", missing, "no such checkpoint"])
    return runs


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Every error case at once (each costs a second of CPU to import torch and DeepSpeed)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    data = make_shard_dir(tmp / "data")
    cases = error_cases(tmp, data)
    procs = {name: start(pretrain_cmd(*args), tmp / "logs" / name) for name, (args, _) in cases.items()}
    return {name: (*finish(proc, tmp / "logs" / name), cases[name][1]) for name, proc in procs.items()}


ERROR_CASES = ["malformed_json", "theta_zero", "theta_1_5", "negative_gamma", "unknown_pld_key", "missing_data_dir",
               "data_dir_without_shards", "unknown_model", "negative_lr", "deepspeed_batch_mismatch", "resume_missing"]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_input_error_is_one_line_exit_2(error_runs, name):
    rc, stdout, stderr, fragments = error_runs[name]
    assert "Traceback" not in stderr + stdout, stderr[-2000:]
    assert rc == 2, stderr[-2000:]
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("pld-pretrain: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_error_cases_are_all_run(error_runs):
    assert sorted(error_runs) == sorted(ERROR_CASES)


def test_bad_flag_value_is_an_argparse_error(tmp_path):
    proc = subprocess.run(pretrain_cmd("--deepspeed_config", "x.json", "--data", "d", "--output", "o",
                                       "--max-steps", "0"), cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert "--max-steps must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- end to end -----------------------------------------------------------------------------------

COMMON = ["--model", "tiny", "--log-interval", "10", "--eval-interval", "20", "--save-interval", "20",
          "--eval-batches", "4"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Run A: 40 steps, then --resume auto to 50. Run B: 50 steps straight (beside A's first part)."""
    tmp = tmp_path_factory.mktemp("e2e")
    data = make_shard_dir(tmp / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    config = str(REPO / "ds_configs" / "tiny_cpu_pld.json")
    base = ["--deepspeed_config", config, "--data", str(data), *COMMON]
    a_out, b_out = tmp / "a", tmp / "b"
    first = start(pretrain_cmd(*base, "--output", str(a_out), "--max-steps", "40"), tmp / "logs" / "a1")
    straight = start(pretrain_cmd(*base, "--output", str(b_out), "--max-steps", "50"), tmp / "logs" / "b")
    runs = {"a1": finish(first, tmp / "logs" / "a1"), "b": finish(straight, tmp / "logs" / "b")}
    if runs["a1"][0] == 0:
        resumed = start(pretrain_cmd(*base, "--output", str(a_out), "--max-steps", "50", "--resume", "auto"),
                        tmp / "logs" / "a2")
        runs["a2"] = finish(resumed, tmp / "logs" / "a2")
    return {"runs": runs, "a": a_out, "b": b_out, "data": data}


def logged_steps(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step\s+(\d+)\s", stdout, flags=re.M)]


def test_e2e_runs_succeed(e2e):
    for name, (rc, _stdout, stderr) in e2e["runs"].items():
        assert rc == 0, (name, stderr[-3000:])
        assert "Traceback" not in stderr
    assert set(e2e["runs"]) == {"a1", "b", "a2"}


def test_e2e_outputs(e2e):
    out = e2e["a"]
    assert list((out / "tensorboard" / "run").glob("events.out.tfevents.*"))
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "global_step50"  # after the resumed run
    assert (checkpoints / "global_step20").is_dir() and (checkpoints / "global_step40").is_dir()
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["model"]["hidden_size"] == 64 and run_config["model"]["num_layers"] == 4
    assert run_config["model"]["vocab_size"] == 128  # manifest's 100 padded to a multiple of 64
    assert run_config["pld"] == {"enabled": True, "theta": 0.5, "gamma": GAMMA}
    assert "progressive_layer_drop" not in run_config["deepspeed"]
    assert run_config["deepspeed"]["csv_monitor"]["output_path"] == str(out / "csv")
    assert run_config["args"]["max_steps"] == 50


def test_e2e_tensorboard_has_theta(e2e):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((e2e["b"] / "tensorboard" / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    scalars = acc.Scalars("train/pld_theta")
    assert [s.step for s in scalars] == [10, 20, 30, 40, 50]
    for s in scalars:  # the row of step s: the theta step s ran with, theta(s - 1)
        assert s.value == pytest.approx(pld.theta(s.step - 1, 0.5, GAMMA), rel=1e-6)
    assert "eval/mlm_loss" in acc.Tags()["scalars"]


def test_e2e_theta_and_loss_in_csv(e2e):
    csv_dir = e2e["a"] / "csv" / "run"
    first, second = csv_segments(csv_dir / "train_pld_theta.csv")
    assert [s for s, _ in first] == [10, 20, 30, 40]
    assert all(a[1] > b[1] for a, b in pairwise(first + second))
    for step, value in first + second:  # the theta each logged step ran with, the resumed run's too
        assert value == pld.theta(step - 1, 0.5, GAMMA)
    assert second == [(50, pld.theta(49, 0.5, GAMMA))]
    losses = read_csv_scalar(csv_dir / "train_loss.csv")
    assert [s for s, _ in losses] == [10, 20, 30, 40, 50]
    assert all(math.isfinite(v) for _, v in losses)
    depth = read_csv_scalar(csv_dir / "train_expected_depth.csv")
    assert [v for _, v in depth] == [pld.expected_depth(4, pld.theta(s - 1, 0.5, GAMMA)) for s, _ in depth]
    # evaluation at step 20 (interval) and at the end of each run
    assert [s for s, _ in read_csv_scalar(csv_dir / "eval_mlm_loss.csv")] == [20, 40, 50]


def test_e2e_resume_continues_at_step_41(e2e):
    rc, stdout, _ = e2e["runs"]["a2"]
    assert logged_steps(stdout) == [50]
    assert logged_steps(e2e["runs"]["a1"][1]) == [10, 20, 30, 40]
    # DeepSpeed logs the learning rate at every step against samples seen: 16 samples per step
    first, second = csv_segments(e2e["a"] / "csv" / "run" / "Train_Samples_lr.csv")
    assert [s // 16 for s, _ in first] == list(range(1, 41))
    assert [s // 16 for s, _ in second] == list(range(41, 51))


def test_e2e_resumed_run_equals_uninterrupted_run(e2e):
    """Weights, optimizer, schedule, data position, dropout RNG and PLD gates all resume exactly."""
    resumed = dict(read_csv_scalar(e2e["a"] / "csv" / "run" / "train_loss.csv"))
    straight = dict(read_csv_scalar(e2e["b"] / "csv" / "run" / "train_loss.csv"))
    assert sorted(straight) == [10, 20, 30, 40, 50]
    for step in (10, 20, 30, 40, 50):
        assert resumed[step] == straight[step], step
    eval_resumed = read_csv_scalar(e2e["a"] / "csv" / "run" / "eval_mlm_loss.csv")[-1]
    eval_straight = read_csv_scalar(e2e["b"] / "csv" / "run" / "eval_mlm_loss.csv")[-1]
    assert eval_resumed == eval_straight


def test_e2e_loss_decreases(e2e):
    losses = [v for _, v in read_csv_scalar(e2e["b"] / "csv" / "run" / "train_mlm_loss.csv")]
    assert losses[-1] < losses[0]


# -- pretrain's helpers, in process ---------------------------------------------------------------


def test_data_folders(tmp_path):
    from pld_ds.pretrain import data_folders

    root = make_shard_dir(tmp_path / "split", validation=16)
    train, valid = data_folders(str(root), None)
    assert [p.parent.name for p in train] == ["train", "train"] and [p.parent.name for p in valid] == ["validation"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in train:
        (flat / p.name).write_bytes(p.read_bytes())
    train_flat, valid_flat = data_folders(str(flat), None)
    assert [p.name for p in train_flat] == [p.name for p in train] and valid_flat == []
    _, explicit = data_folders(str(flat), str(root / "validation"))
    assert explicit == valid


def test_data_vocabulary(tmp_path, capsys):
    from pld_ds.config import ConfigError
    from pld_ds.pretrain import BERT_VOCAB_SIZE, data_vocabulary

    root = make_shard_dir(tmp_path / "d")
    assert data_vocabulary(str(root), None) == (100, None)
    assert data_vocabulary(str(root), 100) == (100, None) and capsys.readouterr().err == ""
    # a larger --vocab-size is an explicit override: it holds, and says what it costs
    assert data_vocabulary(str(root), 555) == (555, None)
    warning = capsys.readouterr().err
    assert warning.startswith("pld-pretrain: warning: --vocab-size 555 overrides") and warning.count("\n") == 1
    assert "vocab.size 100" in warning and "455 extra embedding rows" in warning
    with pytest.raises(ConfigError, match=r"--vocab-size 99: smaller than .*manifest\.json: vocab\.size 100"):
        data_vocabulary(str(root), 99)
    assert data_vocabulary(str(tmp_path), None) == (BERT_VOCAB_SIZE, None)
    # a vocab file named by the manifest gives the ids dynamic masking needs
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]))
    (root / "manifest.json").write_text('{"vocab": {"size": 7, "file": "vocab.txt"}}')
    size, masking = data_vocabulary(str(root), None)
    assert size == 7 and masking.mask_id == 4 and set(masking.special_ids) == {0, 1, 2, 3, 4}
    (root / "vocab.txt").write_text("the\na\n")
    with pytest.raises(ConfigError, match=r"vocab\.txt: no \[MASK\]"):
        data_vocabulary(str(root), None)
    (root / "manifest.json").write_text('{"vocab": {"size": "100"}}')
    with pytest.raises(ConfigError, match=r"manifest\.json: vocab"):
        data_vocabulary(str(root), None)


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    from pld_ds.pretrain import rng_state, set_rng_state

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_throughput_after_resume_counts_only_new_samples(tmp_path, monkeypatch):
    """samples/s (and the TFLOP/s derived from it) after a resume must count the samples of this run's steps,
    not every sample since step 0. A fake clock advances one second per reading."""
    import itertools
    from types import SimpleNamespace

    from pld_helpers import torch_threads

    from pld_ds import metrics, pretrain

    clock = itertools.count()
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    data = make_shard_dir(tmp_path / "data")
    common = ["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data", str(data),
              "--output", str(tmp_path / "out"), "--model", "tiny", "--log-interval", "2"]
    with torch_threads(1):
        fresh = pretrain.run(pretrain.parse_args([*common, "--max-steps", "2"]))
        assert fresh["train/samples_per_sec"] == 2 * 16  # two steps of 16 samples in one fake second
        resumed = pretrain.run(pretrain.parse_args([*common, "--max-steps", "4", "--resume", "auto"]))
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert resumed["train/samples_per_sec"] == 2 * 16


@pytest.mark.slow
def test_wandb_block_logs_our_scalars_offline(tmp_path):
    """DeepSpeed logs its own series to wandb with the sample count as wandb's step; ours must not be dropped as
    'partial history' behind it, and the run folder goes under --output."""
    pytest.importorskip("wandb")
    config = load_ds_config("tiny_cpu_pld.json")
    config["wandb"] = {"enabled": True, "project": "pld_ds_test"}
    path = write_json(tmp_path / "wandb.json", config)
    data = make_shard_dir(tmp_path / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    env = {**child_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run(pretrain_cmd("--deepspeed_config", str(path), "--data", str(data), "--output",
                                       str(tmp_path / "out"), "--model", "tiny", "--max-steps", "3",
                                       "--log-interval", "1"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert "ignoring partial history" not in (run_dir / "logs" / "debug-internal.log").read_text()
    (records,) = run_dir.glob("run-*.wandb")
    for tag in (b"train/pld_theta", b"train/expected_depth", b"train/loss", b"eval/mlm_loss"):
        assert tag in records.read_bytes(), tag


def test_compiled_layers_train_like_eager_layers(tmp_path):
    """--compile BACKEND (aot_eager here: dynamo's graph capture without inductor's code generation, which
    takes minutes on CPU): the same losses as the eager run, step for step, with PLD dropping layers."""
    from pld_helpers import torch_threads

    from pld_ds import pld, pretrain

    data = make_shard_dir(tmp_path / "data")
    config = config_with(tmp_path, "fast_decay.json", set_pld("gamma", 1.0))
    common = ["--deepspeed_config", str(config), "--data", str(data), "--model", "tiny", "--log-interval", "1",
              "--max-steps", "4", "--eval-batches", "1", "--seed", "42"]
    gates = [pld.sample_gates(4, pld.theta(step, 0.5, 1.0), pld.gate_generator(42, step, 0)) for step in range(4)]
    assert any(not kept for step in gates for kept, _ in step)
    losses = {}
    with torch_threads(1):
        for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
            pretrain.run(pretrain.parse_args([*common, "--output", str(tmp_path / name), *extra]))
            losses[name] = read_csv_scalar(tmp_path / name / "csv" / "run" / "train_loss.csv")
    assert [s for s, _ in losses["compiled"]] == [1, 2, 3, 4]
    for (_, eager), (_, compiled) in zip(losses["eager"], losses["compiled"], strict=True):
        assert compiled == pytest.approx(eager, rel=1e-5)


def test_readme_names_every_preset_and_every_shipped_config():
    from pld_ds.config import MODEL_PRESETS

    readme = (REPO / "README.md").read_text()
    model_section = readme.split("\n## Model\n")[1].split("\n## ")[0]
    assert [name for name in MODEL_PRESETS if f"`{name}`" not in model_section] == []
    configs_section = readme.split("\n## DeepSpeed configs\n")[1].split("\n## ")[0]
    rows = [line.split("|")[1].strip().strip("`") for line in configs_section.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(f"ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json"))
