"""pld-finetune: GLUE readers, metrics, the classifier model and end-to-end fine-tuning runs on CPU."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from pld_helpers import REPO, child_env, tiny_model, torch_threads
from shard_fixtures import make_shard_dir

from pld_ds.errors import UserError
from pld_ds.finetune import glue
from pld_ds.finetune.glue import (
    Example,
    accuracy,
    average_ranks,
    f1,
    get_task,
    matthews_corrcoef,
    pearson,
    read_split,
    spearman,
)
from pld_ds.finetune.run import (
    CheckpointBackbone,
    Encoded,
    HParams,
    linear_warmup_decay,
    main,
    train_and_evaluate,
)
from pld_ds.model import BertForSequenceClassification, load_pretraining_weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


# -- metrics against hand-computed values ---------------------------------------------------------

# preds vs labels: TP 2 (rows 0, 4), TN 2 (rows 2, 5), FP 1 (row 1), FN 1 (row 3)
PREDS = [1, 1, 0, 0, 1, 0]
LABELS = [1, 0, 0, 1, 1, 0]


def test_classification_metrics_by_hand():
    assert accuracy(PREDS, LABELS) == pytest.approx(4 / 6)
    assert f1(PREDS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3)
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 3)
    assert matthews_corrcoef(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in LABELS], LABELS) == pytest.approx(-1.0)


def test_degenerate_classification_metrics():
    assert matthews_corrcoef([1] * 6, LABELS) == 0.0  # a constant prediction: an empty marginal
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1([0, 0, 0], [1, 0, 1]) == 0.0
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])


def test_correlations_by_hand():
    # x - mean = (-1.5, -0.5, 0.5, 1.5), y - mean = (-3, -1, 0, 4): sum xy 11, sum xx 5, sum yy 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    # ranks with a tie: x -> (1, 2.5, 2.5, 4), y -> (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [10, 20, 30, 1000]) < 0.9
    assert pearson([3, 3, 3], [1, 2, 3]) == 0.0  # constant input: no information


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30, 20]).tolist() == [1.0, 3.0, 3.0, 5.0, 3.0]
    assert average_ranks([5.0, 5.0]).tolist() == [1.5, 1.5]


def test_metrics_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))
        assert f1(p, y) == pytest.approx(metrics.f1_score(y, p, zero_division=0.0))
        assert matthews_corrcoef(p, y) == pytest.approx(metrics.matthews_corrcoef(y, p))


def test_correlations_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.integers(0, 6, 40).astype(float)  # many ties, like STS-B's scores
        y = x + rng.normal(0, 2, 40)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
        assert average_ranks(x).tolist() == stats.rankdata(x).tolist()


# -- GLUE files -----------------------------------------------------------------------------------

WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "very", "not", "cat", "dog", "sat", "on",
         "mat", "ran", ".", ",", "'", "s"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("bcdefghijklmnopqrtuvwxyz")
         + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"])
VOCAB += [f"[unused{i}]" for i in range(100 - len(VOCAB))]


def sentences(rng: random.Random, n: int) -> list[tuple[str, int]]:
    """(sentence, label): label 1 iff the sentence says good, a task a small model learns quickly."""
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        filler = " ".join(rng.choice(["the", "a", "cat", "dog", "sat", "on", "mat", "ran"]) for _ in range(3))
        out.append((f"{filler} the movie was {'good' if label else 'bad'} .", label))
    return out


def write_glue(root: Path, train: int = 24, dev: int = 16, seed: int = 0) -> Path:
    """All five tasks in GLUE's layouts: CoLA without header, MRPC with a byte-order mark, STS-B scores."""
    rng = random.Random(seed)
    rte_labels = ("entailment", "not_entailment")
    for split, n in (("train", train), ("dev", dev)):
        pairs = sentences(rng, n)
        others = sentences(rng, n)
        files = {
            "CoLA": [f"src{i}\t{y}\t\t{s}" for i, (s, y) in enumerate(pairs)],
            "SST-2": ["sentence\tlabel"] + [f"{s} \t{y}" for s, y in pairs],
            "MRPC": ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
            + [f"{y}\t{i}\t{i + 1}\t{s}\t{o}" for i, ((s, y), (o, _)) in enumerate(zip(pairs, others, strict=True))],
            "STS-B": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
            + [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{s}\t{o}\t{5.0 * y:.3f}"
               for i, ((s, y), (o, _)) in enumerate(zip(pairs, others, strict=True))],
            "RTE": ["index\tsentence1\tsentence2\tlabel"]
            + [f"{i}\t{s}\t{o}\t{rte_labels[1 - y]}"
               for i, ((s, y), (o, _)) in enumerate(zip(pairs, others, strict=True))],
        }
        for task, lines in files.items():
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for task in ("CoLA", "SST-2", "MRPC", "STS-B", "RTE"):  # test files carry no labels: never read
        (root / task / "test.tsv").write_text("index\tsentence\n0\tno label here\n")
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


def test_read_every_layout(glue_dir):
    cola = read_split(get_task("cola"), glue_dir / "CoLA" / "train.tsv")
    assert len(cola) == 24  # no header: the first line is an example
    first_line = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
    assert cola[0] == Example(first_line[3], None, int(first_line[1]))
    mrpc = read_split(get_task("MRPC"), glue_dir / "MRPC" / "train.tsv")
    assert len(mrpc) == 24 and mrpc[0].text_b is not None and mrpc[0].label in (0, 1)
    stsb = read_split(get_task("sts-b"), glue_dir / "STS-B" / "dev.tsv")
    assert len(stsb) == 16 and {e.label for e in stsb} <= {0.0, 5.0} and isinstance(stsb[0].label, float)
    rte = read_split(get_task("rte"), glue_dir / "RTE" / "dev.tsv", limit=5)
    assert len(rte) == 5 and {e.label for e in rte} <= {0, 1}
    sst = read_split(get_task("sst2"), glue_dir / "SST-2" / "train.tsv")
    assert sst[0].text_a.endswith(". ") and sst[0].text_b is None  # text kept as written


def test_quotes_are_text_not_csv_quoting(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\the said " yes\t" no , " she said\n')
    [example] = read_split(get_task("mrpc"), path)
    assert example == Example('he said " yes', '" no , " she said', 1)


@pytest.mark.parametrize("content, fragment", [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "train.tsv:2: label 'maybe' is not one of"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\n", "train.tsv:3: 2 tab-separated columns"),
    ("index\tsentence1\tsentence2\tlabel\n", "no labelled examples"),
])
def test_bad_files_name_the_line(tmp_path, content, fragment):
    path = tmp_path / "train.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        read_split(get_task("rte"), path)


def test_bad_score_and_missing_file(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("h\n" + "\t".join(["0"] * 9 + ["high"]) + "\n")
    with pytest.raises(UserError, match=r"dev\.tsv:2: label 'high' is not a number"):
        read_split(get_task("sts-b"), path)
    with pytest.raises(UserError, match="no such file"):
        read_split(get_task("sts-b"), tmp_path / "train.tsv")
    with pytest.raises(UserError, match="unknown task 'qqp'"):
        get_task("qqp")


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs the GLUE data")
def test_real_glue_files_read_completely():
    counts = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3667, 408), "STS-B": (5749, 1500),
              "RTE": (2490, 277)}
    for name, (train, dev) in counts.items():
        task = get_task(name)
        folder = SHARED_DATA / "glue" / name
        assert len(read_split(task, folder / "train.tsv")) == train, name
        examples = read_split(task, folder / "dev.tsv")
        assert len(examples) == dev, name
        assert all((e.text_b is None) == (task.text_b is None) and e.text_a for e in examples)
    mrpc = read_split(get_task("mrpc"), SHARED_DATA / "glue" / "MRPC" / "dev.tsv")
    assert mrpc[0].label == 1 and mrpc[0].text_a.startswith("He said the foodservice pie business")


# -- the classifier model -------------------------------------------------------------------------


def test_classifier_with_nsp_weights_reproduces_nsp_logits():
    """Pretrained embeddings, encoder and pooler carry over: with the NSP layer as its classifier, the
    fine-tuning model computes the pretraining model's NSP logits (all layers, eval mode)."""
    pretrained = tiny_model(seed=1).eval()
    model = BertForSequenceClassification(pretrained.config, num_labels=2).eval()
    fresh = load_pretraining_weights(model, pretrained.state_dict())
    assert sorted(fresh) == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():
        model.classifier.weight.copy_(pretrained.heads.nsp.weight)
        model.classifier.bias.copy_(pretrained.heads.nsp.bias)
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = (torch.arange(12) >= 5).long().expand(3, -1)
    expected = pretrained(ids, types, mask).nsp_logits
    torch.testing.assert_close(model(ids, types, mask).logits, expected, rtol=0, atol=1e-6)


def test_classifier_losses_and_bad_state_dicts():
    pretrained = tiny_model()
    regression = BertForSequenceClassification(pretrained.config, num_labels=1).eval()
    load_pretraining_weights(regression, pretrained.state_dict())
    ids = torch.randint(5, 100, (4, 8))
    labels = torch.tensor([0.0, 1.5, 3.0, 5.0])
    out = regression(ids, labels=labels)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - labels) ** 2).mean())
    state = pretrained.state_dict()
    with pytest.raises(KeyError, match="lacks encoder.layers.3"):
        load_pretraining_weights(regression, {k: v for k, v in state.items() if not k.startswith("encoder.layers.3")})
    with pytest.raises(KeyError, match="has unknown encoder.layers.9.extra"):
        load_pretraining_weights(regression, {**state, "encoder.layers.9.extra": torch.zeros(1)})


def test_linear_warmup_decay():
    factor = linear_warmup_decay(total_steps=10, warmup_steps=2)
    assert [factor(s) for s in (0, 1, 2, 6, 10, 11)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert linear_warmup_decay(4, 0)(0) == 1.0


# -- a real checkpoint ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny PLD pretraining run (3 steps) whose data folder names a vocabulary with GLUE-ish words."""
    tmp = tmp_path_factory.mktemp("finetune_run")
    data = make_shard_dir(tmp / "data", shard_sizes=(32, 32), seq_len=32)
    (data / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (data / "manifest.json").write_text(json.dumps({"vocab": {"size": 100, "file": "vocab.txt", "lowercase": True}}))
    out = tmp / "run"
    config = REPO / "ds_configs" / "tiny_cpu_pld.json"
    cmd = [sys.executable, "-m", "pld_ds.pretrain", "--deepspeed_config", str(config), "--data", str(data),
           "--output", str(out), "--model", "tiny", "--max-steps", "3", "--log-interval", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pairs_encode_as_cls_a_sep_b_sep_truncated_longest_first(run_dir):
    backbone = CheckpointBackbone(str(run_dir))
    assert backbone.vocab.lowercase is True and backbone.pad_id == 0 and backbone.max_length == 128
    long_a = " ".join(["movie"] * 12)
    ids, types = backbone.encode_pairs([Example("The Cat", "a dog", 0), Example(long_a, "the dog sat", 0)], 10)
    cls, sep, cat, dog = 2, 3, VOCAB.index("cat"), VOCAB.index("dog")
    assert ids[0] == [cls, VOCAB.index("the"), cat, sep, VOCAB.index("a"), dog, sep]
    assert types[0] == [0, 0, 0, 0, 1, 1, 1]
    # 10 = 3 special tokens + 7: the longer text gives up tokens until both fit (4 + 3)
    movie, the_dog_sat = VOCAB.index("movie"), [VOCAB.index(w) for w in ("the", "dog", "sat")]
    assert ids[1] == [cls] + [movie] * 4 + [sep] + the_dog_sat + [sep]
    assert types[1] == [0] * 6 + [1] * 4
    single, _ = backbone.encode_pairs([Example("zebra", None, 0)], 10)
    assert single[0][0] == cls and single[0][-1] == sep and VOCAB.index("##e") in single[0]


@pytest.mark.slow
def test_fine_tuning_learns_a_learnable_task(run_dir):
    task = get_task("sst-2")
    rng = random.Random(3)
    backbone = CheckpointBackbone(str(run_dir))
    train = backbone.encode(task, [Example(s, None, y) for s, y in sentences(rng, 64)], 32)
    dev = backbone.encode(task, [Example(s, None, y) for s, y in sentences(rng, 32)], 32)
    result = train_and_evaluate(task, backbone, train, dev, HParams(lr=3e-3, batch_size=16, epochs=6, seed=0),
                                torch.device("cpu"), log=lambda _: None)
    assert len(result.history) == 6 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["accuracy"] >= 0.9
    # the same seed gives the same run
    again = train_and_evaluate(task, backbone, train, dev, HParams(lr=3e-3, batch_size=16, epochs=6, seed=0),
                               torch.device("cpu"), log=lambda _: None)
    assert again.history == result.history


@pytest.mark.slow
def test_cli_sweep_over_all_tasks_writes_summary(run_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--init", str(run_dir), "--data", str(glue_dir), "--tasks", "rte,mrpc,sst-2,cola,sts-b",
          "--lr", "1e-4,3e-4", "--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--output", str(out)])
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary in printed
    record = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["hparams"]["lr"]) for r in record["runs"]] == [
        (t, lr) for t in ("RTE", "MRPC", "SST-2", "CoLA", "STS-B") for lr in (1e-4, 3e-4)]
    for run in record["runs"]:
        assert run["train_examples"] == 24 and run["dev_examples"] == 16 and len(run["history"]) == 1
        names = get_task(run["task"]).metrics
        assert list(run["metrics"]) == list(names) and all(-1.0 <= v <= 1.0 for v in run["metrics"].values())
    best = record["best"]
    assert list(best) == ["RTE", "MRPC", "SST-2", "CoLA", "STS-B"]
    for task, entry in best.items():
        scores = [r["metrics"][entry["metric"]] for r in record["runs"] if r["task"] == task]
        assert entry["score"] == max(scores)
    for task, metric in (("RTE", "accuracy"), ("MRPC", "f1"), ("CoLA", "mcc"), ("STS-B", "spearman")):
        assert f"| {task} | {metric} | {best[task]['score']:.4f} |" in summary
    table_lines = [line for line in summary.splitlines() if line.startswith("| ")]
    # best per task + average, one row per setting against the constant baseline, every run
    assert len(table_lines) == (1 + 5 + 1) + (1 + 10) + (1 + 10) and table_lines[6].startswith("| average |")


@pytest.mark.slow
def test_cli_from_an_exported_hf_model(run_dir, glue_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    from pld_ds.export import export_checkpoint

    exported = export_checkpoint(run_dir, tmp_path / "hf")
    out = tmp_path / "out"
    main(["--hf", str(exported), "--data", str(glue_dir), "--tasks", "mrpc,sts-b", "--epochs", "2",
          "--batch-size", "8", "--lr", "2e-4", "--max-train-samples", "16", "--output", str(out)])
    record = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in record["runs"]] == ["MRPC", "STS-B"]
    assert record["runs"][0]["train_examples"] == 16 and "roberta-prelayernorm" in record["init"]
    assert all(math.isfinite(v) for r in record["runs"] for v in r["metrics"].values())


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "glue" / "RTE").is_dir(), reason="needs the GLUE data")
def test_cli_on_real_rte_subset(run_dir, tmp_path):
    out = tmp_path / "out"
    main(["--init", str(run_dir), "--data", str(SHARED_DATA / "glue"), "--tasks", "rte", "--epochs", "1",
          "--batch-size", "16", "--max-seq-length", "64", "--max-train-samples", "32", "--max-eval-samples", "32",
          "--output", str(out)])
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["train_examples"] == 32 and run["dev_examples"] == 32 and 0.0 <= run["metrics"]["accuracy"] <= 1.0


# -- command-line errors --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown_task", "no_data", "no_task_folder", "seq_too_long", "bad_checkpoint"])
def test_cli_errors_are_one_line(case, glue_dir, tmp_path, capsys, request):
    args = ["--init", str(tmp_path), "--data", str(glue_dir), "--tasks", "rte", "--output", str(tmp_path / "o")]
    fragment = {"unknown_task": "unknown task 'qnli'", "no_data": "no such directory",
                "no_task_folder": "no RTE folder", "seq_too_long": "the model has 128 positions",
                "bad_checkpoint": "not a checkpoint"}[case]
    if case == "unknown_task":
        args[5] = "rte,qnli"
    elif case == "no_data":
        args[3] = str(tmp_path / "nothing")
    elif case == "no_task_folder":
        args[3] = str(tmp_path)
    elif case == "seq_too_long":
        args[1] = str(request.getfixturevalue("run_dir"))
        args += ["--max-seq-length", "500"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pld-finetune: error: ") and fragment in err[0], err


def test_output_and_device_are_checked_before_the_model_loads(glue_dir, tmp_path, capsys):
    """Results are written after the whole sweep: an --output that cannot take them, or a --device that is not
    there, must fail first (here before the --init folder, which is no checkpoint, is even read)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    common = ["--init", str(tmp_path), "--data", str(glue_dir), "--tasks", "rte"]
    cases = [(["--output", str(blocker / "out")], f"--output {blocker / 'out'}: cannot create the folder")]
    if not torch.cuda.is_available():
        cases.append((["--output", str(tmp_path / "o"), "--device", "cuda"], "--device cuda: no CUDA device here"))
    for extra, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err


def test_results_are_written_whole(tmp_path, monkeypatch):
    """summary.md and results.json are renamed into place: a failed write leaves the previous ones whole."""
    import pld_ds.checkpoint
    from pld_ds.finetune.run import write_outputs

    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pld_ds.checkpoint.os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        write_outputs(out, [], "x", argparse.Namespace())
    assert (out / "results.json").read_text() == '{"old": true}' and not (out / "summary.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--hf", "x", "--vocab", "v.txt"], "go with --init"),
    (["--init", "x", "--lr", "abc"], "comma-separated floats"),
    (["--init", "x", "--lr", "0"], "positive"),
    (["--init", "x", "--batch-size", "0"], ">= 1"),
    (["--init", "x", "--hf", "y"], "not allowed with"),
])
def test_flag_errors_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--data", "d", "--output", "o"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pld_ds.finetune", "--init", str(tmp_path), "--data",
                           str(tmp_path / "none"), "--output", str(tmp_path / "o")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("pld-finetune: error: --data") and "no such directory" in proc.stderr


def test_all_five_tasks_are_known():
    assert sorted(t.name for t in glue.TASKS.values()) == ["CoLA", "MRPC", "RTE", "SST-2", "STS-B"]
    assert get_task("sts-b").num_labels == 1 and get_task("rte").num_labels == 2


@pytest.mark.slow
def test_earlybert_ticket_search_during_fine_tuning(run_dir, glue_dir, tmp_path):
    """--earlybert: the first steps search (L1 term on the slimming coefficients), then the slim model trains on."""
    block = {"earlybert": {"enabled": True, "check_interval": 1, "max_search_steps": 3, "neuron_prune_ratio": 0.5}}
    config = tmp_path / "eb.json"
    config.write_text(json.dumps(block))
    out = tmp_path / "out"
    main(["--init", str(run_dir), "--data", str(glue_dir), "--tasks", "rte", "--lr", "1e-4", "--epochs", "2",
          "--batch-size", "8", "--max-seq-length", "32", "--output", str(out), "--earlybert", str(config)])
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["ticket"]["drawn_at"] == 3 and 0 < run["ticket"]["flop_reduction"] < 1
    assert len(run["history"]) == 2 and all(math.isfinite(h["train_loss"]) for h in run["history"])


def test_earlybert_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--hf", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--earlybert", "x"])
    assert exit_.value.code == 2 and "--earlybert go with --init" in capsys.readouterr().err


class _BagOfWords(torch.nn.Module):
    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(20, 8, mode="sum")
        self.out = torch.nn.Linear(8, num_labels)

    def forward(self, input_ids, token_type_ids, attention_mask):
        return self.out(self.embed(input_ids, per_sample_weights=attention_mask.float()))


class _BagBackbone:
    """A stand-in backbone: the training loop's logging does not depend on the encoder."""

    pad_id = 0

    def classifier(self, num_labels: int) -> torch.nn.Module:
        return _BagOfWords(num_labels)


def test_progress_is_printed_within_each_epoch():
    task = get_task("sst-2")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 20, (6,), generator=g).tolist() for _ in range(40)]
    data = Encoded(ids, [[0] * 6] * 40, torch.tensor([i % 2 for i in range(40)]))
    lines: list[str] = []
    train_and_evaluate(task, _BagBackbone(), data, data, HParams(lr=1e-2, batch_size=4, epochs=2, seed=0, log_every=3),
                       torch.device("cpu"), log=lines.append)
    progress = [line for line in lines if " step " in line]
    # 10 steps per epoch: lines after steps 3, 6 and 9 of each epoch, then the epoch's own line
    assert [line.split(" step ")[1].split()[0] for line in progress] == ["3/10", "6/10", "9/10"] * 2
    assert all("train_loss" in line and "examples/s" in line and "epoch" in line for line in progress)
    assert "epoch 1/2" in progress[0] and "epoch 2/2" in progress[-1]
    assert [i for i, line in enumerate(lines) if "epoch 1/2  train_loss" in line] == [3]


def test_constant_baseline_beside_the_seeds():
    from pld_ds.finetune.run import RunResult, constant_prediction, summary_markdown

    sst2, stsb = get_task("sst-2"), get_task("sts-b")
    assert constant_prediction(sst2, torch.tensor([1, 0, 1, 1])) == 1.0
    assert constant_prediction(sst2, torch.tensor([1, 0])) == 0.0  # a tie: the smallest id
    assert constant_prediction(stsb, torch.tensor([1.0, 2.0, 4.5])) == pytest.approx(2.5)
    results = []
    for seed, (acc, rte_acc) in enumerate([(0.80, 0.50), (0.84, 0.56), (0.82, 0.47)]):
        for task, score, base in (("sst-2", acc, 0.51), ("rte", rte_acc, 0.53)):
            r = RunResult(task, HParams(lr=3e-5, batch_size=32, epochs=3, seed=seed), 100, 50, {"accuracy": score})
            r.baseline = {"accuracy": base}
            results.append(r)
    text = summary_markdown(results, "run")
    assert "| sst-2 | accuracy | 3e-05 | 32 | 3 | 3 | 0.8200 ± 0.0200 | 0.5100 | yes |" in text
    assert "| rte | accuracy | 3e-05 | 32 | 3 | 3 | 0.5100 ± 0.0458 | 0.5300 | no |" in text


def test_runs_record_the_constant_baseline():
    task = get_task("sst-2")
    ids = [[1, 2, 3]] * 10
    train = Encoded(ids, [[0] * 3] * 10, torch.tensor([1] * 7 + [0] * 3))
    dev = Encoded(ids[:4], [[0] * 3] * 4, torch.tensor([1, 1, 1, 0]))
    result = train_and_evaluate(task, _BagBackbone(), train, dev, HParams(lr=1e-2, batch_size=5, epochs=1, seed=0),
                                torch.device("cpu"), log=lambda _: None)
    assert result.baseline == {"accuracy": 0.75}  # always 1, the training majority
