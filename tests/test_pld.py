"""The PLD schedule, keep probabilities and gates (pld_ds/pld.py)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from pld_helpers import synthetic_batch, tiny_model, torch_threads

from pld_ds import model as model_module
from pld_ds import pld

# -- theta(t) -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("theta_bar", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.001, 0.5])
def test_theta_starts_at_one(theta_bar, gamma):
    assert pld.theta(0, theta_bar, gamma) == 1.0


@pytest.mark.parametrize("theta_bar", [0.1, 0.5, 0.9])
def test_theta_tends_to_theta_bar(theta_bar):
    gamma = 0.001
    assert pld.theta(100_000, theta_bar, gamma) == pytest.approx(theta_bar, abs=1e-12)
    # and the gap shrinks as exp(-gamma t)
    gap = [pld.theta(t, theta_bar, gamma) - theta_bar for t in (0, 1000, 2000)]
    assert gap[0] == pytest.approx(1 - theta_bar)
    assert gap[1] == pytest.approx((1 - theta_bar) * math.exp(-1.0))
    assert gap[2] == pytest.approx((1 - theta_bar) * math.exp(-2.0))


@pytest.mark.parametrize("gamma", [1e-4, 0.001, 0.1])
def test_theta_strictly_decreasing(gamma):
    values = [pld.theta(t, 0.5, gamma) for t in range(0, 200)]
    assert all(a > b for a, b in pairwise(values))
    assert all(0.5 < v <= 1.0 for v in values)


def test_theta_constant_without_decay_target():
    assert {pld.theta(t, 1.0, 0.01) for t in range(0, 5000, 37)} == {1.0}
    # gamma 0 keeps theta at 1 too: there is no decay at all
    assert {pld.theta(t, 0.3, 0.0) for t in range(0, 5000, 37)} == {1.0}


# -- keep probabilities ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 4, 12, 24])
@pytest.mark.parametrize("theta_now", [0.3, 0.5, 0.9])
def test_keep_prob_linear_in_depth(num_layers, theta_now):
    probs = pld.keep_probs(num_layers, theta_now)
    assert len(probs) == num_layers
    assert probs[-1] == pytest.approx(theta_now)
    step = (1 - theta_now) / num_layers
    for layer, p in enumerate(probs, start=1):
        assert p == pytest.approx(1 - layer * step)
        assert p == pld.keep_prob(layer, num_layers, theta_now)
    diffs = [a - b for a, b in pairwise(probs)]
    assert all(d == pytest.approx(step) for d in diffs)
    if num_layers > 1:
        assert probs[0] > probs[-1]


def test_keep_prob_theta_one_keeps_everything():
    assert pld.keep_probs(12, 1.0) == [1.0] * 12


@pytest.mark.parametrize("layer", [0, -1, 13, 100])
def test_keep_prob_rejects_out_of_range_layers(layer):
    with pytest.raises(ValueError, match=r"\[1, 12\]"):
        pld.keep_prob(layer, 12, 0.5)


@pytest.mark.parametrize("num_layers", [1, 3, 12, 24])
@pytest.mark.parametrize("theta_now", [0.25, 0.5, 0.8, 1.0])
def test_expected_depth(num_layers, theta_now):
    depth = pld.expected_depth(num_layers, theta_now)
    assert depth == pytest.approx(sum(pld.keep_probs(num_layers, theta_now)))
    fraction = 1 - (1 - theta_now) * (num_layers + 1) / (2 * num_layers)
    assert depth == pytest.approx(fraction * num_layers)


def test_expected_depth_paper_value():
    # BERT-base, theta 0.5: 12 - 0.5 * 13 / 2 = 8.75 layers on average.
    assert pld.expected_depth(12, 0.5) == pytest.approx(8.75)


# -- gates ----------------------------------------------------------------------------------------


def test_gate_seed_is_deterministic_and_63_bit():
    seeds = [pld.gate_seed(7, t, m) for t in range(50) for m in range(4)]
    assert seeds == [pld.gate_seed(7, t, m) for t in range(50) for m in range(4)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_gate_seed_distinct_over_many_inputs():
    seeds = {pld.gate_seed(s, t, m) for s in (0, 1, 42) for t in range(2000) for m in range(3)}
    assert len(seeds) == 3 * 2000 * 3


# Run as each of two ranks of a gloo process group: seeds its global RNGs differently (as ranks are, by data
# order and dropout), draws gates for many (step, micro-batch) pairs and runs a tiny model with them, recording
# which layers ran; rank 0 writes every rank's draws (all_gather_object) as JSON to argv[1].
RANK_SCRIPT = """
import json, random, sys
import torch, torch.distributed as dist
from pld_helpers import synthetic_batch, tiny_model
from pld_ds import pld
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(1000 + rank)
random.seed(rank)
model = tiny_model(num_layers=8).train()
ran = []
for i, layer in enumerate(model.encoder.layers):
    layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
batch = synthetic_batch(batch=2, seq_len=8, seed=rank)  # different data per rank
draws = {}
for step in (0, 1, 17, 10_000):
    for micro in (0, 1, 3):
        ran.clear()
        model(**batch, progressive_layer_drop=True, pld_theta=0.5, pld_generator=pld.gate_generator(42, step, micro))
        gates = pld.sample_gates(12, 0.5, pld.gate_generator(42, step, micro))
        draws[f"{step}/{micro}"] = {"gates": [kept for kept, _ in gates], "layers_run": list(ran),
                                    "hash": hash("pld")}
gathered = [None, None]
dist.all_gather_object(gathered, {"rank": rank, "draws": draws})
if rank == 0:
    open(sys.argv[1], "w").write(json.dumps(gathered))
dist.destroy_process_group()
"""


def test_same_gates_on_two_real_ranks(tmp_path):
    """Two processes of one process group, with different global RNG states, data and Python hash seeds, draw
    the same gates and run the same layers for every (seed, step, micro-batch): no communication needed."""
    import json
    import subprocess
    import sys

    from pld_helpers import REPO, child_env, free_port

    out = tmp_path / "draws.json"
    env = {**child_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO / "tests")}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(out)], cwd=REPO,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "PYTHONHASHSEED": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    rank0, rank1 = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert rank0["rank"] == 0 and rank1["rank"] == 1
    assert rank0["draws"].keys() == rank1["draws"].keys()
    for key, mine in rank0["draws"].items():
        theirs = rank1["draws"][key]
        assert mine["gates"] == theirs["gates"], key
        assert mine["layers_run"] == theirs["layers_run"], key
    # the processes really differed in what a seed taken from process state would give
    assert rank0["draws"]["0/0"]["hash"] != rank1["draws"]["0/0"]["hash"]
    # and the draws vary with (step, micro-batch): layers were dropped, not the same ones each time
    patterns = {tuple(d["layers_run"]) for d in rank0["draws"].values()}
    assert len(patterns) > 3 and min(len(p) for p in patterns) < 8


def test_different_step_or_micro_gives_different_draws():
    base = torch.rand(32, generator=pld.gate_generator(0, 10, 0))
    others = [pld.gate_generator(0, 11, 0), pld.gate_generator(0, 10, 1), pld.gate_generator(1, 10, 0)]
    for g in others:
        assert not torch.equal(torch.rand(32, generator=g), base)
    # over many (step, micro) pairs the 12-layer gate patterns vary: not one fixed pattern
    patterns = {tuple(k for k, _ in pld.sample_gates(12, 0.5, pld.gate_generator(0, t, m)))
                for t in range(200) for m in range(2)}
    assert len(patterns) > 100
    # and consecutive steps are not correlated: the first draw of step t and t+1 differ in the mean
    first = torch.tensor([torch.rand(1, generator=pld.gate_generator(0, t, 0)).item() for t in range(2000)])
    assert abs(float(first.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 2000)
    assert abs(float(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1])) < 0.1


def test_sample_gates_shape_and_probs():
    gates = pld.sample_gates(6, 0.4, pld.gate_generator(0, 0, 0))
    assert len(gates) == 6
    assert [p for _, p in gates] == pld.keep_probs(6, 0.4)
    assert all(isinstance(kept, bool) for kept, _ in gates)


def test_sample_gates_frequencies_match_keep_probs():
    num_layers, theta_now, draws = 8, 0.3, 4000
    counts = torch.zeros(num_layers)
    for t in range(draws):
        for layer, (kept, _) in enumerate(pld.sample_gates(num_layers, theta_now, pld.gate_generator(3, t, 0))):
            counts[layer] += kept
    for layer, p in enumerate(pld.keep_probs(num_layers, theta_now)):
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[layer].item() / draws - p) < 4 * sigma + 1e-12, (layer, counts[layer].item() / draws, p)
    # the last layer is kept about theta of the time, the first almost always
    assert counts[-1] / draws == pytest.approx(theta_now, abs=0.04)
    assert counts[0] / draws > 0.85


def test_sample_gates_theta_one_keeps_all():
    for t in range(200):
        assert all(kept for kept, _ in pld.sample_gates(12, 1.0, pld.gate_generator(0, t, 0)))


# -- the probability used to rescale is the one sampled -------------------------------------------


def test_rescale_uses_the_sampled_probability(monkeypatch):
    num_layers, theta_now = 8, 0.3
    model = tiny_model(num_layers=num_layers).train()
    batch = synthetic_batch()
    original = model_module.Layer.forward
    calls = []

    def spy(self, x, attn_mask, keep_prob=1.0, inv_keep_prob=None):
        assert inv_keep_prob is None  # eager layers: the float
        calls.append((self, keep_prob))
        return original(self, x, attn_mask, keep_prob, inv_keep_prob)

    monkeypatch.setattr(model_module.Layer, "forward", spy)
    index_of = {id(layer): i for i, layer in enumerate(model.encoder.layers)}
    dropped_somewhere = False
    for seed, step, micro in [(0, 0, 0), (0, 5, 1), (42, 100, 0), (7, 3, 2), (1, 999, 0)]:
        calls.clear()
        out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now,
                    pld_generator=pld.gate_generator(seed, step, micro))
        gates = pld.sample_gates(num_layers, theta_now, pld.gate_generator(seed, step, micro))
        expected = [(i, p) for i, (kept, p) in enumerate(gates) if kept]
        recorded = [(index_of[id(layer)], p) for layer, p in calls]
        assert recorded == expected
        assert out.layers_run == len(expected)
        assert all(p < 1.0 for _, p in recorded)  # theta < 1: every kept layer rescales
        assert all(p == pld.keep_prob(i + 1, num_layers, theta_now) for i, p in recorded)
        dropped_somewhere |= len(expected) < num_layers
    assert dropped_somewhere
