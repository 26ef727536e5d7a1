"""Phase 2 of the BERT recipe: pld-pretrain --init-from a phase-1 checkpoint or pld-export folder, at a longer
sequence length, with a new optimizer, schedule and data position, and theta's curve continued or restarted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from pld_helpers import REPO, read_csv_scalar, tiny_config, torch_threads
from test_data_prep import WORDS, prep, write_vocab

from pld_ds import pld, pretrain, warm_start
from pld_ds.errors import UserError
from pld_ds.model import BertForPreTraining

PHASE1_STEPS = 60
CONFIG = REPO / "ds_configs" / "tiny_cpu_pld.json"  # theta_bar 0.5, gamma 0.01, warm-up from lr 0
THETA_BAR, GAMMA = 0.5, 0.01


def zipf_corpus(path: Path, docs: int = 150, seed: int = 0) -> Path:
    """Words with Zipf frequencies: a model learns them within tens of steps, so its loss falls well below
    a fresh model's (about ln of the vocabulary size)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    texts = []
    for _ in range(docs):
        sentences = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 14)), p=weights)).capitalize() + "."
                     for _ in range(12)]
        texts.append(" ".join(sentences))
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """Phase-1 shards at length 64, phase-2 shards at 128 (both within the tiny preset's 128 positions, phase 2's
    longer, as 128 -> 512 in the recipe), and a phase-1 run of PHASE1_STEPS steps."""
    root = tmp_path_factory.mktemp("phases")
    vocab = write_vocab(root / "vocab.txt")
    corpus = zipf_corpus(root / "corpus.txt")
    prep([corpus], root / "p1", vocab, max_seq_length=64, max_predictions_per_seq=10)
    prep([corpus], root / "p2", vocab, max_seq_length=128, max_predictions_per_seq=20)
    losses = train(root / "p1", root / "phase1", PHASE1_STEPS)
    return root, losses


def train(data: Path, out: Path, steps: int, *extra: str) -> list[float]:
    """The per-step training MLM losses of a tiny pld-pretrain run."""
    args = pretrain.parse_args(["--deepspeed_config", str(CONFIG), "--data", str(data), "--output", str(out),
                                "--model", "tiny", "--max-steps", str(steps), "--log-interval", "1",
                                "--eval-batches", "2", *extra])
    with torch_threads(1):
        pretrain.run(args)
    return [loss for _, loss in read_csv_scalar(out / "csv" / "run" / "train_mlm_loss.csv")]


def scalar(out: Path, name: str) -> list[tuple[int, float]]:
    return read_csv_scalar(out / "csv" / "run" / f"{name}.csv")


def client_state(out: Path, step: int) -> dict:
    from pld_ds.checkpoint import safe_load

    return safe_load(out / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt")


def test_phase2_loss_continues_from_phase1_not_from_scratch(phases, tmp_path):
    root, phase1 = phases
    assert phase1[0] - phase1[-1] > 1.0, phase1  # phase 1 learned something to hand over
    scratch = train(root / "p2", tmp_path / "scratch", 3)
    warm = train(root / "p2", tmp_path / "warm", 3, "--init-from", str(root / "phase1"))
    # The first phase-2 loss is phase 1's level (positions 64..127 were never trained, hence the margin), far
    # below a fresh model's, which starts where phase 1 started.
    late = float(np.mean(phase1[-10:]))
    assert warm[0] < late + 0.3, (warm, late)
    assert scratch[0] > warm[0] + 1.0, (scratch, warm)
    assert abs(scratch[0] - phase1[0]) < 0.3
    # New optimizer and schedule: the warm-up starts again at lr 0 (phase 1 ended past its warm-up).
    assert scalar(tmp_path / "warm", "train_lr")[0] == (1, 0.0)
    assert scalar(root / "phase1", "train_lr")[-1][1] > 0.0
    # New data position: three batches into the epoch, not phase 1's sixty-three.
    state = client_state(tmp_path / "warm", 3)
    assert (state["data"]["epoch"], state["data"]["batch_in_epoch"]) == (0, 3)
    # theta continues from phase 1's step by default (the row of step s shows the theta step s ran with).
    for step, theta in scalar(tmp_path / "warm", "train_pld_theta"):
        assert theta == pytest.approx(pld.theta(PHASE1_STEPS + step - 1, THETA_BAR, GAMMA))
    assert state["pld"]["step_offset"] == PHASE1_STEPS


def test_theta_restarts_on_request_and_a_resumed_phase2_keeps_its_curve(phases, tmp_path):
    root, _ = phases
    init = ["--init-from", str(root / "phase1")]
    train(root / "p2", tmp_path / "restart", 2, *init, "--init-pld-step", "restart")
    assert [theta for _, theta in scalar(tmp_path / "restart", "train_pld_theta")] == pytest.approx(
        [pld.theta(step, THETA_BAR, GAMMA) for step in (0, 1)])
    # Launched again with the same command (and --resume auto, as the launchers do), the run resumes from its
    # own checkpoint, not from --init-from, and its theta stays on the curve its first start chose.
    train(root / "p2", tmp_path / "continued", 2, *init, "--save-interval", "2")
    train(root / "p2", tmp_path / "continued", 4, *init, "--resume", "auto")
    thetas = dict(scalar(tmp_path / "continued", "train_pld_theta"))
    assert thetas[4] == pytest.approx(pld.theta(PHASE1_STEPS + 3, THETA_BAR, GAMMA))
    assert client_state(tmp_path / "continued", 4)["data"]["batch_in_epoch"] == 4


def test_init_from_an_exported_folder_equals_init_from_the_checkpoint(phases, tmp_path):
    from pld_ds.export import export_checkpoint

    root, _ = phases
    hf = export_checkpoint(root / "phase1", tmp_path / "hf")
    from_ckpt = warm_start.read_initial_weights(str(root / "phase1"))
    from_hf = warm_start.read_initial_weights(str(hf))
    assert from_hf.step == from_ckpt.step == PHASE1_STEPS
    # Everything but the NSP classifier, which an export leaves out, comes back bit for bit.
    assert set(from_ckpt.state_dict) - set(from_hf.state_dict) == {"heads.nsp.weight", "heads.nsp.bias"}
    for name, tensor in from_hf.state_dict.items():
        assert torch.equal(tensor, from_ckpt.state_dict[name]), name
    # Through pld-pretrain: the same first MLM loss as from the checkpoint (same data, gates and weights).
    via_hf = train(root / "p2", tmp_path / "via_hf", 1, "--init-from", str(hf))
    via_ckpt = train(root / "p2", tmp_path / "via_ckpt", 1, "--init-from", str(root / "phase1"))
    assert via_hf[0] == pytest.approx(via_ckpt[0], abs=1e-5)


# -- shape checks, without a run ------------------------------------------------------------------


def weights_of(model: BertForPreTraining, step: int | None = 10) -> warm_start.InitialWeights:
    return warm_start.InitialWeights(dict(model.state_dict()), step, "phase1")


def test_a_short_position_table_is_a_clear_error():
    phase1 = BertForPreTraining(tiny_config(max_position_embeddings=64))
    phase2 = BertForPreTraining(tiny_config(max_position_embeddings=128))
    with pytest.raises(UserError) as err:
        warm_start.load_into(phase2, weights_of(phase1), seq_len=128, shape_source="--model tiny")
    message = str(err.value)
    assert "embeddings.position.weight has 64 positions" in message and "sequence length 128" in message
    assert "max_position_embeddings >= 128 in phase 1's model" in message and "\n" not in message


@pytest.mark.parametrize("change, tensor, shapes", [
    ({"vocab_size": 128}, "embeddings.word.weight", "(100, 64), the model of --model x (128, 64)"),
    ({"intermediate_size": 96}, "encoder.layers.0.ffn.fc1.weight", "(128, 64), the model of --model x (96, 64)"),
    ({"max_position_embeddings": 96}, "embeddings.position.weight", "(128, 64), the model of --model x (96, 64)"),
])
def test_a_shape_mismatch_names_the_tensor_and_both_shapes(change, tensor, shapes):
    with pytest.raises(UserError, match=f"{tensor} has shape {shapes.replace('(', '[(]').replace(')', '[)]')}"):
        warm_start.load_into(BertForPreTraining(dataclasses.replace(tiny_config(), **change)),
                             weights_of(BertForPreTraining(tiny_config())), seq_len=64, shape_source="--model x")


def test_a_missing_layer_is_an_error_but_an_nsp_head_may_come_or_go():
    deeper = BertForPreTraining(tiny_config(num_layers=5))
    with pytest.raises(UserError, match="no tensor encoder.layers.4.attn_norm.weight"):
        warm_start.load_into(deeper, weights_of(BertForPreTraining(tiny_config())), 64, "--model x")
    shallower = BertForPreTraining(tiny_config(num_layers=3))
    with pytest.raises(UserError, match="has tensor encoder.layers.3.attn_norm.weight of shape"):
        warm_start.load_into(shallower, weights_of(BertForPreTraining(tiny_config())), 64, "--model x")

    with_nsp = BertForPreTraining(tiny_config())
    mlm_only = BertForPreTraining(tiny_config(nsp=False))
    notes = warm_start.load_into(mlm_only, weights_of(with_nsp), 64, "--model x")
    assert notes == ["the weights' NSP head is left out (this model is MLM-only)"]
    assert torch.equal(mlm_only.encoder.layers[2].ffn.fc2.weight, with_nsp.encoder.layers[2].ffn.fc2.weight)
    fresh = BertForPreTraining(tiny_config())
    pooler_before = fresh.heads.pooler.weight.clone()
    notes = warm_start.load_into(fresh, weights_of(mlm_only), 64, "--model x")
    assert notes == ["the NSP head starts from its initialisation (not in the weights)"]
    assert torch.equal(fresh.heads.pooler.weight, pooler_before)
    assert torch.equal(fresh.embeddings.word.weight, mlm_only.embeddings.word.weight)


def test_bad_init_from_paths_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--init-from .*nowhere: no such folder"):
        warm_start.read_initial_weights(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        warm_start.read_initial_weights(str(tmp_path / "empty"))


@pytest.mark.parametrize("layer_norm", ["pre", "post"])
@pytest.mark.parametrize("nsp", [True, False])
def test_exported_weights_come_back_whole(tmp_path, layer_norm, nsp):
    """Both export layouts (RoBERTa-PreLN, BERT for PostLN), with and without an NSP head: every tensor comes back
    bit for bit, except the NSP classifier, which the RoBERTa layout has no place for."""
    from pld_ds.export import Vocab, export_weights

    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(nsp=nsp, layer_norm=layer_norm))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zeros or ones that a wrong mapping could match by luck
    tokens = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]  # [PAD] is id 1
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    out = export_weights(dict(model.state_dict()), model.config, Vocab(tmp_path / "vocab.txt", tokens, True),
                         tmp_path / "hf", provenance={"global_step": 7})
    back = warm_start.read_initial_weights(str(out))
    assert back.step == 7
    left_out = {"heads.nsp.weight", "heads.nsp.bias"} if nsp and layer_norm == "pre" else set()
    assert set(model.state_dict()) - set(back.state_dict) == left_out
    for name, tensor in back.state_dict.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_continuing_theta_needs_a_recorded_step_and_flags_are_checked(tmp_path):
    from pld_ds.export import Vocab, export_weights

    model = BertForPreTraining(tiny_config())
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    out = export_weights(dict(model.state_dict()), model.config, Vocab(tmp_path / "vocab.txt", tokens, True),
                         tmp_path / "hf")  # no provenance: no step recorded
    common = ["--deepspeed_config", str(CONFIG), "--data", "d", "--output", "o", "--init-from", str(out)]
    with pytest.raises(UserError, match="records no training step to continue theta's curve from; pass "
                                        "--init-pld-step restart"):
        pretrain.init_weights(BertForPreTraining(tiny_config()), pretrain.parse_args(common), seq_len=64)
    fresh = BertForPreTraining(tiny_config())
    assert pretrain.init_weights(fresh, pretrain.parse_args([*common, "--init-pld-step", "restart"]), 64) == 0
    assert torch.equal(fresh.embeddings.word.weight, model.embeddings.word.weight)
    for bad in (["--init-pld-step", "later"], ["--masked-lm-prob", "0"], ["--masked-lm-prob", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            pretrain.parse_args([*common, *bad])
        assert exit_info.value.code == 2
