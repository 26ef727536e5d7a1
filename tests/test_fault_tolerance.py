"""Crash-safe checkpoints, exact resume after SIGKILL, pre-emption signals, NaN losses, a rank that dies."""

from __future__ import annotations

import errno
import math
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from fault_injection import Run, command, final_state, make_data, partial_folders, reference, trial
from pld_helpers import REPO, child_env, console_script, free_port, torch_threads

from pld_ds import checkpoint
from pld_ds.checkpoint import Checkpointer, CheckpointError, newest, safe_load

# -- Checkpointer, with a stand-in engine that writes files the way DeepSpeed does -----------------


class FakeEngine:
    def __init__(self, fail_after: int | None = None, error: OSError | None = None) -> None:
        self.global_steps, self.fail_after, self.error = 0, fail_after, error

    def save_checkpoint(self, root, client_state, *, tag, save_latest):
        assert not save_latest  # the pointer is ours to write
        folder = Path(root) / tag
        folder.mkdir(parents=True)
        for k in range(3):
            if self.fail_after is not None and k == self.fail_after:
                raise self.error or OSError(errno.ENOSPC, "No space left on device")
            torch.save({"step": torch.tensor(self.global_steps), **client_state}, folder / f"part{k}.pt")


def save_at(ckpt: Checkpointer, engine: FakeEngine, step: int) -> Path:
    engine.global_steps = step
    return ckpt.save(engine, {"data": {"epoch": 0, "batch_in_epoch": step}})


def test_save_renames_a_complete_folder_and_points_latest_at_it(tmp_path):
    ckpt, engine = Checkpointer(tmp_path / "ck"), FakeEngine()
    path = save_at(ckpt, engine, 4)
    assert path == tmp_path / "ck" / "global_step4" and len(list(path.glob("part*.pt"))) == 3
    assert (tmp_path / "ck" / "latest").read_text() == "global_step4"
    assert newest(tmp_path / "ck") == "global_step4" and not partial_folders(tmp_path / "ck")
    assert safe_load(path / "part1.pt")["data"] == {"epoch": 0, "batch_in_epoch": 4}


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    save_at(ckpt, FakeEngine(), 2)
    with pytest.raises(CheckpointError) as err:
        save_at(ckpt, FakeEngine(fail_after=2), 4)
    message = str(err.value)
    assert "\n" not in message and ".partial-global_step4" in message and "No space left on device" in message
    assert "the previous checkpoint global_step2 is intact" in message
    assert newest(tmp_path / "ck") == "global_step2" and not (tmp_path / "ck" / "global_step4").exists()
    assert not partial_folders(tmp_path / "ck")


def test_a_crash_mid_save_leaves_only_a_partial_folder_which_the_next_save_removes(tmp_path):
    root = tmp_path / "ck"
    ckpt = Checkpointer(root)
    save_at(ckpt, FakeEngine(), 2)
    (root / ".partial-global_step4").mkdir()  # what SIGKILL during DeepSpeed's write leaves
    (root / ".partial-global_step4" / "part0.pt").write_bytes(b"half")
    assert newest(root) == "global_step2"
    save_at(ckpt, FakeEngine(), 6)
    assert partial_folders(root) == [] and newest(root) == "global_step6"


def test_newest_falls_back_when_latest_is_missing_or_wrong(tmp_path):
    root = tmp_path / "ck"
    assert newest(root) is None
    for step in (2, 10, 4):
        (root / f"global_step{step}").mkdir(parents=True)
    assert newest(root) == "global_step10"  # numeric order, no pointer
    (root / "latest").write_text("global_step4")
    assert newest(root) == "global_step4"
    (root / "latest").write_text("global_step12")  # crash between the rename and the pointer of a later save...
    assert newest(root) == "global_step10"  # ...or a pointer to a deleted folder: the newest complete one
    (root / "latest").write_bytes(b"\xff\xfe")
    assert newest(root) == "global_step10"


def test_keep_last_n(tmp_path):
    ckpt, engine = Checkpointer(tmp_path / "ck", interval=2, keep=2), FakeEngine()
    for step in (2, 4, 6, 8):
        save_at(ckpt, engine, step)
    assert checkpoint.complete_tags(tmp_path / "ck") == ["global_step6", "global_step8"]
    assert Checkpointer(tmp_path / "all", keep=0).keep == 0
    everything = Checkpointer(tmp_path / "all")
    for step in (2, 4, 6):
        save_at(everything, engine, step)
    assert len(checkpoint.complete_tags(tmp_path / "all")) == 3
    assert ckpt.due(4) and not ckpt.due(5) and not everything.due(4)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt, engine = Checkpointer(tmp_path / "ck"), FakeEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 2)
    assert checkpoint.complete_tags(tmp_path / "ck") == ["global_step2"] and not partial_folders(tmp_path / "ck")


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*no earlier checkpoint exists"):
        save_at(Checkpointer(blocker / "ck"), FakeEngine(), 2)


# -- loading never unpickles arbitrary objects -----------------------------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_safe_load_refuses_arbitrary_objects(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to unpickle (builtins\.)?print: only tensors"):
        safe_load(path)
    assert "this ran" not in capsys.readouterr().out
    torch.save({"w": torch.ones(2), "meta": {"step": 3, "names": ["a", "b"]}}, path)
    assert safe_load(path)["meta"] == {"step": 3, "names": ["a", "b"]}


def test_rng_state_is_plain_data(tmp_path):
    from pld_ds.pretrain import rng_state, set_rng_state

    np.random.seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = np.random.rand(4)
    np.random.rand(10)
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    assert np.array_equal(np.random.rand(4), expected)


# -- through pld-pretrain ---------------------------------------------------------------------------

STEPS = 12


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, make_data(root / "data")


@pytest.fixture(scope="module")
def fault_setup(fault_data):
    root, data = fault_data
    return root, data, reference(data, root / "reference", STEPS)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(fault_setup):
    """Five trials, each killed 1-3 times (after random steps, or while a checkpoint is written)."""
    root, data, expected = fault_setup
    rng = np.random.default_rng(2024)
    results = [trial(data, root / f"trial{k}", STEPS, expected, rng) for k in range(5)]
    assert all(ok for ok, _ in results), results
    assert any("kill in save" in detail for _, detail in results)  # the checkpoint window was hit


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_143(fault_setup):
    root, data, expected = fault_setup
    out = root / "sigterm"
    run = Run(command(data, out, STEPS))
    assert run.wait_for(lambda: run.last_step >= 3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM
    text = "".join(run.lines)
    stopped = int(text.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 3 <= stopped < STEPS and "Traceback" not in text
    assert newest(out / "checkpoints") == f"global_step{stopped}"
    again = Run(command(data, out, STEPS))
    assert again.finish() == 0
    weights, losses = final_state(out, STEPS)
    assert losses == expected[1] and all(torch.equal(weights[k], v) for k, v in expected[0].items())


@pytest.fixture
def nan_after(monkeypatch):
    """Make the training loss NaN for chosen forward calls (counted over training forwards)."""
    from pld_ds.model import BertForPreTraining

    original, calls, bad = BertForPreTraining.forward, [0], set()

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in bad:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BertForPreTraining, "forward", forward)
    return bad


def pretrain_args(data, out, *extra):
    from pld_ds import pretrain

    return pretrain.parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"),
                                "--data", str(data), "--output", str(out), "--model", "tiny", "--log-interval", "1",
                                *extra])


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, fault_data, nan_after):
    from pld_ds import pretrain

    nan_after.update({3, 4, 9})
    with torch_threads(1):
        scalars = pretrain.run(pretrain_args(fault_data[1], tmp_path / "out", "--max-steps", "8"))
    assert scalars["train/skipped_nonfinite"] == 3.0
    assert math.isfinite(scalars["train/loss"])
    weights = safe_load(tmp_path / "out" / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_k_nonfinite_losses_in_a_row_stop_with_a_clear_message(tmp_path, fault_data, nan_after):
    from pld_ds import pretrain

    nan_after.update(range(5, 100))
    with torch_threads(1), pytest.raises(pretrain.UserError) as err:
        pretrain.run(pretrain_args(fault_data[1], tmp_path / "out", "--max-steps", "20", "--save-interval", "2",
                                   "--nan-patience", "3"))
    message = str(err.value)
    assert "NaN or inf in 4 micro-batches in a row at step 4" in message and "\n" not in message
    assert newest(tmp_path / "out" / "checkpoints") == "global_step4"  # the last good one, intact
    state = safe_load(tmp_path / "out" / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt")
    assert all(torch.isfinite(w).all() for w in state["module"].values())


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_with_a_nonzero_exit_within_60_s(tmp_path, fault_data):
    data = fault_data[1]
    cmd = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "pld_ds.pretrain", "--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data",
           str(data), "--output", str(tmp_path / "out"), "--model", "tiny", "--max-steps", "100000",
           "--log-interval", "1"]
    run = Run(cmd)
    try:
        assert run.wait_for(lambda: run.last_step >= 2), "".join(run.lines[-20:])
        ranks = [p for p in psutil.Process(run.proc.pid).children(recursive=True)
                 if "pld_ds.pretrain" in " ".join(p.cmdline()) and "--local_rank=1" in " ".join(p.cmdline())]
        assert len(ranks) == 1, [p.cmdline() for p in psutil.Process(run.proc.pid).children(recursive=True)]
        killed = time.monotonic()
        ranks[0].send_signal(signal.SIGKILL)
        code = run.proc.wait(timeout=60)
        assert time.monotonic() - killed < 60
        assert code != 0
    finally:
        if run.proc.poll() is None:
            for child in psutil.Process(run.proc.pid).children(recursive=True):
                child.kill()
            run.proc.kill()
        run.finish()
    out = str(tmp_path / "out")
    survivors = [p for p in psutil.process_iter(["cmdline"]) if out in " ".join(p.info["cmdline"] or [])]
    assert not survivors


def fake_finished_run(out: Path, steps: int, losses: dict[int, float], weights: dict[str, torch.Tensor]) -> Path:
    """What a finished pld-pretrain run leaves for the fault-injection check: final weights and the loss events."""
    from torch.utils.tensorboard import SummaryWriter

    folder = out / "checkpoints" / checkpoint.tag_for(steps)
    folder.mkdir(parents=True)
    torch.save({"module": weights}, folder / "mp_rank_00_model_states.pt")
    writer = SummaryWriter(log_dir=str(out / "tensorboard" / "run"))
    for step, loss in losses.items():
        writer.add_scalar("train/loss", loss, step)
    writer.close()
    return out


def test_fault_injection_check_catches_one_ulp_one_loss_and_a_partial_folder(tmp_path):
    """The check behind every trial (the slow test above and the 20-trial script) tells equal from not equal."""
    from fault_injection import compare

    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7, "b": torch.ones(3)}
    losses = {1: 5.5, 2: 5.25, 3: 5.125}
    expected = final_state(fake_finished_run(tmp_path / "ref", 3, losses, weights), 3)
    assert compare(fake_finished_run(tmp_path / "same", 3, losses, dict(weights)), 3, expected) == (
        True, "weights equal, loss trace equal")
    nudged = {**weights, "w": weights["w"].clone()}
    nudged["w"][1, 2] = torch.nextafter(nudged["w"][1, 2], torch.tensor(2.0))
    assert compare(fake_finished_run(tmp_path / "ulp", 3, losses, nudged), 3, expected) == (
        False, "weights DIFFER, loss trace equal")
    assert compare(fake_finished_run(tmp_path / "loss", 3, {**losses, 2: 5.0}, weights), 3, expected) == (
        False, "weights equal, loss trace DIFFERS")
    partial = fake_finished_run(tmp_path / "partial", 3, losses, weights)
    (partial / "checkpoints" / f"{checkpoint.PARTIAL}global_step4").mkdir()
    ok, detail = compare(partial, 3, expected)
    assert not ok and detail.endswith(f"partial folders left: ['{checkpoint.PARTIAL}global_step4']")


def test_fault_injection_script_reports_each_trial_and_fails_if_one_does(tmp_path, monkeypatch, capsys):
    import fault_injection

    outcomes = iter([(True, "kill after step 3; weights equal"), (False, "kill in save; weights DIFFER"),
                     (True, "kill after step 9; weights equal")])
    calls = []
    monkeypatch.setattr(fault_injection, "make_data", lambda root: root)
    monkeypatch.setattr(fault_injection, "reference", lambda data, out, steps: ("reference", steps))
    monkeypatch.setattr(fault_injection, "trial",
                        lambda data, out, steps, expected, rng: calls.append((out.name, steps, expected))
                        or next(outcomes))
    assert fault_injection.main(["--trials", "3", "--steps", "7"]) == 1
    assert calls == [(f"trial{k}", 7, ("reference", 7)) for k in range(3)]
    assert capsys.readouterr().out.splitlines() == [
        "trial 1: ok: kill after step 3; weights equal", "trial 2: FAILED: kill in save; weights DIFFER",
        "trial 3: ok: kill after step 9; weights equal", "2/3"]
    monkeypatch.setattr(fault_injection, "trial", lambda *args: (True, "fine"))
    assert fault_injection.main(["--trials", "2"]) == 0


# -- pre-emption agreed across ranks, one step late, without lining the ranks up ----------------------


def preemption_ranks(scenario: str, folder: Path) -> list[tuple[int, dict, str, float]]:
    """Both ranks of tests/preemption_worker.py: (exit code, its JSON line, stderr, seconds to exit) each."""
    import json
    import subprocess
    import sys

    port, started = free_port(), time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "preemption_worker.py"), scenario, str(rank),
                               str(port), str(folder)], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append((proc.returncode, json.loads(lines[0]) if lines else {}, err,
                            time.monotonic() - started))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def test_ranks_agree_on_a_stop_one_step_after_the_signal_without_waiting_for_each_other(tmp_path):
    """Rank 1 is a step behind (it starts check 2 only after rank 0's check 2 returned: a blocking agreement would
    deadlock here until rank 1 gives up waiting) and alone gets SIGUSR1, during step 3: both ranks read it at
    check 4 and stop there, at the same step."""
    (code0, rank0, err0, _), (code1, rank1, err1, _) = preemption_ranks("signal", tmp_path)
    assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    assert rank1["peer_check2_returned_first"] is True
    assert rank1["own_flag_at_check3"] == signal.SIGUSR1
    assert rank0["checks"] == rank1["checks"] == [0, 0, 0, signal.SIGUSR1]


@pytest.mark.parametrize("scenario", ["end", "error"])
def test_a_pending_check_never_holds_the_exit(tmp_path, scenario):
    """A normal end waits for the last check's all-reduce; an error lets it go. Either way both processes exit in
    seconds, without "terminate called" from a collective still running."""
    (code0, rank0, err0, seconds0), (code1, rank1, err1, seconds1) = preemption_ranks(scenario, tmp_path)
    assert rank0["checks"] == rank1["checks"] == [0, 0, 0]
    assert "terminate called" not in err0 + err1
    assert max(seconds0, seconds1) < 60
    if scenario == "end":
        assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    else:  # rank 0 failed; rank 1, waiting for its message, fails when rank 0 is gone
        assert code0 == 1 and "rank 0 failed after its check 3" in err0, err0[-2000:]
        assert code1 != 0
