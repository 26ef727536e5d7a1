"""Two CPU ranks through DeepSpeed's launcher: ZeRO 1, 2 and 3, and PLD gates that agree across ranks."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from pld_helpers import (
    REPO,
    USED_PORTS,
    child_env,
    console_script,
    free_port,
    load_ds_config,
    read_csv_scalar,
    write_json,
)
from shard_fixtures import make_shard_dir

from pld_ds import pld

pytestmark = pytest.mark.slow
TIMEOUT = 300


def launch(args: list[str], log: Path) -> subprocess.CompletedProcess:
    cmd = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT} s:\n{(err.stdout or b'')[-3000:]!r}")
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shard_dir(tmp_path_factory.mktemp("dist_data"), shard_sizes=(64, 64), seq_len=32, validation=32)


@pytest.mark.parametrize("stage, bf16, gas", [(1, False, 1), (2, True, 2)], ids=["zero1-fp32", "zero2-bf16-gas2"])
def test_pretrain_on_two_ranks(tmp_path, data_dir, stage, bf16, gas):
    config = load_ds_config("tiny_cpu_pld.json")
    config["train_micro_batch_size_per_gpu"] = 8
    config["gradient_accumulation_steps"] = gas
    config["zero_optimization"] = {"stage": stage}
    if bf16:
        config["bf16"] = {"enabled": True}
    path = write_json(tmp_path / f"zero{stage}.json", config)
    out = tmp_path / "out"
    proc = launch(["--module", "pld_ds.pretrain", "--deepspeed_config", str(path), "--data", str(data_dir),
                   "--output", str(out), "--model", "tiny", "--max-steps", "4", "--log-interval", "2",
                   "--eval-batches", "2"], tmp_path / "log.txt")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "world 2" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(rows) == 2 and all(line.endswith("(rates over the last 2 steps)") for line in rows)
    gamma = config["progressive_layer_drop"]["gamma"]
    csv_dir = out / "csv" / "run"
    losses = read_csv_scalar(csv_dir / "train_loss.csv")
    assert [s for s, _ in losses] == [2, 4]
    assert all(math.isfinite(v) and 0 < v < 20 for _, v in losses)
    # the row of step s holds the theta step s ran with, theta(s - 1)
    assert read_csv_scalar(csv_dir / "train_pld_theta.csv") == [(s, pld.theta(s - 1, 0.5, gamma)) for s in (2, 4)]
    eval_loss = read_csv_scalar(csv_dir / "eval_mlm_loss.csv")
    assert len(eval_loss) == 1 and math.isfinite(eval_loss[0][1])
    # each rank removed DeepSpeed's CPU all-reduce buffer at exit
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{USED_PORTS[-1]}_*"))
    checkpoint = out / "checkpoints" / "global_step4"
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step4"
    # ZeRO writes one optimizer partition per rank
    assert len(list(checkpoint.glob("*zero_pp_rank_*optim_states.pt"))) == 2
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["deepspeed"]["zero_optimization"]["stage"] == stage
    assert run_config["deepspeed"].get("bf16", {}).get("enabled", False) == bf16


@pytest.fixture(scope="module")
def gates_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_gates")
    out = tmp / "records.json"
    proc = launch([str(REPO / "tests" / "dist_gates_worker.py"), "--out", str(out), "--zero", "0", "1", "2", "3",
                   "--steps", "6"], tmp / "log.txt")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(out.read_text()), tmp


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gates_agree_across_ranks(gates_run, stage):
    result = next(r for r in gates_run[0] if r["stage"] == stage)
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    rec0, rec1 = ranks[0]["records"], ranks[1]["records"]
    assert len(rec0) == len(rec1) == 6
    for a, b in zip(rec0, rec1, strict=True):
        assert a["layers"] == b["layers"], (a, b)
        assert a["layers"] == a["expected_layers"]
        assert a["theta"] == b["theta"]
        assert a["global_steps"] == b["global_steps"] == a["step"] + 1
        assert math.isfinite(a["loss"]) and math.isfinite(b["loss"])
    # the ranks saw different data
    assert [r["loss"] for r in rec0] != [r["loss"] for r in rec1]
    # PLD actually dropped something, and not the same pattern every step
    assert any(len(r["layers"]) < 4 for r in rec0)
    assert len({tuple(r["layers"]) for r in rec0}) > 1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_replicas_stay_in_sync_when_layers_are_skipped(gates_run, stage):
    """Each rank evaluates a shared probe batch with its own weights after every step: the losses it computed
    itself must agree bit for bit. Under ZeRO-0 each rank also steps its own full copy of the weights (no
    partition is gathered from another rank), so its own checksum must equal the other's: that fails if a
    rank steps with its local gradient, clips by a local norm, or draws other gates than its peer."""
    result = next(r for r in gates_run[0] if r["stage"] == stage)
    rank0, rank1 = sorted(result["ranks"], key=lambda r: r["rank"])
    probes = [[r["probe_loss"] for r in rank["records"]] for rank in (rank0, rank1)]
    assert probes[0] == probes[1]
    assert len(set(probes[0])) == len(probes[0]) - 1  # every step but the first (lr 0 there) moved the weights
    assert [r["loss"] for r in rank0["records"]] != [r["loss"] for r in rank1["records"]]  # on different data
    assert rank0["initial"] == rank1["initial"]
    if stage == 0:
        assert rank0["final"] == rank1["final"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_the_same_weights_with_pld(gates_run, stage):
    """Same data, seeds and gates: ZeRO-1, 2 and 3 (partitioned weights, gathered only for the layers that
    run) end where ZeRO-0 does, up to the order of fp32 sums; layers skipped at some steps included."""
    import torch

    records = next(r for r in gates_run[0] if r["stage"] == 0)["ranks"][0]["records"]
    assert any(len(r["layers"]) < 4 for r in records)
    reference = torch.load(gates_run[1] / "final_zero0.pt")
    weights = torch.load(gates_run[1] / f"final_zero{stage}.pt")
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_shm_buffers_of_our_ports_are_removed(tmp_path):
    from pld_helpers import remove_shm_buffers

    (tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40001_0").write_bytes(b"x")
    (tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40001_1").write_bytes(b"x")
    (tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40002_0").write_bytes(b"x")  # not ours
    assert remove_shm_buffers([40001], tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["deepspeed_allreduce_buffer_0_127.0.0.1_40002_0"]


# -- a dropped layer gets the zero gradient ZeRO-0 gives it, under every ZeRO stage and offload ------------------

OFFLOAD_WORKER = REPO / "tests" / "dist_offload_worker.py"
FP32_CASES = [f"{zero}:{gas}:fp32" for gas in (1, 2)
              for zero in ("0:none", "1:none", "1:opt", "2:none", "2:opt", "3:none", "3:opt", "3:opt+param")]
BF16_CASES = [f"{zero}:2:bf16" for zero in ("2:opt", "3:opt")]
TWO_RANK_CASES = [f"{zero}:2:fp32" for zero in ("0:none", "1:opt", "2:opt", "3:opt")]


def offload_results(folder: Path) -> dict[str, tuple[list[dict], list[float]]]:
    import torch

    summary = json.loads((folder / "out.json").read_text())
    return {r["case"]: (torch.load(folder / f"{r['case'].replace(':', '_')}.pt"), r["norms"]) for r in summary}


@pytest.fixture(scope="module")
def offload_one_rank(tmp_path_factory):
    """One process runs every case: DeepSpeed re-initialises in the same process, a second or two per case."""
    import sys

    tmp = tmp_path_factory.mktemp("offload_one_rank")
    cmd = [sys.executable, str(OFFLOAD_WORKER), "--out", str(tmp / "out.json"), "--cases", *FP32_CASES, *BF16_CASES]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return offload_results(tmp)


@pytest.fixture(scope="module")
def offload_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload_two_ranks")
    proc = launch([str(OFFLOAD_WORKER), "--out", str(tmp / "out.json"), "--cases", *TWO_RANK_CASES], tmp / "log.txt")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return offload_results(tmp)


def check_against_zero0(results: dict, case: str) -> None:
    """Forced gates (see dist_offload_worker.py), plain SGD and active clipping: a layer dropped for a whole step
    stays exactly where it was; a layer that ran in one micro-batch of the window moves; and every weight and
    gradient norm is ZeRO-0's up to fp32 rounding (bf16: up to bf16 rounding)."""
    import torch
    from dist_offload_worker import CLIP

    weights, norms = results[case]
    gas, precision = int(case.split(":")[2]), case.split(":")[3]
    reference, reference_norms = results[f"0:none:{gas}:fp32"]

    def layer(step: int, index: int) -> dict:
        return {k: v for k, v in weights[step].items() if k.startswith(f"encoder.layers.{index}.")}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    # weights[s] is after s steps; layer 3 ran in step 0 only, and its weights never move again
    assert not same(layer(1, 3), layer(0, 3))
    assert same(layer(2, 3), layer(1, 3)) and same(layer(3, 3), layer(1, 3)), "a dropped layer moved"
    if gas == 2:  # layers 1 and 2 ran in one of the two micro-batches of steps 1 and 2: real gradients
        assert all(not same(layer(s + 1, i), layer(s, i)) for s in (1, 2) for i in (1, 2))
    else:  # layer 2 dropped in step 1, layer 1 in step 2
        assert same(layer(2, 2), layer(1, 2)) and same(layer(3, 1), layer(2, 1))
        assert not same(layer(3, 2), layer(2, 2)) and not same(layer(2, 1), layer(1, 1))
    assert all(n > CLIP for n in reference_norms)  # clipping was active: a wrong norm moves every weight
    tol = dict(rtol=0, atol=2e-6) if precision == "fp32" else dict(rtol=0, atol=5e-3)
    assert norms == pytest.approx(reference_norms, rel=1e-5 if precision == "fp32" else 5e-3)
    for step, (mine, theirs) in enumerate(zip(weights, reference, strict=True)):
        for name, tensor in theirs.items():
            torch.testing.assert_close(mine[name], tensor, **tol, msg=f"{case} step {step} {name}")


@pytest.mark.parametrize("case", FP32_CASES + BF16_CASES)
def test_dropped_layers_get_zero0s_gradient_under_every_zero_stage_and_offload(offload_one_rank, case):
    check_against_zero0(offload_one_rank, case)


@pytest.mark.parametrize("case", TWO_RANK_CASES)
def test_dropped_layers_get_zero0s_gradient_with_offload_on_two_ranks(offload_two_ranks, case):
    check_against_zero0(offload_two_ranks, case)
