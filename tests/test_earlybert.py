"""EarlyBERT: slimming coefficients, masks, the early-bird test, pruning, and slim models through the
engine, checkpoints, export and pld-bench (pld_ds/earlybert.py, the per-layer widths of pld_ds/model.py).

Also the worker of the two-rank test: deepspeed --num_gpus 2 tests/test_earlybert.py --worker OUT
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pld_helpers import (
    REPO,
    checksum,
    child_env,
    console_script,
    free_port,
    load_ds_config,
    synthetic_batch,
    tiny_config,
    torch_threads,
    write_json,
)

from pld_ds import bench, checkpoint, earlybert, metrics, pld
from pld_ds.config import ConfigError, model_config, split_ds_config
from pld_ds.earlybert import EarlyBertConfig, EarlyBirdDetector, TicketMasks, TicketSearch
from pld_ds.model import BertConfig, BertForPreTraining, BertForSequenceClassification

SEED = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def batch():
    return synthetic_batch(batch=4, seq_len=16)


def slimming_model(cls=BertForPreTraining, seed=0, slimming=True, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(slimming=slimming, **overrides)
    return BertForPreTraining(cfg) if cls is BertForPreTraining else BertForSequenceClassification(cfg, 3)


def randomize_coefficients(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head, neuron in zip(*earlybert.coefficients(model), strict=True):
            head.copy_(torch.rand(head.shape, generator=g) + 0.5)
            neuron.copy_(torch.rand(neuron.shape, generator=g) + 0.5)


def zero_pruned(model, masks):
    with torch.no_grad():
        for coef, mask in zip(earlybert.coefficients(model)[0], masks.heads, strict=True):
            coef[~mask] = 0
        for coef, mask in zip(earlybert.coefficients(model)[1], masks.neurons, strict=True):
            coef[~mask] = 0


def outputs(model, batch, **kwargs):
    if isinstance(model, BertForSequenceClassification):
        out = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
        return [out.logits]
    out = model(**batch, **kwargs)
    return [out.loss, out.mlm_logits, out.nsp_logits]


# -- the model: widths per layer and coefficients --------------------------------------------------


def test_default_config_has_no_slim_fields_set():
    cfg = BertConfig()
    assert (cfg.layer_heads, cfg.layer_intermediate, cfg.slimming) == (None, None, False)
    model = BertForPreTraining(tiny_config())
    assert not any(name.endswith(("head_coef", "neuron_coef")) for name in model.state_dict())


@pytest.mark.parametrize("cls", [BertForPreTraining, BertForSequenceClassification])
def test_coefficients_at_one_reproduce_the_unpruned_model_exactly(batch, cls):
    plain = slimming_model(cls, slimming=False)
    slimming = slimming_model(cls)
    missing, unexpected = slimming.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and len(missing) == 2 * plain.config.num_layers
    assert all(name.endswith(("attn.head_coef", "ffn.neuron_coef")) for name in missing)
    for mode in ("eval", "train"):
        getattr(plain, mode)()
        getattr(slimming, mode)()
        for a, b in zip(outputs(plain, batch), outputs(slimming, batch), strict=True):
            assert torch.equal(a, b)
    if cls is BertForPreTraining:  # and with PLD gates, the same gates
        gen = dict(progressive_layer_drop=True, pld_theta=0.4)
        a = outputs(plain, batch, **gen, pld_generator=pld.gate_generator(0, 3, 0))
        b = outputs(slimming, batch, **gen, pld_generator=pld.gate_generator(0, 3, 0))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # enable_slimming on the plain model is the same thing, in place
    earlybert.enable_slimming(plain)
    assert plain.config.slimming and list(plain.state_dict()) == list(slimming.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(outputs(plain, batch), outputs(slimming, batch), strict=True))


def test_coefficients_scale_heads_and_neurons(batch):
    """The counterpart of the test above: a coefficient away from 1 changes the output."""
    model = slimming_model().eval()
    before = model(**batch).mlm_logits
    with torch.no_grad():
        model.encoder.layers[1].attn.head_coef[0] = 0.5
    after_head = model(**batch).mlm_logits
    with torch.no_grad():
        model.encoder.layers[2].ffn.neuron_coef[5] = 0.0
    assert not torch.allclose(before, after_head)
    assert not torch.allclose(after_head, model(**batch).mlm_logits)


def test_slim_layer_shapes():
    cfg = tiny_config(layer_heads=[2, 1, 1, 2], layer_intermediate=[128, 40, 7, 96])
    assert cfg.layer_heads == (2, 1, 1, 2) and cfg.layer_intermediate == (128, 40, 7, 96)  # lists become tuples
    model = BertForPreTraining(cfg)
    head_dim = cfg.hidden_size // cfg.num_heads
    for i, layer in enumerate(model.encoder.layers):
        width = cfg.layer_heads[i] * head_dim
        assert layer.attn.qkv.weight.shape == (3 * width, cfg.hidden_size)
        assert layer.attn.out.weight.shape == (cfg.hidden_size, width)
        assert layer.ffn.fc1.weight.shape == (cfg.layer_intermediate[i], cfg.hidden_size)
        assert layer.ffn.fc2.weight.shape == (cfg.hidden_size, cfg.layer_intermediate[i])
    out = model(**synthetic_batch())
    assert torch.isfinite(out.loss) and out.layers_run == 4
    assert earlybert.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert earlybert.parameter_count(cfg) < earlybert.parameter_count(tiny_config())


@pytest.mark.parametrize("fields, words", [
    ({"layer_heads": [2, 2, 2]}, ["layer_heads", "one entry per layer (4)", "got 3"]),
    ({"layer_heads": [2, 0, 2, 2]}, ["layer_heads", "[1, 2]", "got 0"]),
    ({"layer_heads": [2, 3, 2, 2]}, ["layer_heads", "[1, 2]", "got 3"]),
    ({"layer_intermediate": [128, True, 1, 1]}, ["layer_intermediate", "got True"]),
    ({"layer_intermediate": [128, 129, 1, 1]}, ["layer_intermediate", "[1, 128]", "got 129"]),
    ({"layer_intermediate": 64}, ["layer_intermediate", "a list of 4 integers"]),
    ({"slimming": "yes"}, ["slimming", "true or false"]),
])
def test_bad_slim_fields_in_a_model_file_are_one_line_errors(tmp_path, fields, words):
    path = write_json(tmp_path / "slim.json", {**dataclasses.asdict(model_config("tiny")), **fields})
    with pytest.raises(ConfigError) as err:
        model_config(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert all(word in message for word in words), message


def test_model_file_with_lists_gives_the_slim_model(tmp_path):
    cfg = tiny_config(layer_heads=(1, 2, 1, 1), layer_intermediate=(5, 6, 7, 8))
    path = write_json(tmp_path / "slim.json", dataclasses.asdict(cfg))
    assert json.loads(path.read_text())["layer_heads"] == [1, 2, 1, 1]
    assert model_config(str(path)) == cfg


# -- configuration block --------------------------------------------------------------------------


def test_block_defaults_and_values():
    assert EarlyBertConfig.from_ds_config({"train_batch_size": 8}) == EarlyBertConfig()
    assert not EarlyBertConfig().enabled
    cfg = EarlyBertConfig.from_dict({"enabled": True, "lambda_heads": 0, "lambda_neurons": 1e-3,
                                     "head_prune_ratio": 0.25, "neuron_prune_ratio": 0.5, "check_interval": 10,
                                     "window": 3, "threshold": 0, "max_search_steps": 200, "weights": "continue"})
    assert cfg == EarlyBertConfig(True, 0.0, 1e-3, 0.25, 0.5, 10, 3, 0.0, 200, "continue")
    assert isinstance(cfg.lambda_heads, float)
    # the released scripts' 4 of 12 heads per layer
    assert round(12 * EarlyBertConfig().head_prune_ratio) == 4


@pytest.mark.parametrize("block, words", [
    ({"enabled": 1}, ["earlybert.enabled", "true or false", "1"]),
    ({"lambda_heads": -1e-4}, ["earlybert.lambda_heads", ">= 0"]),
    ({"lambda_neurons": "1e-4"}, ["earlybert.lambda_neurons", "'1e-4'"]),
    ({"head_prune_ratio": 1.0}, ["earlybert.head_prune_ratio", "[0, 1)"]),
    ({"neuron_prune_ratio": float("nan")}, ["earlybert.neuron_prune_ratio", "nan"]),
    ({"check_interval": 0}, ["earlybert.check_interval", ">= 1"]),
    ({"window": 1}, ["earlybert.window", ">= 2"]),
    ({"window": 5.0}, ["earlybert.window", "integer"]),
    ({"threshold": 1.5}, ["earlybert.threshold", "[0, 1]"]),
    ({"max_search_steps": -1}, ["earlybert.max_search_steps", ">= 0"]),
    ({"weights": "reset"}, ["earlybert.weights", '"rewind" or "continue"', "'reset'"]),
    ({"lamda_heads": 1e-4}, ["earlybert.lamda_heads", "unknown key", "lambda_heads"]),
    ([True], ["earlybert", "expected an object", "list"]),
])
def test_bad_block_is_a_one_line_error_naming_the_key(tmp_path, block, words):
    config = load_ds_config("tiny_cpu_pld.json")
    config["earlybert"] = block
    path = write_json(tmp_path / "ds.json", config)
    with pytest.raises(ConfigError) as err:
        EarlyBertConfig.from_ds_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    assert all(word in message for word in words), message


def test_deepspeed_never_sees_the_block(tmp_path):
    config = load_ds_config("tiny_cpu_pld.json")
    config["earlybert"] = {"enabled": True}
    ds_config, pld_config, _ = split_ds_config(write_json(tmp_path / "ds.json", config))
    assert "earlybert" not in ds_config and "progressive_layer_drop" not in ds_config
    assert pld_config.enabled


# -- masks and the early-bird detector -------------------------------------------------------------


def test_heads_are_pruned_per_layer_and_neurons_across_layers():
    heads = [torch.tensor([0.9, 0.1, 0.5, 0.7]), torch.tensor([0.2, 0.3, 0.8, 0.05])]
    # layer 0's neurons are all larger than layer 1's: a global cut takes layer 1's first
    neurons = [torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6]), torch.tensor([0.5, -0.01, 0.3, 0.2, 0.1])]
    masks = earlybert.masks_from_coefficients(heads, neurons, head_prune_ratio=0.5, neuron_prune_ratio=0.4)
    assert masks.heads[0].tolist() == [True, False, False, True]
    assert masks.heads[1].tolist() == [False, True, True, False]
    assert masks.neurons[0].tolist() == [True] * 5
    # 4 of the 10 go: 0.1, 0.2, 0.3 and -0.01 (by magnitude the smallest), all in layer 1
    assert masks.neurons[1].tolist() == [True, False, False, False, False]
    assert masks.kept_heads() == (2, 2) and masks.kept_neurons() == (5, 1)


def test_every_layer_keeps_a_head_and_a_neuron():
    heads = [torch.tensor([0.3, 0.2])]
    masks = earlybert.masks_from_coefficients(heads * 2, [torch.full((4,), 0.01), torch.ones(4)],
                                              head_prune_ratio=0.9, neuron_prune_ratio=0.6)
    assert masks.kept_heads() == (1, 1)  # round(0.9 * 2) = 2 would empty the layer
    # the global cut (round(0.6 * 8) = 5) took all of layer 0 and one of layer 1; layer 0 gets its first back
    assert masks.neurons[0].tolist() == [True, False, False, False]
    assert masks.kept_neurons() == (1, 3)


def test_mask_distance_is_the_larger_fraction_of_heads_or_neurons():
    a = TicketMasks((torch.tensor([True, False, True, True]),), (torch.tensor([True] * 8 + [False] * 2),))
    b = TicketMasks((torch.tensor([True, True, False, True]),), (torch.tensor([True] * 9 + [False]),))
    assert a.distances(b) == (0.5, 0.1)
    assert a.distance(b) == b.distance(a) == 0.5
    assert a.distance(a) == 0.0


def masks_with_pruned(pruned_heads: tuple[int, int], pruned_neurons: set[int]) -> tuple[list, list]:
    """Coefficients of 2 layers x 4 heads and 2 x 10 neurons whose masks prune exactly the given ones:
    one head per layer (ratio 0.25) and 8 of the 20 neurons (ratio 0.4)."""
    heads = [torch.ones(4) + 0.01 * torch.arange(4) for _ in range(2)]
    for layer, head in enumerate(pruned_heads):
        heads[layer][head] = 0.1
    flat = torch.ones(20) + 0.001 * torch.arange(20)
    flat[sorted(pruned_neurons)] = 0.2
    return heads, list(flat.split(10))


def swap(pruned: set[int], out: int, into: int) -> set[int]:
    assert out in pruned and into not in pruned
    return (pruned - {out}) | {into}


def test_detector_fires_exactly_when_the_newest_is_within_threshold_of_the_previous_four():
    # one swapped neuron moves 2 of 20 positions: distance 0.1, just within the threshold
    a = {0, 1, 2, 3, 4, 5, 6, 7}
    b = swap(swap(a, 0, 10), 1, 11)  # 0.2 from a
    c = swap(swap(b, 2, 12), 3, 13)  # 0.2 from b
    d = swap(c, 4, 14)  # 0.1 from c, 0.3 from b
    history = [((0, 0), a), ((0, 0), b), ((0, 0), c), ((0, 0), c), ((0, 0), d), ((0, 0), d), ((0, 0), d),
               ((0, 0), d)]
    # index 6: window c c d d d: every distance <= 0.1. Index 5: b c c d d: d is 0.3 from b
    model = tiny_model_for_masks()
    search = TicketSearch(model, EarlyBertConfig(enabled=True, head_prune_ratio=0.25, neuron_prune_ratio=0.4,
                                                 check_interval=10))
    fired = []
    for k, (heads, neurons) in enumerate(history):
        set_coefficients(model, *masks_with_pruned(heads, neurons))
        over = search.observe(10 * (k + 1), model)
        check = search.check_at(10 * (k + 1))
        assert check is not None and len(check.head_distances) == min(k, 4)
        fired.append(over)
        if over:
            break
    assert fired == [False] * 6 + [True]
    assert search.emergence_step == 70
    assert [c.distance for c in search.checks] == [None, 0.2, 0.4, 0.4, 0.5, 0.3, 0.1]
    assert search.checks[-1].emerged and not any(c.emerged for c in search.checks[:-1])
    assert search.check_at(75) is None
    # what a training loop logs per check
    assert search.checks[0].scalars() == {}
    assert search.checks[-1].scalars() == {"earlybert/mask_distance": 0.1, "earlybert/head_mask_distance": 0.0,
                                           "earlybert/neuron_mask_distance": 0.1}
    assert search.checks[-1].line() == ("earlybert: step 70  mask distance to the previous 4: 0.100  0.100  0.000  "
                                        "0.000  kept heads 6 neurons 12  -> ticket emerged")


def test_head_changes_alone_block_emergence():
    """The neurons agree, but one layer's pruned head moves: 2 of 8 head positions (0.25) differ. One
    fraction over all 28 positions (2/28) would have let the ticket emerge."""
    detector = EarlyBirdDetector(window=3, threshold=0.1)
    neurons = {0, 1, 2, 3, 4, 5, 6, 7}
    for heads in ((0, 0), (0, 1), (0, 0)):
        masks = earlybert.masks_from_coefficients(*masks_with_pruned(heads, neurons), 0.25, 0.4)
        distances, emerged = detector.update(masks)
    assert distances == [(0.0, 0.0), (0.25, 0.0)] and not emerged
    distances, emerged = detector.update(masks)
    assert distances == [(0.25, 0.0), (0.0, 0.0)] and not emerged
    distances, emerged = detector.update(masks)
    assert distances == [(0.0, 0.0), (0.0, 0.0)] and emerged


def test_threshold_is_inclusive_and_the_window_must_be_full():
    detector = EarlyBirdDetector(window=2, threshold=0.1)
    a = earlybert.masks_from_coefficients(*masks_with_pruned((0, 0), {0, 1, 2, 3, 4, 5, 6, 7}), 0.25, 0.4)
    b = earlybert.masks_from_coefficients(*masks_with_pruned((0, 0), {0, 1, 2, 3, 4, 5, 6, 8}), 0.25, 0.4)
    assert detector.update(a) == ([], False)  # nothing to compare with yet
    assert detector.update(b) == ([(0.0, 0.1)], True)
    strict = EarlyBirdDetector(window=2, threshold=0.09)
    strict.update(a)
    assert strict.update(b) == ([(0.0, 0.1)], False)


def test_search_stops_at_max_search_steps_without_emergence():
    model = tiny_model_for_masks()
    search = TicketSearch(model, EarlyBertConfig(enabled=True, check_interval=2, max_search_steps=5, threshold=0.0,
                                                 head_prune_ratio=0.25, neuron_prune_ratio=0.4))
    over = []
    for step in range(1, 7):
        set_coefficients(model, *masks_with_pruned((0, 0), {0, 1, 2, 3, 4, 5, 6, 7}))
        over.append(search.observe(step, model))  # checks at 2, 4, 6: never the 5 that emergence needs
    assert over == [False, False, False, False, True, True]
    assert search.emergence_step is None and [c.step for c in search.checks] == [2, 4, 6]
    slim = search.draw(model)
    assert search.report.emergence_step is None and search.report.drawn_at == 6
    assert "did not emerge by step 6" in search.report.lines()[0]
    assert slim.config.layer_heads == (3, 3)


def tiny_model_for_masks() -> BertForPreTraining:
    """2 layers of 4 heads and 10 neurons (the shapes of masks_with_pruned), without coefficients yet."""
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                                         intermediate_size=10, max_position_embeddings=32))


def set_coefficients(model: BertForPreTraining, heads: list, neurons: list) -> None:
    with torch.no_grad():
        for coef, value in zip(earlybert.coefficients(model)[0], heads, strict=True):
            coef.copy_(value)
        for coef, value in zip(earlybert.coefficients(model)[1], neurons, strict=True):
            coef.copy_(value)


# -- pruning ----------------------------------------------------------------------------------------


def dropping_step(theta_now: float) -> int:
    """A step whose PLD gates (seed 0) drop at least one of 4 layers and keep at least one."""
    return next(step for step in range(1000)
                if 0 < sum(kept for kept, _ in pld.sample_gates(4, theta_now, pld.gate_generator(0, step, 0))) < 4)


@pytest.mark.parametrize("cls", [BertForPreTraining, BertForSequenceClassification])
def test_pruning_heads_and_neurons_with_zero_coefficients_leaves_outputs_unchanged(batch, cls):
    model = slimming_model(cls)
    randomize_coefficients(model)
    masks = earlybert.masks_from_model(model, head_prune_ratio=0.5, neuron_prune_ratio=0.4)
    zero_pruned(model, masks)
    slim = earlybert.prune(model, masks)
    assert type(slim) is cls and not slim.config.slimming
    assert slim.config.layer_heads == (1, 1, 1, 1) and sum(slim.config.layer_intermediate) == round(0.6 * 512)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    for mode in ("eval", "train"):  # dropout is 0: train mode differs only by the PLD gates below
        getattr(model, mode)()
        getattr(slim, mode)()
        for a, b in zip(outputs(model, batch), outputs(slim, batch), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    if cls is BertForPreTraining:
        step = dropping_step(0.4)
        gates = dict(progressive_layer_drop=True, pld_theta=0.4)
        a = model(**batch, **gates, pld_generator=pld.gate_generator(0, step, 0))
        b = slim(**batch, **gates, pld_generator=pld.gate_generator(0, step, 0))
        assert a.layers_run == b.layers_run < 4
        torch.testing.assert_close(a.mlm_logits, b.mlm_logits, rtol=0, atol=2e-6)


def test_pruning_without_zeroing_changes_outputs(batch):
    """The counterpart: the pruned heads and neurons mattered while their coefficients were not 0."""
    model = slimming_model().eval()
    randomize_coefficients(model)
    masks = earlybert.masks_from_model(model, head_prune_ratio=0.5, neuron_prune_ratio=0.4)
    slim = earlybert.prune(model, masks).eval()
    assert not torch.allclose(model(**batch).mlm_logits, slim(**batch).mlm_logits, atol=1e-3)


# -- the penalty under PLD ---------------------------------------------------------------------------


def coefficient_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    heads, neurons = earlybert.coefficients(model)
    zero = torch.zeros(())
    return out, [(h.grad if h.grad is not None else zero, n.grad if n.grad is not None else zero)
                 for h, n in zip(heads, neurons, strict=True)]


def l1_pull_under_pld(batch, layers):
    """(gates, output, per layer (head pull, neuron pull, coefficients)): the L1 part of each coefficient's
    gradient in a PLD step that drops some layers, with the penalty placed as `layers` says."""
    model = slimming_model().train()
    randomize_coefficients(model)
    with torch.no_grad():  # signs of both kinds, so the pull is not the same sign everywhere
        for head, neuron in zip(*earlybert.coefficients(model), strict=True):
            head[0], neuron[:3] = -head[0], -neuron[:3]
    step = dropping_step(0.4)
    pld_kwargs = dict(progressive_layer_drop=True, pld_theta=0.4)
    out, data_only = coefficient_grads(model, batch, **pld_kwargs, pld_generator=pld.gate_generator(0, step, 0))
    handle = earlybert.add_penalty_to_loss(model, lambda_heads=0.5, lambda_neurons=0.25, layers=layers)
    out, with_l1 = coefficient_grads(model, batch, **pld_kwargs, pld_generator=pld.gate_generator(0, step, 0))
    handle.remove()
    gates = pld.sample_gates(4, 0.4, pld.gate_generator(0, step, 0))  # what the forward drew
    assert any(not kept for kept, _ in gates) and any(kept for kept, _ in gates) and out.gates == gates
    pulls = [(lh - dh, ln - dn, (head.detach(), neuron.detach())) for (dh, dn), (lh, ln), head, neuron
             in zip(data_only, with_l1, *earlybert.coefficients(model), strict=True)]
    return gates, out, pulls


def test_by_default_the_l1_pull_reaches_every_layer_as_without_pld(batch):
    """Adam steps a coefficient by about lr whatever its gradient's size, so a layer pulled only in the steps
    it ran would shrink slower than one that always runs: by default every layer, dropped or not, gets
    lambda * sign(c) in every step, as without PLD."""
    gates, out, pulls = l1_pull_under_pld(batch, "all")
    for head_pull, neuron_pull, (head, neuron) in pulls:
        torch.testing.assert_close(head_pull, 0.5 * head.sign())
        torch.testing.assert_close(neuron_pull, 0.25 * neuron.sign())
    assert earlybert.TicketSearch.__init__.__kwdefaults__["penalty_layers"] == "all"


@pytest.mark.parametrize("layers", ["all", "ran", "ran_unscaled"])
def test_under_adam_only_the_default_shrinks_dropped_and_kept_layers_alike(layers):
    """Why the default is "all": Adam steps a coefficient by about lr whatever the gradient's size, so a
    layer that gets the L1 gradient in only half the steps (dropped in the others) shrinks about sqrt(1/2)
    as fast, with 1/p or without, and the ranking then prunes the layers that always run first."""
    model = slimming_model()
    optimizer = torch.optim.AdamW([c for pair in zip(*earlybert.coefficients(model), strict=True) for c in pair],
                                  lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for step in range(100):
        gates = [(True, 1.0), (step % 2 == 0, 0.5), (True, 1.0), (True, 1.0)]  # layer 1 runs every other step
        optimizer.zero_grad(set_to_none=False)  # dropped: a zero gradient, as DeepSpeed gives it
        earlybert.l1_penalty(model, 1e-4, 1e-4, earlybert.penalty_weights(gates, layers)).backward()
        optimizer.step()
    heads, neurons = earlybert.coefficients(model)
    shrink = [1 - float(c.detach().mean()) for c in neurons]
    assert shrink[0] == pytest.approx(shrink[2]) and shrink[0] > 0.05
    if layers == "all":
        assert shrink[1] == pytest.approx(shrink[0], rel=1e-6)
    else:
        assert shrink[1] < 0.8 * shrink[0]


def test_l1_pull_on_the_layers_that_ran_only_scaled_by_one_over_p(batch):
    """layers="ran" (kept for measurement): no pull on a dropped layer, lambda/p times sign(c) on a kept one,
    the 1/p its output was scaled by; the logged penalty is what the loss carries."""
    gates, out, pulls = l1_pull_under_pld(batch, "ran")
    for (kept, keep_prob), (head_pull, neuron_pull, (head, neuron)) in zip(gates, pulls, strict=True):
        if not kept:
            assert not head_pull.any() and not neuron_pull.any()
        else:
            assert keep_prob < 1
            torch.testing.assert_close(head_pull, 0.5 / keep_prob * head.sign())
            torch.testing.assert_close(neuron_pull, 0.25 / keep_prob * neuron.sign())
    heads, neurons = [c for _, _, (c, _) in pulls], [c for _, _, (_, c) in pulls]
    weights = earlybert.penalty_weights(gates, "ran")
    expected = sum(w * (0.5 * h.abs().sum() + 0.25 * n.abs().sum()) for w, h, n in zip(weights, heads, neurons,
                                                                                       strict=True))
    assert out.l1_penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.mlm_loss + out.nsp_loss + out.l1_penalty).item(), rel=1e-6)


def test_penalty_weights_per_choice():
    gates = [(True, 1.0), (False, 0.75), (True, 0.5)]
    assert earlybert.penalty_weights(gates) is None  # "all": every layer, unscaled, as without PLD
    assert earlybert.penalty_weights(gates, "ran") == [1.0, 0.0, 2.0]
    assert earlybert.penalty_weights(gates, "ran_unscaled") == [1.0, 0.0, 1.0]
    assert earlybert.penalty_weights(None, "ran") is None  # no PLD: every layer, unscaled
    # "ran": over the gates, the expected weight of every layer is 1
    g = pld.gate_generator(0, 0, 0)
    draws = [earlybert.penalty_weights(pld.sample_gates(4, 0.5, g), "ran") for _ in range(4000)]
    for layer_weights in zip(*draws, strict=True):
        assert sum(layer_weights) / len(draws) == pytest.approx(1.0, abs=0.06)
    with pytest.raises(ValueError, match="ran_unscaled"):
        earlybert.penalty_weights(gates, "dropped")


def test_penalty_without_pld_or_in_eval_is_unchanged(batch):
    model = slimming_model().train()
    randomize_coefficients(model)
    handle = earlybert.add_penalty_to_loss(model, lambda_heads=0.5, lambda_neurons=0.25)
    out = model(**batch)
    assert out.gates is None
    assert out.l1_penalty.item() == pytest.approx(earlybert.l1_penalty(model, 0.5, 0.25).item(), rel=1e-6)
    model.eval()
    out = model(**batch)
    assert out.l1_penalty is None and out.loss.item() == pytest.approx((out.mlm_loss + out.nsp_loss).item())
    handle.remove()


def test_prune_keeps_the_right_rows_and_folds_coefficients():
    model = slimming_model()
    randomize_coefficients(model)
    masks = earlybert.masks_from_model(model, head_prune_ratio=0.5, neuron_prune_ratio=0.4)
    slim = earlybert.prune(model, masks)
    d = model.config.hidden_size // model.config.num_heads
    for layer, small, head_mask, neuron_mask in zip(model.encoder.layers, slim.encoder.layers, masks.heads,
                                                    masks.neurons, strict=True):
        (kept_head,) = head_mask.nonzero().flatten().tolist()
        q, k, v = layer.attn.qkv.weight.detach().chunk(3)
        rows = slice(kept_head * d, (kept_head + 1) * d)
        assert torch.equal(small.attn.qkv.weight, torch.cat([q[rows], k[rows], v[rows]]))
        torch.testing.assert_close(small.attn.out.weight,
                                   layer.attn.out.weight[:, rows] * layer.attn.head_coef[kept_head].detach())
        assert torch.equal(small.ffn.fc1.bias, layer.ffn.fc1.bias[neuron_mask])
        torch.testing.assert_close(small.ffn.fc2.weight,
                                   layer.ffn.fc2.weight[:, neuron_mask] * layer.ffn.neuron_coef[neuron_mask].detach())
    assert torch.equal(slim.embeddings.word.weight, model.embeddings.word.weight)
    assert slim.heads.decoder.weight is slim.embeddings.word.weight  # still tied


@pytest.mark.parametrize("weights", ["rewind", "continue"])
def test_rewind_takes_the_weights_at_search_start_and_continue_the_current_ones(weights):
    model = slimming_model()
    start = weights_of(model)
    search = TicketSearch(model, EarlyBertConfig(enabled=True, weights=weights))
    with torch.no_grad():  # "training": every weight and coefficient moves
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    now = weights_of(model)
    masks = search.masks(model)  # what the draw uses when the ticket has not emerged
    slim = search.draw(model)
    source = start if weights == "rewind" else now
    assert torch.equal(slim.embeddings.word.weight, source["embeddings.word.weight"])
    for i, layer in enumerate(slim.encoder.layers):
        assert torch.equal(layer.ffn.fc1.weight, source[f"encoder.layers.{i}.ffn.fc1.weight"][masks.neurons[i]])
    # rewind folds the start's coefficients (all 1): fc2's kept columns are the start's, unscaled
    fc2 = slim.encoder.layers[0].ffn.fc2.weight
    assert torch.equal(fc2, start["encoder.layers.0.ffn.fc2.weight"][:, masks.neurons[0]]) == (weights == "rewind")


def test_zero3_partitioned_weights_are_refused():
    model = slimming_model()
    model.encoder.layers[0].attn.head_coef.ds_id = 0  # how DeepSpeed's ZeRO-3 marks a partitioned parameter
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        TicketSearch(model, EarlyBertConfig(enabled=True))


def test_prune_refuses_masks_of_another_shape():
    model = slimming_model()
    with pytest.raises(ValueError, match="layer 0"):
        earlybert.prune(model, TicketMasks.full(tiny_config(intermediate_size=64)))


# -- FLOPs and the report ---------------------------------------------------------------------------


def test_flops_per_layer_match_metrics_for_uniform_layers():
    cfg = model_config("base")
    assert earlybert.encoder_flops_per_sequence(cfg, 128) == metrics.encoder_flops_per_sequence(cfg, 128)
    probs = pld.keep_probs(cfg.num_layers, 0.5)
    assert earlybert.encoder_flops_per_sequence(cfg, 128, probs) == pytest.approx(
        metrics.encoder_flops_per_sequence(cfg, 128, pld.expected_depth(cfg.num_layers, 0.5)))
    assert earlybert.training_flops_per_sequence(cfg, 128, 20) == pytest.approx(
        metrics.training_flops_per_sequence(cfg, 128, 20))


def test_flops_of_a_slim_layer():
    cfg = BertConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                     layer_heads=(2, 4), layer_intermediate=(100, 256))
    s, h = 32, 64
    layer0 = 8 * s * h * 32 + 4 * s * h * 100 + 4 * s * s * 32
    layer1 = 8 * s * h * 64 + 4 * s * h * 256 + 4 * s * s * 64
    assert earlybert.encoder_flops_per_sequence(cfg, s) == 3 * (layer0 + layer1)
    assert earlybert.encoder_flops_per_sequence(cfg, s, [0.5, 0.25]) == 3 * (0.5 * layer0 + 0.25 * layer1)


def test_report_of_the_released_ratios_on_base():
    """4 of 12 heads per layer and 40% of the neurons of BERT-base."""
    full = model_config("base", slimming=True)
    slim = dataclasses.replace(full, layer_heads=(8,) * 12, layer_intermediate=(1843,) * 12, slimming=False)
    report = earlybert.ticket_report(full, slim, emergence_step=300, drawn_at=300, weights="rewind", seq_len=128)
    assert report.kept_heads == (8,) * 12 and report.heads == (12,) * 12
    assert report.params_full == earlybert.parameter_count(model_config("base"))
    assert 0.2 < report.param_reduction < 0.45 and 0.3 < report.flop_reduction < 0.45
    lines = report.lines()
    assert lines[0].startswith("earlybert: ticket emerged at step 300") and len(lines) == 14
    assert lines[1] == "earlybert: layer 0: 8/12 heads, 1843/3072 neurons"
    assert report.scalars()["earlybert/emergence_step"] == 300.0


# -- through the engine: the penalty, the draw, checkpoints, export, pld-bench -----------------------


def engine_config(**changes):
    config = load_ds_config("tiny_cpu_pld.json")
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, **changes)
    for key in ("tensorboard", "csv_monitor", "scheduler"):  # a constant learning rate: every step moves weights
        config.pop(key)
    return config


def weights_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """Search two steps with the penalty, draw, train the slim model two steps, save a checkpoint."""
    from pld_ds.engine import PLDEngine

    out = tmp_path_factory.mktemp("earlybert_engine")
    config = engine_config(earlybert={"enabled": True, "lambda_heads": 0.01, "lambda_neurons": 0.001,
                                      "check_interval": 1, "window": 2, "threshold": 1.0, "weights": "continue"})
    eb = EarlyBertConfig.from_ds_config(config)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(slimming=True))
    search = TicketSearch(model, eb)
    engine = PLDEngine(model, config, seed=SEED)
    record = {"coef_before": [c.detach().clone() for c in earlybert.coefficients(engine.module)[1]]}
    batches = [synthetic_batch(batch=4, seq_len=16, seed=i) for i in range(6)]
    engine.eval()
    with torch.no_grad():
        clean = engine(**batches[0])
    engine.train()
    penalty = search.penalty(engine.module).item()
    losses = engine.train_batch(iter(batches[:1]))
    record["search_losses"] = {k: v.item() for k, v in losses.items()}
    record["penalty"], record["clean"] = penalty, clean
    record["over"] = [search.observe(engine.global_steps, engine.module)]
    engine.train_batch(iter(batches[1:2]))
    record["over"].append(search.observe(engine.global_steps, engine.module))
    record["coef_after"] = [c.detach().clone() for c in earlybert.coefficients(engine.module)[1]]
    slim = search.draw(engine.module, seq_len=16)
    engine.engine.destroy()
    record["drawn"] = weights_of(slim)
    engine = PLDEngine(slim, config, seed=SEED)
    record["slim_losses"] = [{k: v.item() for k, v in engine.train_batch(iter([b])).items()} for b in batches[2:4]]
    (out / "run").mkdir()
    write_json(out / "run" / "run_config.json", {"model": dataclasses.asdict(slim.config)})
    ticket = write_json(out / "ticket.json", dataclasses.asdict(slim.config))
    engine.save_checkpoint(out / "run" / "checkpoints")
    record["saved"] = weights_of(engine.module)
    record["steps"] = engine.global_steps
    engine.engine.destroy()
    return search, slim.config, ticket, out / "run", record


def test_search_loss_carries_the_penalty_and_coefficients_train(engine_run):
    search, slim_cfg, _, _, record = engine_run
    losses = record["search_losses"]
    # eval (no penalty) of the same batch with the same weights: dropout is 0
    assert losses["mlm_loss"] == pytest.approx(record["clean"].mlm_loss.item(), abs=1e-6)
    assert losses["loss"] == pytest.approx(losses["mlm_loss"] + losses["nsp_loss"] + record["penalty"], abs=1e-6)
    assert losses["l1_penalty"] == pytest.approx(record["penalty"], abs=1e-6)  # logged apart: train/l1_penalty
    assert record["penalty"] == pytest.approx(0.01 * 4 * 2 + 0.001 * 4 * 128)  # every coefficient still 1
    assert any(not torch.equal(a, b) for a, b in zip(record["coef_before"], record["coef_after"], strict=True))
    assert record["over"] == [False, True] and search.emergence_step == 2  # window 2, threshold 1: second check


def test_slim_model_trains_without_the_penalty(engine_run):
    search, slim_cfg, _, _, record = engine_run
    assert slim_cfg.layer_heads == (1, 1, 1, 1) and not slim_cfg.slimming
    assert search.report.kept_heads == (1, 1, 1, 1) and search.report.flop_reduction > 0
    for losses in record["slim_losses"]:
        assert math.isfinite(losses["loss"])
        assert losses["loss"] == pytest.approx(losses["mlm_loss"] + losses["nsp_loss"], abs=1e-6)
        assert "l1_penalty" not in losses
    assert record["steps"] == 2  # the slim engine counts its own steps
    assert any(not torch.equal(record["drawn"][k], record["saved"][k]) for k in record["saved"])


def test_slim_checkpoint_round_trips_through_the_engine(engine_run):
    from pld_ds.engine import PLDEngine

    _, slim_cfg, ticket, run, record = engine_run
    cfg = model_config(str(ticket))  # the ticket file is a --model file
    assert cfg == slim_cfg
    torch.manual_seed(123)
    engine = PLDEngine(BertForPreTraining(cfg), engine_config(), seed=SEED)
    assert any(not torch.equal(v, record["saved"][k]) for k, v in weights_of(engine.module).items())
    client = engine.load_checkpoint(run / "checkpoints")
    assert client is not None and engine.global_steps == 2
    loaded = weights_of(engine.module)
    assert list(loaded) == list(record["saved"])
    assert all(torch.equal(loaded[k], record["saved"][k]) for k in loaded)
    engine.engine.destroy()


def test_slim_checkpoint_loads_and_exports(engine_run, tmp_path):
    from pld_ds import export

    _, slim_cfg, _, run, record = engine_run
    checkpoint = export.load_checkpoint(run)
    assert checkpoint.config == slim_cfg
    assert all(torch.equal(checkpoint.state_dict[k], record["saved"][k].float()) for k in record["saved"])
    transformers = pytest.importorskip("transformers")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    vocab = export.Vocab(tmp_path / "vocab.txt", tokens, True)
    folder = export.export_weights(checkpoint.state_dict, checkpoint.config, vocab, tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    model = BertForPreTraining(slim_cfg).eval()
    model.load_state_dict(record["saved"])
    batch = synthetic_batch(batch=2, seq_len=12, seed=9, pad=False)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).mlm_logits
        theirs = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_pld_bench_takes_a_slim_model_file(engine_run, monkeypatch):
    _, slim_cfg, ticket, _, _ = engine_run
    built = []

    class Recording(BertForPreTraining):
        def __init__(self, cfg):
            built.append(cfg)
            super().__init__(cfg)

    monkeypatch.setattr(bench, "BertForPreTraining", Recording)
    args = bench.parse_args(["--model", str(ticket), "--seq-len", "16", "--micro-batch", "4", "--steps", "2",
                             "--warmup", "1", "--repeats", "1", "--theta", "1.0", "0.5", "--dropout", "0"])
    rows = bench.run(args)
    assert len(rows) == 2 and all(r.samples_per_sec > 0 for r in rows)
    assert built and all(cfg.layer_heads == slim_cfg.layer_heads for cfg in built)
    assert all(cfg.layer_intermediate == slim_cfg.layer_intermediate for cfg in built)


def test_pld_pretrain_takes_a_slim_model_file(engine_run, tmp_path):
    """pld-pretrain --model ticket.json (what pld-compare passes on): a slim run whose checkpoint exports."""
    from shard_fixtures import make_shard_dir

    from pld_ds import export, pretrain

    _, slim_cfg, ticket, _, _ = engine_run
    data = make_shard_dir(tmp_path / "data")
    args = pretrain.parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data",
                                str(data), "--output", str(tmp_path / "out"), "--model", str(ticket),
                                "--max-steps", "2", "--log-interval", "1"])
    scalars = pretrain.run(args)
    assert math.isfinite(scalars["train/loss"])
    checkpoint = export.load_checkpoint(tmp_path / "out")
    assert checkpoint.config.layer_heads == slim_cfg.layer_heads
    assert checkpoint.config.layer_intermediate == slim_cfg.layer_intermediate
    assert checkpoint.state_dict["encoder.layers.0.ffn.fc1.weight"].shape[0] == slim_cfg.intermediate_in(0)


# -- two CPU ranks through DeepSpeed's launcher ------------------------------------------------------


@pytest.mark.slow
def test_search_and_slim_training_on_two_ranks_with_and_without_pld(tmp_path):
    out = tmp_path / "records.json"
    cmd = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--worker", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for run in json.loads(out.read_text()):
        rank0, rank1 = sorted(run["ranks"], key=lambda r: r["rank"])
        assert rank0["world"] == 2
        assert rank0["ticket"] == rank1["ticket"]  # the same masks on every rank, without communication
        assert rank0["ticket"]["heads"] == [1, 1, 1, 1] and sum(rank0["ticket"]["neurons"]) == round(0.6 * 512)
        assert rank0["slim_initial"] == rank1["slim_initial"] and rank0["slim_final"] == rank1["slim_final"]
        assert rank0["slim_initial"] != rank0["slim_final"]  # the slim model trained
        assert rank0["losses"] != rank1["losses"]  # on different data
        for rank in (rank0, rank1):
            assert all(math.isfinite(v) for v in rank["losses"] + rank["search_losses"])
            assert rank["layers"] == rank["expected_layers"]
        if run["pld"]:
            assert any(len(layers) < 4 for layers in rank0["layers"])  # PLD dropped slim layers
        else:
            assert all(layers == [0, 1, 2, 3] for layers in rank0["layers"])


def worker_run(use_pld: bool) -> dict:
    import torch.distributed as dist

    from pld_ds.engine import PLDEngine

    theta_bar, gamma = 0.3, 3.0  # theta near 0.3 from the second step: layers drop
    config = engine_config(zero_optimization={"stage": 2})
    config["progressive_layer_drop"] = {"enabled": use_pld, "theta": theta_bar, "gamma": gamma}
    config["earlybert"] = {"enabled": True, "check_interval": 1, "window": 3, "max_search_steps": 3,
                           "head_prune_ratio": 0.5, "neuron_prune_ratio": 0.4, "weights": "rewind"}
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(dropout=0.1, slimming=True))
    search = TicketSearch(model, EarlyBertConfig.from_ds_config(config))
    engine = PLDEngine(model, config, seed=SEED)
    rank = dist.get_rank()
    search_losses = []
    while True:
        batch = synthetic_batch(batch=4, seq_len=16, seed=1000 * (rank + 1) + engine.global_steps)
        search_losses.append(engine.train_batch(iter([batch]))["loss"].item())
        if search.observe(engine.global_steps, engine.module):
            break
    slim = search.draw(engine.module, seq_len=16)
    engine.engine.destroy()
    engine = PLDEngine(slim, config, seed=SEED)
    ran: list[int] = []
    for index, layer in enumerate(engine.module.encoder.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    initial, losses, layers, expected = checksum(engine.module), [], [], []
    for step in range(4):
        ran.clear()
        theta_now = engine.get_pld_theta()
        batch = synthetic_batch(batch=4, seq_len=16, seed=5000 * (rank + 1) + step)
        losses.append(engine.train_batch(iter([batch]))["loss"].item())
        gates = pld.sample_gates(4, theta_now, pld.gate_generator(SEED, step, 0)) if use_pld else [(True, 1.0)] * 4
        layers.append(list(ran))
        expected.append([i for i, (kept, _) in enumerate(gates) if kept])
    mine = {"rank": rank, "world": dist.get_world_size(), "search_losses": search_losses, "losses": losses,
            "layers": layers, "expected_layers": expected, "slim_initial": initial,
            "slim_final": checksum(engine.module),
            "ticket": {"heads": list(search.report.kept_heads), "neurons": list(search.report.kept_neurons)}}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    engine.engine.destroy()
    return {"pld": use_pld, "ranks": gathered}


def worker_main(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = [worker_run(use_pld) for use_pld in (False, True)]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    # launched by deepspeed with --local_rank=N (and our --worker OUT)
    worker_main(sys.argv[sys.argv.index("--worker") + 1])


# -- through pld-pretrain --------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_searches_draws_trains_slim_and_resumes_the_slim_phase(tmp_path):
    """The earlybert block in the run's JSON: search with the L1 term, draw at max_search_steps, train the slim
    model on one step axis, checkpoints named by that axis; a resumed run continues the slim model."""
    from shard_fixtures import make_shard_dir

    config = load_ds_config("tiny_cpu_pld.json")
    config["earlybert"] = {"enabled": True, "check_interval": 2, "max_search_steps": 6}
    path = write_json(tmp_path / "eb.json", config)
    data = make_shard_dir(tmp_path / "data", shard_sizes=(64, 64), seq_len=32, validation=32)
    out = tmp_path / "out"

    def pretrain(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pld_ds.pretrain", "--deepspeed_config", str(path), "--data",
                               str(data), "--output", str(out), "--model", "tiny", "--max-steps", str(steps),
                               "--log-interval", "2", "--save-interval", "2", "--resume", "auto"],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)

    first = pretrain(10)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "earlybert: step 6" in first.stdout and "ticket did not emerge by step 6" in first.stdout
    ticket = json.loads((out / "ticket.json").read_text())
    assert len(ticket["layer_heads"]) == 4 and sum(ticket["layer_intermediate"]) < 4 * 128
    record = json.loads((out / "earlybert.json").read_text())
    assert record["search_steps"] == 6 and 0 < record["flop_reduction"] < 1
    # no checkpoint during the search; the slim phase's are named on the run's step axis
    assert checkpoint.complete_tags(out / "checkpoints") == ["global_step8", "global_step10"]
    logged = [int(line.split()[1]) for line in first.stdout.splitlines() if line.startswith("step ")]
    assert logged == [2, 4, 6, 8, 10]
    second = pretrain(14)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "earlybert: step" not in second.stdout  # no new search: the slim model resumed
    rows = [line for line in second.stdout.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in rows] == [12, 14]
    # the resumed slim phase's first rates cover its own 2 steps, not the search's steps again
    assert "(rates over the last 2 steps)" in rows[0]
    state = checkpoint.safe_load(out / "checkpoints" / "global_step14" / "mp_rank_00_model_states.pt")
    qkv = state["module"]["encoder.layers.0.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * ticket["layer_heads"][0] * 64 // 2  # hidden 64, 2 heads of 32: slim shapes
