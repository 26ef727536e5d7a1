"""PreLN BERT and PLD as a forward argument (pld_ds/model.py)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from pld_helpers import synthetic_batch, tiny_config, tiny_model, torch_threads
from torch import nn

from pld_ds import pld
from pld_ds.config import MODEL_PRESETS, model_config
from pld_ds.data.schema import IGNORE_INDEX
from pld_ds.model import BertConfig, BertForPreTraining, Layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def batch():
    return synthetic_batch(batch=4, seq_len=16)


def find_gates(num_layers, theta_now, want, limit=5000):
    """(step, gates) of the first generator seed whose gates satisfy `want`."""
    for step in range(limit):
        gates = pld.sample_gates(num_layers, theta_now, pld.gate_generator(0, step, 0))
        if want(gates):
            return step, gates
    raise AssertionError("no generator seed gave the wanted gates")


# -- PLD off, on, eval ----------------------------------------------------------------------------


def test_eval_equals_train_without_pld_when_dropout_is_zero(batch):
    model = tiny_model()
    train_out = model.train()(**batch)
    eval_out = model.eval()(**batch)
    assert torch.equal(train_out.loss, eval_out.loss)
    assert torch.equal(train_out.mlm_logits, eval_out.mlm_logits)
    assert torch.equal(train_out.nsp_logits, eval_out.nsp_logits)
    # with dropout the two modes differ (the comparison above is not vacuous)
    noisy = tiny_model(dropout=0.1)
    assert not torch.equal(noisy.train()(**batch).mlm_logits, noisy.eval()(**batch).mlm_logits)
    assert train_out.layers_run == eval_out.layers_run == 4


def test_theta_one_is_exactly_no_pld(batch):
    model = tiny_model().train()
    plain = model(**batch)
    for step in range(5):
        with_pld = model(**batch, progressive_layer_drop=True, pld_theta=1.0,
                         pld_generator=pld.gate_generator(0, step, 0))
        assert with_pld.layers_run == 4
        assert torch.equal(with_pld.loss, plain.loss)
        assert torch.equal(with_pld.mlm_logits, plain.mlm_logits)
        assert torch.equal(with_pld.nsp_logits, plain.nsp_logits)


def test_pld_changes_the_output_when_theta_is_low(batch):
    """The counterpart of the test above: PLD at theta 0.3 with a gate pattern that drops a layer differs."""
    model = tiny_model().train()
    step, gates = find_gates(4, 0.3, lambda g: not all(k for k, _ in g))
    plain = model(**batch)
    with_pld = model(**batch, progressive_layer_drop=True, pld_theta=0.3, pld_generator=pld.gate_generator(0, step, 0))
    assert with_pld.layers_run == sum(k for k, _ in gates) < 4
    assert not torch.allclose(with_pld.loss, plain.loss)


def test_eval_mode_runs_every_layer_with_pld_requested(batch):
    model = tiny_model().eval()
    plain = model(**batch)
    for step in range(10):
        out = model(**batch, progressive_layer_drop=True, pld_theta=0.1, pld_generator=pld.gate_generator(0, step, 0))
        assert out.layers_run == model.config.num_layers
        assert torch.equal(out.loss, plain.loss)
        assert torch.equal(out.mlm_logits, plain.mlm_logits)


# -- dropped layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dropped_layer", [1, 3])
def test_dropped_layer_is_skipped_and_gets_no_gradient(batch, dropped_layer):
    model = tiny_model().train()
    step, gates = find_gates(4, 0.3, lambda g: not g[dropped_layer][0] and sum(k for k, _ in g) >= 2)
    ran = []
    handles = [layer.register_forward_hook(lambda m, i, o, idx=idx: ran.append(idx))
               for idx, layer in enumerate(model.encoder.layers)]
    out = model(**batch, progressive_layer_drop=True, pld_theta=0.3, pld_generator=pld.gate_generator(0, step, 0))
    for h in handles:
        h.remove()
    kept = [i for i, (k, _) in enumerate(gates) if k]
    assert ran == kept
    assert dropped_layer not in ran
    assert out.layers_run == len(kept)
    out.loss.backward()
    for idx, layer in enumerate(model.encoder.layers):
        grads = [p.grad for p in layer.parameters()]
        if idx in kept:
            assert all(g is not None for g in grads), idx
            assert any(g.abs().sum() > 0 for g in grads), idx
        else:
            assert all(g is None for g in grads), idx
    # the rest of the model trains as usual
    assert model.embeddings.word.weight.grad is not None
    assert model.encoder.final_norm.weight.grad is not None


def test_all_layers_dropped_is_final_norm_of_embeddings(batch):
    model = tiny_model().train()
    x = model.embeddings(batch["input_ids"], batch["token_type_ids"])
    mask = batch["attention_mask"].bool()[:, None, None, :]
    hidden, layers_run = model.encoder(x, mask, [(False, p) for p in pld.keep_probs(4, 0.5)])
    assert layers_run == 0
    assert torch.equal(hidden, model.encoder.final_norm(x))
    full, layers_run = model.encoder(x, mask, None)
    assert layers_run == 4
    assert not torch.allclose(full, hidden)


def test_dropping_one_layer_equals_running_the_others(batch):
    """Gates (kept, p) with layer 2 dropped equal running layers 0, 1, 3 by hand with their p."""
    model = tiny_model().train()
    x = model.embeddings(batch["input_ids"], batch["token_type_ids"])
    mask = batch["attention_mask"].bool()[:, None, None, :]
    probs = pld.keep_probs(4, 0.5)
    gates = [(i != 2, p) for i, p in enumerate(probs)]
    hidden, layers_run = model.encoder(x, mask, gates)
    manual = x
    for i in (0, 1, 3):
        manual = model.encoder.layers[i](manual, mask, probs[i])
    assert layers_run == 3
    assert torch.equal(hidden, model.encoder.final_norm(manual))


# -- the PreLN layer against PyTorch's reference --------------------------------------------------


def reference_layer(layer: Layer, cfg: BertConfig) -> nn.TransformerEncoderLayer:
    ref = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, dropout=0.0,
                                     activation="gelu", batch_first=True, norm_first=True,
                                     layer_norm_eps=cfg.layer_norm_eps)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(layer.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(layer.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(layer.attn.out.weight)
        ref.self_attn.out_proj.bias.copy_(layer.attn.out.bias)
        ref.linear1.weight.copy_(layer.ffn.fc1.weight)
        ref.linear1.bias.copy_(layer.ffn.fc1.bias)
        ref.linear2.weight.copy_(layer.ffn.fc2.weight)
        ref.linear2.bias.copy_(layer.ffn.fc2.bias)
        ref.norm1.weight.copy_(layer.attn_norm.weight)
        ref.norm1.bias.copy_(layer.attn_norm.bias)
        ref.norm2.weight.copy_(layer.ffn_norm.weight)
        ref.norm2.bias.copy_(layer.ffn_norm.bias)
    return ref


def randomized_layer(cfg: BertConfig, seed: int = 0) -> Layer:
    """A layer with every parameter random (biases and norms too), so a mis-mapped weight shows."""
    torch.manual_seed(seed)
    layer = Layer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == cfg.hidden_size else 0.0))
    return layer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_equals_torch_transformer_encoder_layer(mode, padded):
    cfg = tiny_config(dropout=0.0)
    layer = randomized_layer(cfg)
    ref = reference_layer(layer, cfg)
    layer.train(mode == "train")
    ref.train(mode == "train")
    torch.manual_seed(1)
    x = torch.randn(3, 10, cfg.hidden_size)
    if padded:
        attend = torch.ones(3, 10, dtype=torch.bool)
        attend[0, 6:] = False
        attend[2, 3:] = False
        ours = layer(x, attend[:, None, None, :])
        theirs = ref(x, src_key_padding_mask=~attend)
        # PyTorch's eval fast path may zero padded positions; real positions must agree
        assert torch.allclose(ours[attend], theirs[attend], atol=1e-5)
        if mode == "train":
            assert torch.allclose(ours, theirs, atol=1e-5)
        # and the mask matters: without it the real positions of padded rows differ
        unmasked = layer(x, None)
        assert not torch.allclose(unmasked[0, :6], ours[0, :6], atol=1e-4)
    else:
        ours = layer(x, None)
        theirs = ref(x)
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("keep_prob", [0.9, 0.5, 0.25])
def test_layer_rescales_sublayer_outputs_by_one_over_p(keep_prob):
    cfg = tiny_config(dropout=0.0)
    layer = randomized_layer(cfg).eval()
    torch.manual_seed(2)
    x = torch.randn(2, 8, cfg.hidden_size)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask = mask[:, None, None, :]
    with torch.no_grad():
        attn_out = layer.attn(layer.attn_norm(x), mask)
        mid = x + attn_out / keep_prob
        expected = mid + layer.ffn(layer.ffn_norm(mid)) / keep_prob
        got = layer(x, mask, keep_prob)
        unscaled = layer(x, mask, 1.0)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, unscaled, atol=1e-3)
    # p = 1 is x + attn then + ffn with no scaling
    with torch.no_grad():
        mid1 = x + layer.attn(layer.attn_norm(x), mask)
        assert torch.allclose(unscaled, mid1 + layer.ffn(layer.ffn_norm(mid1)), atol=1e-6)


def test_layer_takes_one_over_p_as_a_tensor():
    cfg = tiny_config(dropout=0.0)
    layer = randomized_layer(cfg).eval()
    x = torch.randn(2, 8, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, None, 1.0, torch.tensor(1 / 0.4)), layer(x, None, 0.4))


def test_compiled_layers_train_like_eager_layers_with_one_graph_for_every_theta(batch):
    """compile_layers (here with dynamo's aot_eager backend: the graph capture without inductor's code
    generation): the loss and every gradient equal the eager model's under the same gates, and PLD
    training at any theta, the first step's theta = 1 included, reuses one captured graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny_model(seed=3), tiny_model(seed=3).compile_layers(backend="aot_eager")
    graphs = []
    for step, theta_now in enumerate([1.0, 0.8, 0.55, 0.5]):
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now,
                        pld_generator=pld.gate_generator(0, step, 0))
            out.loss.backward()
            grads.append((out.loss.detach(), out.layers_run,
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (loss_e, run_e, grad_e), (loss_c, run_c, grad_c) = grads
        assert run_e == run_c and loss_c.item() == pytest.approx(loss_e.item(), rel=1e-6)
        assert grad_e.keys() == grad_c.keys()
        for name, grad in grad_e.items():
            torch.testing.assert_close(grad_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 1]
    assert not counters["recompiles"]


def test_compiled_layers_never_break_the_graph_or_recompile_across_gate_patterns_and_modes(batch):
    """Every gate pattern (each layer alone, all but one, every layer, none), theta from 1 to 0.1, training
    without PLD and evaluation: dynamo captures each layer whole (no graph break) and the layers share at
    most three graphs (PLD training, training without PLD, evaluation); the counts stop growing after the
    first pass over the patterns."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(seed=5).compile_layers(backend="eager")
    layers = model.config.num_layers
    patterns = [[i == j for j in range(layers)] for i in range(layers)]
    patterns += [[i != j for j in range(layers)] for i in range(layers)] + [[True] * layers, [False] * layers]
    wanted = {tuple(p) for p in patterns}
    seen, graphs = set(), []
    for rounds in range(2):
        for theta_now in (1.0, 0.9, 0.7, 0.5, 0.3, 0.1):
            for step in range(200):
                gates = pld.sample_gates(layers, theta_now, pld.gate_generator(0, step, 0))
                pattern = tuple(kept for kept, _ in gates)
                if pattern in seen and rounds == 0 or (rounds == 1 and step > 3):
                    continue
                seen.add(pattern)
                model.train()
                out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now,
                            pld_generator=pld.gate_generator(0, step, 0))
                out.loss.backward()
        model.train()
        model(**batch).loss.backward()  # training without PLD
        model.eval()
        with torch.no_grad():
            model(**batch)
        graphs.append((counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())))
    assert len(seen & wanted) >= 2 * layers, "the gates drawn should cover most single-layer and all-but-one patterns"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0][0] <= 3 and graphs[1] == graphs[0]


def test_compiled_layers_see_a_bounded_number_of_graphs_over_length_buckets():
    """Batches cut to three bucket lengths (ShardBatches(length_buckets=...)), twice over, under PLD: the
    graph count is fixed after the first pass and at most one per bucket, with no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(seed=6).compile_layers(backend="eager")
    counts = []
    for rounds in range(2):
        for width in (16, 24, 32):
            out = model(**synthetic_batch(batch=4, seq_len=width, seed=width), progressive_layer_drop=True,
                        pld_theta=0.6, pld_generator=pld.gate_generator(0, rounds, width))
            out.loss.backward()
        counts.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counts[0] == counts[1] <= 3


# -- the unpadded path ----------------------------------------------------------------------------


def padded_and_unpadded(seed=4, **overrides):
    padded = tiny_model(seed=seed, **overrides)
    unpadded = tiny_model(seed=seed, unpadded=True, **overrides)
    unpadded.load_state_dict(padded.state_dict())
    if overrides.get("slimming"):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for a, b in zip(padded.parameters(), unpadded.parameters(), strict=True):
                if a.dim() == 1 and a.shape[0] in (2, 128) and torch.equal(a, torch.ones_like(a)):
                    a.copy_(torch.rand(a.shape, generator=g) + 0.5)
                    b.copy_(a)
    return padded, unpadded


@pytest.mark.parametrize("case", ["plain", "pld", "slimming", "checkpointing"])
def test_unpadded_path_equals_the_padded_one_in_outputs_and_gradients(case):
    """The encoder on the real tokens alone (nested-tensor SDPA) gives the padded path's MLM and NSP
    outputs, losses and the gradient of every weight, with padding in most rows, under PLD gates that drop
    layers, with EarlyBERT's head coefficients and with activation checkpointing."""
    overrides = {"slimming": {"slimming": True}, "checkpointing": {"activation_checkpointing": True}}.get(case, {})
    padded, unpadded = padded_and_unpadded(**overrides)
    batch = synthetic_batch(batch=6, seq_len=24, seed=2)
    lengths = batch["attention_mask"].sum(1)
    assert (lengths < 24).sum() >= 3 and len(set(lengths.tolist())) >= 3
    kwargs = {}
    if case == "pld":
        step, _ = find_gates(4, 0.4, lambda g: 1 <= sum(k for k, _ in g) <= 3)
        kwargs = dict(progressive_layer_drop=True, pld_theta=0.4, pld_generator=pld.gate_generator(0, step, 0))
    outs = []
    for model in (padded, unpadded):
        model.train().zero_grad(set_to_none=True)
        if kwargs:
            kwargs["pld_generator"] = pld.gate_generator(0, step, 0)
        out = model(**batch, **kwargs)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = outs
    assert a.layers_run == b.layers_run and (case != "pld" or a.layers_run < 4)
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_logits", "nsp_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=2e-6, msg=name)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=2e-6, msg=name)


def test_unpadded_hidden_states_equal_at_real_positions_and_are_zero_at_padding():
    padded, unpadded = padded_and_unpadded()
    batch = synthetic_batch(batch=5, seq_len=20, seed=3)
    real = batch["attention_mask"].bool()
    hidden = []
    for model in (padded.eval(), unpadded.eval()):
        x = model.embeddings(batch["input_ids"], batch["token_type_ids"])
        hidden.append(model.encoder(x, real[:, None, None, :])[0])
    torch.testing.assert_close(hidden[1][real], hidden[0][real], rtol=1e-5, atol=2e-6)
    assert not hidden[1][~real].any() and hidden[0][~real].abs().sum() > 0


def test_unpadded_path_names_a_row_without_real_tokens():
    _, unpadded = padded_and_unpadded()
    batch = synthetic_batch(batch=3, seq_len=8)
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="no real token"):
        unpadded(**batch)


# -- heads and losses -----------------------------------------------------------------------------


def test_mlm_logits_at_masked_positions_equal_full_logits(batch):
    model = tiny_model().eval()
    labels = batch["masked_lm_labels"]
    inputs = {k: v for k, v in batch.items() if k != "masked_lm_labels"}
    full = model(**inputs)
    assert full.mlm_logits.shape == (4, 16, model.config.vocab_size)
    assert full.mlm_loss is None
    masked = model(**inputs, masked_lm_labels=labels)
    selected = labels != IGNORE_INDEX
    assert masked.mlm_logits.shape == (int(selected.sum()), model.config.vocab_size)
    assert torch.allclose(masked.mlm_logits, full.mlm_logits[selected], atol=1e-5)


def test_decoder_is_tied_to_word_embeddings(batch):
    model = tiny_model().train()
    assert model.heads.decoder.weight is model.embeddings.word.weight
    params = list(model.parameters())
    assert sum(p is model.embeddings.word.weight for p in params) == 1  # counted once
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(**batch).loss.backward()
    opt.step()
    assert model.heads.decoder.weight is model.embeddings.word.weight
    assert model.heads.decoder.weight.data_ptr() == model.embeddings.word.weight.data_ptr()


def test_mlm_and_nsp_losses_by_hand(batch):
    model = tiny_model().eval()
    out = model(**batch)
    labels = batch["masked_lm_labels"]
    targets = labels[labels != IGNORE_INDEX]
    log_probs = torch.log_softmax(out.mlm_logits.double(), dim=-1)
    mlm = -log_probs[torch.arange(len(targets)), targets].mean()
    assert out.mlm_loss.item() == pytest.approx(mlm.item(), rel=1e-5)
    nsp_log_probs = torch.log_softmax(out.nsp_logits.double(), dim=-1)
    nsp = -nsp_log_probs[torch.arange(4), batch["next_sentence_labels"]].mean()
    assert out.nsp_loss.item() == pytest.approx(nsp.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(mlm.item() + nsp.item(), rel=1e-5)
    # an untrained model is close to uniform over the vocabulary
    assert out.mlm_loss.item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=0.1)


def test_loss_without_nsp_labels_is_mlm_only(batch):
    model = tiny_model().eval()
    inputs = {k: v for k, v in batch.items() if k != "next_sentence_labels"}
    out = model(**inputs)
    assert out.nsp_loss is None
    assert torch.equal(out.loss, out.mlm_loss)
    assert out.nsp_logits.shape == (4, 2)


def test_padding_does_not_change_real_positions():
    """A padded token's id must not influence real positions (the attention mask works end to end)."""
    model = tiny_model().eval()
    batch = synthetic_batch(batch=2, seq_len=12)
    batch["attention_mask"][:, 8:] = 0
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][:, 8:] = 77
    labels = batch["masked_lm_labels"].clone()
    labels[:, 8:] = IGNORE_INDEX
    a = model(**{**batch, "masked_lm_labels": labels})
    b = model(**{**other, "masked_lm_labels": labels})
    assert torch.allclose(a.mlm_logits, b.mlm_logits, atol=1e-5)
    assert torch.allclose(a.nsp_logits, b.nsp_logits, atol=1e-5)


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, fragment", [
    (dict(hidden_size=65, num_heads=2), "not divisible"),
    (dict(hidden_size=64, num_heads=3), "not divisible"),
    (dict(num_layers=-1), "num_layers"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(intermediate_size=-1), "intermediate_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(num_layers=2.5), "num_layers"),
])
def test_bert_config_rejects_bad_values(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        BertConfig(**fields)


def test_bert_config_defaults_are_bert_base():
    cfg = BertConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (768, 12, 12, 3072)
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= 30522


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_is_a_valid_config(name):
    cfg = model_config(name)
    assert isinstance(cfg, BertConfig)
    for key, value in MODEL_PRESETS[name].items():
        assert getattr(cfg, key) == value
    assert cfg.hidden_size % cfg.num_heads == 0
    assert cfg.intermediate_size == 4 * cfg.hidden_size or name == "tiny"


@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_small_presets_build_and_run(name):
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_config(name), vocab_size=128)
    model = BertForPreTraining(cfg).eval()
    assert len(model.encoder.layers) == cfg.num_layers
    batch = synthetic_batch(batch=2, seq_len=8, vocab=128)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.layers_run == cfg.num_layers


def test_activation_checkpointing_gives_the_same_loss_and_grads(batch):
    plain = tiny_model().train()
    ckpt = tiny_model(activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    step, _ = find_gates(4, 0.3, lambda g: not all(k for k, _ in g))
    losses = []
    for m in (plain, ckpt):
        out = m(**batch, progressive_layer_drop=True, pld_theta=0.3, pld_generator=pld.gate_generator(0, step, 0))
        out.loss.backward()
        losses.append(out.loss)
    assert torch.allclose(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_residual_projections_get_scaled_init():
    model = tiny_model(num_layers=8)
    std = model.encoder.layers[0].attn.out.weight.std().item()
    assert std == pytest.approx(0.02 / 4.0, rel=0.2)  # 0.02 / sqrt(2 * 8)
    assert model.encoder.layers[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)


# -- PostLN (the original BERT layout) ------------------------------------------------------------


def randomised(model: BertForPreTraining, seed: int = 0) -> BertForPreTraining:
    """Every weight random, LayerNorms and biases included, so that no wrong mapping can hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1))
    return model.eval()


def test_postln_layout_has_no_final_norm_and_normalises_after_each_add():
    pre, post = tiny_model(), tiny_model(layer_norm="post")
    assert "encoder.final_norm.weight" in pre.state_dict()
    assert not any(name.startswith("encoder.final_norm") for name in post.state_dict())
    layer = post.encoder.layers[0].eval()
    x = torch.randn(2, 5, 64) * 3 + 1
    out = layer(x, None)
    # LayerNorm (weight 1, bias 0 at init) is the last operation: every row has mean 0 and variance 1
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    with torch.no_grad():  # by hand: LN(x + attn(x)), then LN(h + ffn(h))
        h = layer.attn_norm(x + layer.attn(x, None))
        torch.testing.assert_close(out, layer.ffn_norm(h + layer.ffn(h)))
    with pytest.raises(ValueError, match='layer_norm must be "pre" or "post"'):
        BertConfig(layer_norm="middle")


def test_postln_equals_transformers_bert_for_pretraining(tmp_path):
    """Our PostLN model exported to transformers' BertForPreTraining (the original BERT) gives the same MLM
    and NSP logits, padded rows included: the layout and the export mapping are both checked."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from pld_ds.export import Vocab, export_weights

    model = randomised(tiny_model(layer_norm="post"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(model.config.vocab_size - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    out = export_weights(model.state_dict(), model.config, Vocab(tmp_path / "vocab.txt", tokens, True), tmp_path / "hf")
    hf = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
    assert type(hf).__name__ == "BertForPreTraining"
    batch = synthetic_batch(batch=4, seq_len=16)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        ours, theirs = model(**inputs), hf(**inputs)
    real = batch["attention_mask"].bool()
    assert ours.mlm_logits.std() > 1.0  # logits of substance
    torch.testing.assert_close(theirs.prediction_logits[real], ours.mlm_logits[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs.seq_relationship_logits, ours.nsp_logits, rtol=0, atol=1e-4)
    # the same weights in the PreLN layout compute something else: the comparison can fail
    pre = tiny_model()
    pre.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(pre.eval()(**inputs).mlm_logits[real], ours.mlm_logits[real], atol=1e-2)


def test_pld_on_postln_warns_and_still_drops_layers(batch):
    model = tiny_model(layer_norm="post").train()
    step, gates = find_gates(4, 0.3, lambda g: sum(kept for kept, _ in g) == 2)
    with pytest.warns(UserWarning, match="PostLN"):
        out = model(**batch, progressive_layer_drop=True, pld_theta=0.3, pld_generator=pld.gate_generator(0, step, 0))
    assert out.layers_run == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model().train()(**batch, progressive_layer_drop=True, pld_theta=0.3)  # PreLN: no warning
