"""pld-export: checkpoints (plain and ZeRO-partitioned) -> a Hugging Face RobertaPreLayerNorm folder."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pld_helpers import (
    REPO,
    child_env,
    console_script,
    free_port,
    load_ds_config,
    tiny_config,
    torch_threads,
    write_json,
)
from shard_fixtures import make_shard_dir

from pld_ds.errors import UserError
from pld_ds.export import (
    Vocab,
    export_weights,
    find_step_dir,
    find_vocab,
    load_checkpoint,
    load_pooler,
    looks_lowercase,
    main,
    safe_load,
)
from pld_ds.model import BertConfig, BertForPreTraining

EXPORT_FILES = {"config.json", "model.safetensors", "pooler.safetensors", "vocab.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "pld_export.json"}
# A vocabulary whose [PAD] is not id 0, so that the position offset (pad_token_id + 1) is exercised.
SPECIALS_PAD_2 = ["[UNK]", "[unused0]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", ".", ","]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def write_vocab(path: Path, tokens: list[str]) -> Vocab:
    path.write_text("\n".join(tokens) + "\n")
    return Vocab(path, tokens, lowercase=True)


def random_model(seed: int = 0, **config) -> BertForPreTraining:
    """Every weight random, biases and LayerNorms included, so that a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    model = BertForPreTraining(tiny_config(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1))
    return model.eval()


def padded_batch(pad_id: int, vocab_size: int = 100, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab_size, (4, 16), generator=g)
    mask = (torch.arange(16)[None, :] < torch.tensor([16, 11, 6, 3])[:, None]).long()
    types = (torch.arange(16)[None, :] >= 4).long() * mask
    return {"input_ids": torch.where(mask.bool(), ids, pad_id), "token_type_ids": types, "attention_mask": mask}


def hf_masked_lm(transformers, folder: Path):
    model = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "RobertaPreLayerNormForMaskedLM"
    return model


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    pytest.importorskip("safetensors")
    tmp = tmp_path_factory.mktemp("random_export")
    vocab = write_vocab(tmp / "vocab.txt", SPECIALS_PAD_2 + WORDS + [f"w{i}" for i in range(82)])
    model = random_model()
    out = export_weights(model.state_dict(), model.config, vocab, tmp / "hf")
    return model, vocab, out


# -- the mapping: exported logits equal ours ------------------------------------------------------


def test_export_folder_holds_weights_config_and_tokenizer(random_export):
    _, _, out = random_export
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "roberta-prelayernorm"
    assert config["architectures"] == ["RobertaPreLayerNormForMaskedLM"]
    assert config["pad_token_id"] == 2 and config["max_position_embeddings"] == 128 + 3
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.bias").dtype == torch.float32
    assert "lm_head.decoder.weight" not in names  # tied to the word embeddings, stored once


def test_masked_lm_logits_equal_ours(transformers, random_export):
    model, vocab, out = random_export
    hf = hf_masked_lm(transformers, out)
    batch = padded_batch(pad_id=2)
    with torch.no_grad():
        ours = model(**batch).mlm_logits
        theirs = hf(**batch).logits
        real = batch["attention_mask"].bool()
        assert ours.std() > 1.0  # logits of substance, not near-zero values that any mapping would match
        torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
        # transformers numbers pad tokens' positions pad_token_id, so only real positions match by default;
        # with our positions passed explicitly, every position matches, padding included.
        positions = (torch.arange(16) + 3).expand(4, -1)
        torch.testing.assert_close(hf(**batch, position_ids=positions).logits, ours, rtol=0, atol=1e-5)


def test_masked_lm_loads_with_no_unexpected_or_missing_weights(transformers, random_export):
    """model.safetensors holds exactly what the architecture in config.json expects (the pooler once sat in it
    as classifier.dense, and every load reported `classifier.dense.bias | UNEXPECTED`)."""
    _, _, out = random_export
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"], info
    assert json.loads((out / "pld_export.json").read_text())["pooler"] == "pooler.safetensors"


def test_sequence_classification_loads_export_with_our_pooler(transformers, random_export):
    """The classification head is dense-tanh-linear like our pooler + NSP: given our NSP weights it must
    reproduce our NSP logits, which proves the encoder, final norm and pooler mapping."""
    model, _, out = random_export
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=2).eval()
    assert type(hf).__name__ == "RobertaPreLayerNormForSequenceClassification"
    assert load_pooler(hf, out)  # the pooler travels beside the weights: load_pooler (pld-finetune --hf) puts it in
    torch.testing.assert_close(hf.classifier.dense.weight, model.heads.pooler.weight, rtol=0, atol=0)
    batch = padded_batch(pad_id=2)
    with torch.no_grad():
        fresh = hf(**batch).logits
        hf.classifier.out_proj.weight.copy_(model.heads.nsp.weight)
        hf.classifier.out_proj.bias.copy_(model.heads.nsp.bias)
        torch.testing.assert_close(hf(**batch).logits, model(**batch).nsp_logits, rtol=0, atol=1e-5)
    assert fresh.shape == (4, 2) and torch.isfinite(fresh).all()


def test_finetune_hf_classifier_starts_from_our_pooler(transformers, random_export):
    from pld_ds.finetune.run import HFBackbone

    model, _, out = random_export
    classifier = HFBackbone(str(out)).classifier(3).model
    torch.testing.assert_close(classifier.classifier.dense.weight, model.heads.pooler.weight, rtol=0, atol=0)
    torch.testing.assert_close(classifier.classifier.dense.bias, model.heads.pooler.bias, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(BertConfig, "heads_in"), reason="the model has no per-layer widths")
def test_slim_layers_and_slimming_coefficients_export_exactly(transformers, tmp_path, random_export):
    """EarlyBERT models: coefficients fold into the next projection, pruned heads and neurons are zero-padded."""
    _, vocab, _ = random_export
    model = random_model(seed=3, layer_heads=(2, 1, 1, 2), layer_intermediate=(128, 40, 7, 96), slimming=True)
    assert model.encoder.layers[1].attn.head_coef.shape == (1,)
    out = export_weights(model.state_dict(), model.config, vocab, tmp_path / "slim")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["intermediate_size"] == 128
    batch = padded_batch(pad_id=2)
    with torch.no_grad():
        ours, theirs = model(**batch).mlm_logits, hf_masked_lm(transformers, out)(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)


def test_bfloat16_export_is_close(transformers, tmp_path, random_export):
    model, vocab, _ = random_export
    out = export_weights(model.state_dict(), model.config, vocab, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).float().eval()
    assert hf.lm_head.dense.weight.dtype == torch.float32
    batch = padded_batch(pad_id=2)
    with torch.no_grad():
        ours, theirs = model(**batch).mlm_logits, hf(**batch).logits
    real = batch["attention_mask"].bool()
    error = (theirs[real] - ours[real]).abs().max()
    assert 0 < error < 0.05 * ours.abs().max()  # bf16 rounding: close, not equal


def test_tokenizer_loads_offline_as_bert_wordpiece(transformers, random_export):
    from tokenizers import BertWordPieceTokenizer

    _, vocab, out = random_export
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert "Bert" in type(tok).__name__
    assert tok.pad_token_id == 2 and tok.cls_token_id == 3 and tok.sep_token_id == 4 and tok.mask_token_id == 5
    reference = BertWordPieceTokenizer(str(vocab.path), lowercase=True)
    a, b = "The CAT sat on the mat.", "A dog ran far away, zebra"
    expected = reference.encode(a, b)
    got = tok(a, b)
    assert got["input_ids"] == expected.ids and got["token_type_ids"] == expected.type_ids
    assert got["input_ids"][0] == 3 and got["input_ids"].count(4) == 2 and 0 in got["input_ids"]  # zebra: [UNK]


def test_looks_lowercase():
    assert looks_lowercase(["[PAD]", "[UNK]", "the", "##s"])
    assert not looks_lowercase(["[PAD]", "The", "the"])


# -- real checkpoints -----------------------------------------------------------------------------

FIXTURE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(83)]


def start_pretrain(data: Path, out: Path, config: str | Path, steps: int = 3) -> subprocess.Popen:
    """A tiny pretraining run in its own process (DeepSpeed keeps process groups in module state)."""
    cmd = [sys.executable, "-m", "pld_ds.pretrain", "--deepspeed_config", str(config), "--data", str(data),
           "--output", str(out), "--model", "tiny", "--max-steps", str(steps), "--log-interval", str(steps)]
    out.mkdir(parents=True)
    with open(out / "pretrain.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path) -> Path:
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, (out / "pretrain.log").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = make_shard_dir(tmp_path_factory.mktemp("export_data"), shard_sizes=(32, 32), seq_len=32)
    (data / "vocab.txt").write_text("\n".join(FIXTURE_VOCAB) + "\n")
    (data / "manifest.json").write_text(json.dumps({"vocab": {"size": 100, "file": "vocab.txt", "lowercase": True}}))
    return data


def zero_config(tmp: Path, stage: int, **changes) -> Path:
    config = load_ds_config("tiny_cpu_bf16_zero2_pld.json")
    config["zero_optimization"] = {"stage": stage}
    config.update(changes)
    return write_json(tmp / f"zero{stage}.json", config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Run folders of tiny pretraining runs: fp32 without ZeRO, bf16 with ZeRO-2 and with ZeRO-3."""
    tmp = tmp_path_factory.mktemp("export_runs")
    configs = {"plain": REPO / "ds_configs" / "tiny_cpu_pld.json", "zero2": zero_config(tmp, 2),
               "zero3": zero_config(tmp, 3)}
    procs = {name: start_pretrain(data_dir, tmp / name, config) for name, config in configs.items()}
    return {name: finish(proc, tmp / name) for name, proc in procs.items()}


def deepspeed_fp32(run: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation, as the reference (it unpickles fully: fine on files made here)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))


def model_states(run: Path) -> dict:
    step_dir = find_step_dir(run)
    name = next(step_dir.glob("*mp_rank_00_model_states.pt"))
    return torch.load(name, map_location="cpu", weights_only=False)  # reference read of a file made here


@pytest.mark.slow
def test_plain_checkpoint_loads_module_weights(runs):
    ckpt = load_checkpoint(runs["plain"])
    module = model_states(runs["plain"])["module"]
    assert ckpt.step_dir.name == "global_step3" and ckpt.info["global_step"] == 3 and ckpt.info["zero_stage"] == 0
    assert ckpt.info["pld"]["enabled"] is True and ckpt.config.hidden_size == 64 and ckpt.config.vocab_size == 128
    assert set(ckpt.state_dict) == set(module)
    for name, tensor in module.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name
    # the run folder, its checkpoints folder and the step folder name the same checkpoint
    assert find_step_dir(runs["plain"] / "checkpoints") == find_step_dir(ckpt.step_dir) == ckpt.step_dir


def test_find_step_dir_without_latest_takes_the_newest(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / "checkpoints" / f"global_step{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".partial-global_step12").mkdir()
    assert find_step_dir(tmp_path) == tmp_path / "checkpoints" / "global_step10"
    (tmp_path / "checkpoints" / "latest").write_text("global_step9\n")
    assert find_step_dir(tmp_path) == tmp_path / "checkpoints" / "global_step9"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_merges_like_deepspeed(runs, stage):
    run = runs[f"zero{stage}"]
    ckpt = load_checkpoint(run)
    assert ckpt.info["zero_stage"] == stage
    reference = deepspeed_fp32(run)
    assert set(ckpt.state_dict) == set(reference)
    for name, tensor in reference.items():
        assert ckpt.state_dict[name].dtype == torch.float32
        assert torch.equal(ckpt.state_dict[name], tensor), name
    if stage == 2:  # the module holds the bf16 copies of the fp32 master weights we recovered
        module = model_states(run)["module"]
        assert all(torch.equal(ckpt.state_dict[n].to(torch.bfloat16), module[n]) for n in module)
        assert any(not torch.equal(ckpt.state_dict[n], module[n].float()) for n in module)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "zero3"])
def test_cli_export_logits_equal_checkpoint_model(transformers, tmp_path, runs, kind, capsys):
    out = tmp_path / "hf"
    main([str(runs[kind]), str(out)])
    assert "pld-export: wrote" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    record = json.loads((out / "pld_export.json").read_text())
    assert record["global_step"] == 3 and record["vocab"].endswith("vocab.txt") and record["lowercase"] is True
    reference = deepspeed_fp32(runs[kind]) if kind == "zero3" else model_states(runs[kind])["module"]
    model = BertForPreTraining(load_checkpoint(runs[kind]).config)
    model.load_state_dict({k: v.float() for k, v in reference.items()})
    model.eval()
    batch = padded_batch(pad_id=0)
    with torch.no_grad():
        ours, theirs = model(**batch).mlm_logits, hf_masked_lm(transformers, out)(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_ids_to_tokens([7]) == ["cat"]


@pytest.mark.slow
def test_zero3_on_two_ranks_merges_like_deepspeed(tmp_path, data_dir):
    config = zero_config(tmp_path, 3, train_micro_batch_size_per_gpu=8)
    out = tmp_path / "run"
    cmd = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "pld_ds.pretrain", "--deepspeed_config", str(config), "--data", str(data_dir), "--output", str(out),
           "--model", "tiny", "--max-steps", "2", "--log-interval", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(find_step_dir(out).glob("*optim_states.pt"))) == 2
    ckpt = load_checkpoint(out)
    reference = deepspeed_fp32(out)
    assert set(ckpt.state_dict) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name


@pytest.mark.slow
def test_missing_run_config_needs_model_flag(tmp_path, runs):
    step_dir = tmp_path / "global_step3"
    step_dir.mkdir()
    source = find_step_dir(runs["plain"])
    for f in source.iterdir():
        (step_dir / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="run_config.json.*--model"):
        load_checkpoint(step_dir)
    ckpt = load_checkpoint(step_dir, model="tiny")
    assert ckpt.config.vocab_size == 128  # taken from the weights
    with pytest.raises(UserError, match="--vocab"):
        find_vocab(ckpt)
    (tmp_path / "v.txt").write_text("\n".join(FIXTURE_VOCAB))
    vocab = find_vocab(ckpt, tmp_path / "v.txt")
    assert vocab.lowercase is True and vocab.id("[MASK]") == 4


def test_vocab_far_smaller_than_the_embedding_is_named(tmp_path, capsys):
    """Shards of a 100-token vocabulary trained under --vocab-size 30522: 30,528 rows, 100 of them ever used."""
    from pld_ds.export import Checkpoint

    (tmp_path / "v.txt").write_text("\n".join(SPECIALS_PAD_2 + WORDS + [f"w{i}" for i in range(82)]))
    for rows, warned in ((128, False), (192, True), (30528, True)):
        ckpt = Checkpoint({}, dataclasses.replace(tiny_config(), vocab_size=rows), tmp_path / "global_step1")
        assert len(find_vocab(ckpt, tmp_path / "v.txt").tokens) == 100
        err = capsys.readouterr().err
        assert (err != "") == warned, (rows, err)
        if warned:
            assert err.startswith(f"pld-export: warning: {tmp_path / 'v.txt'}: 100 tokens for the model's {rows} "
                                  "embedding rows: rows 100 on were never trained") and err.count("\n") == 1


# -- refusing what must not run or be overwritten -------------------------------------------------


class _Payload:
    """Unpickling this (fully) would create a file: the load must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    step_dir = tmp_path / "global_step1"
    step_dir.mkdir()
    marker = tmp_path / "executed"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, step_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"refusing to unpickle (builtins|io)\.open"):
        safe_load(step_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(step_dir), str(tmp_path / "out"), "--model", "tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"refusing to unpickle (builtins|io)\.open", err[0])
    assert not marker.exists() and not (tmp_path / "out").exists()
    # sanity: a full unpickle would have run it (the refusal above is not vacuous)
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("case", ["missing", "bad_latest", "not_checkpoint", "output_exists"])
def test_cli_errors_are_one_line(tmp_path, case, capsys):
    out = tmp_path / "out"
    if case == "missing":
        source, fragment = tmp_path / "nope", "no such checkpoint folder"
    elif case == "bad_latest":
        source, fragment = tmp_path / "ckpts", "expected the name of a checkpoint folder"
        source.mkdir()
        (source / "latest").write_text("../../etc")
    elif case == "not_checkpoint":
        source, fragment = tmp_path, "not a checkpoint"
    else:
        source, fragment = tmp_path / "global_step1", "exists and is not empty (pass --overwrite"
        source.mkdir()
        torch.save({"module": {}}, source / "mp_rank_00_model_states.pt")
        out.mkdir()
        (out / "keep.txt").write_text("user file")
    with pytest.raises(SystemExit) as exit_info:
        main([str(source), str(out), "--model", "tiny", "--vocab", str(tmp_path / "v.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pld-export: error: ") and fragment in err[0], err
    if case == "output_exists":
        assert (out / "keep.txt").read_text() == "user file"


def test_overwrite_replaces_whole_folder(tmp_path, random_export):
    model, vocab, _ = random_export
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        export_weights(model.state_dict(), model.config, vocab, out)
    export_weights(model.state_dict(), model.config, vocab, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pld_ds.export", str(tmp_path / "nope"), str(tmp_path / "o")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no such checkpoint folder")

