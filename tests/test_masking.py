"""Objectives: masking rate, whole-word masking (static in pld-prep, dynamic in the loader) and MLM-only data
(pld-prep --no-nsp: packed full sentences, shards without next_sentence_labels, a model without an NSP head)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from pld_helpers import REPO, read_csv_scalar, torch_threads
from shard_fixtures import make_shard_dir
from test_data_prep import SPECIALS, WORDS, prep, read_split, vocab_ids, write_vocab

from data_prep import cli
from data_prep.instances import InstanceConfig, _mask_words, _packed_full_sentences, continuation_table
from data_prep.segment import TokenizedBatch
from pld_ds.config import ConfigError
from pld_ds.data import schema, shards
from pld_ds.data.loader import ShardBatches
from pld_ds.data.masking import DynamicMasking
from pld_ds.data.shards import ShardError

# A vocabulary for hand-made rows: 0-4 special, 5..54 word starts, 55..104 "##" pieces.
PAD, CLS, SEP, MASK = 0, 2, 3, 4
STARTS, PIECES = np.arange(5, 55), np.arange(55, 105)
VOCAB = SPECIALS + [f"w{i}" for i in range(50)] + [f"##p{i}" for i in range(50)]
CONTINUES = continuation_table(VOCAB)


def word_rows(rows: int, seq: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [CLS] words [SEP] words [SEP] 0..., words of 1 to 4 pieces; (ids, lengths, word number per position,
    -1 off words)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, seq), dtype=np.int32)
    word = np.full((rows, seq), -1)
    lengths = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        real = int(rng.integers(seq // 2, seq + 1))
        tokens, owner, count = [CLS], [-1], 0
        middle = int(rng.integers(2, real - 3))
        while len(tokens) < real - 1:
            if len(tokens) == middle:
                tokens.append(SEP)
                owner.append(-1)
                continue
            size = int(rng.choice([1, 2, 3, 4], p=[0.5, 0.25, 0.15, 0.1]))
            for k in range(size):
                tokens.append(int(rng.choice(STARTS if k == 0 else PIECES)))
                owner.append(count)
            count += 1
        tokens, owner = tokens[:real - 1] + [SEP], owner[:real - 1] + [-1]
        ids[r, :real], word[r, :real], lengths[r] = tokens, owner, real
    return ids, lengths, word


def masked_positions_static(whole_words: bool, prob: float = 0.15, seed: int = 0, rows: int = 400, seq: int = 64):
    ids, lengths, word = word_rows(rows, seq, seed)
    original = ids.copy()
    cfg = InstanceConfig(max_seq_length=seq, max_predictions_per_seq=seq, short_seq_prob=0.0, masked_lm_prob=prob,
                         dupe_factor=1, dynamic_masking=False, vocab_size=len(VOCAB), cls_id=CLS, sep_id=SEP,
                         mask_id=MASK, continuation=CONTINUES if whole_words else None)
    positions, masked_ids = _mask_words(ids, lengths, cfg, np.random.default_rng(seed))
    chosen = np.zeros(ids.shape, dtype=bool)
    r, c = np.nonzero(positions > 0)
    chosen[r, positions[r, c]] = True
    assert np.array_equal(masked_ids[r, c], original[r, positions[r, c]])  # labels are the original pieces
    assert np.all(np.diff(np.where(positions > 0, positions, seq + np.arange(seq)), axis=1) > 0)  # sorted, distinct
    budget = np.minimum(seq, np.maximum(1, np.round(lengths * prob).astype(int)))
    return original, ids, chosen, word, budget


def masked_positions_dynamic(whole_words: bool, prob: float = 0.15, seed: int = 0, rows: int = 400, seq: int = 64):
    ids, lengths, word = word_rows(rows, seq, seed)
    masking = DynamicMasking(mask_id=MASK, special_ids=(PAD, 1, CLS, SEP, MASK), vocab_size=len(VOCAB),
                             masked_lm_prob=prob, max_predictions=seq,
                             continuation_ids=tuple(PIECES.tolist()) if whole_words else None)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int8)
    masked, labels = masking(ids, mask, np.random.default_rng(seed))
    chosen = labels != schema.IGNORE_INDEX
    assert np.array_equal(labels[chosen], ids[chosen])
    candidates = ((word >= 0) & (mask != 0)).sum(axis=1)
    budget = np.clip(np.rint(candidates * prob), 1, seq).astype(int)
    return ids, masked, chosen, word, budget


def split_words(chosen: np.ndarray, word: np.ndarray) -> int:
    """Words with some but not all of their pieces chosen."""
    split = 0
    for r in range(len(word)):
        for w in np.unique(word[r][word[r] >= 0]):
            picked = chosen[r][word[r] == w]
            split += bool(picked.any() and not picked.all())
    return split


@pytest.mark.parametrize("masker", [masked_positions_static, masked_positions_dynamic], ids=["static", "dynamic"])
def test_whole_word_masking_takes_every_piece_of_a_word(masker):
    original, masked, chosen, word, budget = masker(whole_words=True)
    assert split_words(chosen, word) == 0
    assert not np.any(chosen & (word < 0))  # never [CLS], [SEP] or padding
    count = chosen.sum(axis=1)
    # A word that does not fit the rest of the budget is passed over, never cut: at most the budget, and the
    # shortfall is rare (single-piece words fill it up).
    assert np.all(count <= budget)
    assert count.sum() >= 0.97 * budget.sum()
    # Every piece of a chosen word gets its own 80/10/10 draw.
    shown, truth = masked[chosen], original[chosen]
    assert abs(np.mean(shown == MASK) - 0.8) < 0.04 and abs(np.mean(shown == truth) - 0.1) < 0.03
    # Continuation pieces are chosen as often as word starts, relative to how many there are: whole words.
    share = chosen[np.isin(original, PIECES)].mean() / chosen[np.isin(original, STARTS)].mean()
    assert 0.7 < share < 1.3


@pytest.mark.parametrize("masker", [masked_positions_static, masked_positions_dynamic], ids=["static", "dynamic"])
def test_piece_masking_splits_words_and_hits_the_exact_count(masker):
    _, _, chosen, word, budget = masker(whole_words=False)
    assert split_words(chosen, word) > 100  # without whole-word masking, words are cut
    assert np.array_equal(chosen.sum(axis=1), budget)


@pytest.mark.parametrize("masker", [masked_positions_static, masked_positions_dynamic], ids=["static", "dynamic"])
@pytest.mark.parametrize("whole_words", [False, True])
def test_masking_rate_up_to_thirty_percent(masker, whole_words):
    _, _, chosen, word, budget = masker(whole_words=whole_words, prob=0.3)
    # Static masking counts [CLS] and [SEP] in the length it takes 30% of (as NVIDIA does), dynamic only candidates.
    candidates = (word >= 0).sum()
    assert 0.28 < chosen.sum() / candidates < 0.33
    assert np.all(chosen.sum(axis=1) <= budget)


# -- pld-prep: static whole-word masking, masking rate, --no-nsp -------------------------------------


def corpus_with_split_words(path: Path, docs: int = 40, seed: int = 3) -> Path:
    """Sentences of vocabulary words and invented ones, which WordPiece cuts into a letter and ## letters."""
    rng = np.random.default_rng(seed)
    letters = list("bcdfghjklmnpqrstvwxz")
    texts = []
    for _ in range(docs):
        sentences = []
        for _ in range(10):
            words = [str(rng.choice(WORDS)) if rng.random() < 0.6 else "".join(rng.choice(letters, rng.integers(2, 5)))
                     for _ in range(int(rng.integers(5, 12)))]
            sentences.append(" ".join(words).capitalize() + ".")
        texts.append(" ".join(sentences))
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wordy(tmp_path_factory):
    root = tmp_path_factory.mktemp("wordy")
    return root, write_vocab(root / "vocab.txt"), corpus_with_split_words(root / "corpus.txt")


def unmasked(split: dict[str, np.ndarray]) -> np.ndarray:
    ids = split["input_ids"].copy()
    r, c = np.nonzero(split["masked_lm_positions"] > 0)
    ids[r, split["masked_lm_positions"][r, c]] = split["masked_lm_ids"][r, c]
    return ids


def words_of(ids: np.ndarray, continues: np.ndarray, special: list[int]) -> np.ndarray:
    """Word number per position (-1 on special tokens): a ## piece joins the word before it."""
    candidate = ~np.isin(ids, special)
    start = candidate & ~(continues[ids] & np.pad(candidate, ((0, 0), (1, 0)))[:, :-1])
    return np.where(candidate, np.cumsum(start, axis=1), -1)


@pytest.mark.parametrize("nsp", [True, False])
def test_pld_prep_whole_word_masking_at_thirty_percent(wordy, nsp):
    root, vocab, corpus = wordy
    out = root / f"wwm_nsp{nsp}"
    prep([corpus], out, vocab, max_seq_length=64, max_predictions_per_seq=24, masked_lm_prob=0.3,
         whole_word_masking=True, nsp=nsp)
    split = read_split(out, "train")
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    ids = vocab_ids(vocab)
    original = unmasked(split)
    chosen = np.zeros(original.shape, dtype=bool)
    r, c = np.nonzero(split["masked_lm_positions"] > 0)
    chosen[r, split["masked_lm_positions"][r, c]] = True
    word = words_of(original, continuation_table(tokens), [ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]])
    assert np.isin(original, [i for t, i in ids.items() if t.startswith("##")]).mean() > 0.05  # split words exist
    assert split_words(chosen, word) == 0
    lengths = split["input_mask"].sum(axis=1)
    budget = np.minimum(24, np.maximum(1, np.round(lengths * 0.3).astype(int)))
    assert np.all(chosen.sum(axis=1) <= budget) and chosen.sum() >= 0.95 * budget.sum()
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert (manifest["whole_word_masking"], manifest["masked_lm_prob"], manifest["nsp"]) == (True, 0.3, nsp)


def test_pld_prep_warns_when_the_prediction_cap_cuts_the_rate(wordy, capsys):
    root, vocab, corpus = wordy
    code = cli.main(["--input", str(corpus), "--output", str(root / "capped"), "--vocab", str(vocab),
                     "--max-seq-length", "64", "--masked-lm-prob", "0.3", "--workers", "1"])
    assert code == 0
    assert "wants up to 19 predictions per sequence, but --max-predictions-per-seq is 20" not in capsys.readouterr().err
    code = cli.main(["--input", str(corpus), "--output", str(root / "capped2"), "--vocab", str(vocab),
                     "--max-seq-length", "128", "--masked-lm-prob", "0.3", "--workers", "1"])
    assert code == 0
    assert "wants up to 38 predictions per sequence, but --max-predictions-per-seq is 20" in capsys.readouterr().err


def tokenized(docs: list[list[int]], rng: np.random.Generator, first_id: int = 10) -> TokenizedBatch:
    """Documents of sentences of the given lengths, token ids counting up from first_id (each token unique)."""
    lengths = [n for doc in docs for n in doc]
    total = sum(lengths)
    return TokenizedBatch(tokens=np.arange(first_id, first_id + total, dtype=np.int32),
                          sentence_offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
                          document_offsets=np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64))


def test_full_sentences_pack_whole_sentences_across_documents():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 20, int(rng.integers(1, 8)))) for _ in range(60)]
    batch = tokenized(docs, rng)
    seq = 48
    cfg = InstanceConfig(max_seq_length=seq, max_predictions_per_seq=8, short_seq_prob=0.0, masked_lm_prob=0.15,
                         dupe_factor=1, dynamic_masking=True, vocab_size=10_000, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                         nsp=False)
    ids, lengths = _packed_full_sentences(batch, cfg, iter(rng.random(10_000).tolist()).__next__)
    assert np.all(ids[:, 0] == CLS) and np.all(ids[np.arange(len(ids)), lengths - 1] == SEP)
    assert np.all(lengths <= seq) and np.all(ids[np.arange(seq)[None, :] >= lengths[:, None]] == 0)
    contents = [row[1:n - 1] for row, n in zip(ids, lengths, strict=True)]
    # In order, the sequences hold every token once; their inner [SEP]s sit exactly at document ends.
    stream = np.concatenate(contents)
    assert np.array_equal(stream[stream != SEP], batch.tokens)
    doc_ends = set(batch.tokens[batch.sentence_offsets[batch.document_offsets[1:-1]] - 1].tolist())
    inner = [row[k - 1] for row in contents for k in np.flatnonzero(row == SEP)]
    assert inner and set(inner) <= doc_ends
    assert len(inner) + len(contents) - 1 >= len(docs) - 1  # every document boundary: a [SEP] or a new sequence
    # Greedy packing of whole sentences: each sequence starts at a sentence, and the next sentence would not fit.
    starts = batch.tokens[batch.sentence_offsets[:-1]]
    ends_doc = np.zeros(len(starts), dtype=bool)
    ends_doc[batch.document_offsets[1:-1]] = True
    sentence_of = {int(t): i for i, t in enumerate(starts)}
    sent_len = np.diff(batch.sentence_offsets)
    for row, following in zip(contents[:-1], contents[1:], strict=True):
        assert int(row[0]) in sentence_of and int(following[0]) in sentence_of
        nxt = sentence_of[int(following[0])]
        assert len(row) + sent_len[nxt] + ends_doc[nxt] > seq - 2
    assert np.mean(lengths[:-1]) > 0.85 * seq


def test_no_nsp_shards_train_an_mlm_only_model(wordy, tmp_path):
    from pld_ds import pretrain

    root, vocab, corpus = wordy
    data = tmp_path / "mlm"
    assert cli.main(["--input", str(corpus), "--output", str(data), "--vocab", str(vocab), "--max-seq-length", "64",
                     "--no-nsp", "--workers", "1", "--validation-fraction", "0.1"]) == 0
    manifest = json.loads((data / schema.MANIFEST_NAME).read_text())
    assert manifest["nsp"] is False and "next_sentence_labels" not in manifest["fields"]
    for split in ("train", "validation"):
        for path in (data / split).glob("*.hdf5"):
            with h5py.File(path) as f:
                assert set(f) == {f.name for f in schema.shard_fields(static_masking=True, nsp=False)}
                assert not f["segment_ids"][:].any()
    out = tmp_path / "run"
    args = pretrain.parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data",
                                str(data), "--output", str(out), "--model", "tiny", "--max-steps", "3",
                                "--log-interval", "1", "--eval-batches", "2"])
    with torch_threads(1):
        scalars = pretrain.run(args)
    assert "eval/mlm_loss" in scalars and "eval/nsp_accuracy" not in scalars and "train/nsp_loss" not in scalars
    losses = read_csv_scalar(out / "csv" / "run" / "train_loss.csv")
    assert losses == read_csv_scalar(out / "csv" / "run" / "train_mlm_loss.csv")  # the loss is the MLM loss
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["model"]["nsp"] is False
    from pld_ds.checkpoint import safe_load

    module = safe_load(out / "checkpoints" / "global_step3" / "mp_rank_00_model_states.pt")["module"]
    assert not any(name.startswith(("heads.pooler.", "heads.nsp.")) for name in module)


def test_nsp_and_mlm_only_shards_do_not_mix(tmp_path):
    folder = make_shard_dir(tmp_path / "data", shard_sizes=(32, 32), seq_len=16, max_pred=3)
    path = sorted((folder / "train").glob("*.hdf5") if (folder / "train").is_dir() else folder.glob("*.hdf5"))[1]
    with h5py.File(path, "a") as f:
        del f["next_sentence_labels"]
    with pytest.raises(ShardError, match=f"{path}: has no next_sentence_labels .*expected shards with them"):
        ShardBatches(sorted(path.parent.glob("*.hdf5")), micro_batch=4, vocab_size=100)
    mlm_only = ShardBatches([path], micro_batch=4, vocab_size=1000, prefetch=0)
    assert "next_sentence_labels" not in next(iter(mlm_only))


# -- pld-pretrain: dynamic masking settings from the manifest or the command line -----------------


def test_dynamic_masking_settings_come_from_the_manifest_and_flags(wordy, tmp_path):
    from pld_ds import pretrain

    root, vocab, corpus = wordy
    data = tmp_path / "dynamic"
    prep([corpus], data, vocab, max_seq_length=64, dynamic_masking=True, masked_lm_prob=0.3, whole_word_masking=True)
    _, masking = pretrain.data_vocabulary(str(data), None)
    ids = vocab_ids(vocab)
    assert masking.masked_lm_prob == 0.3
    assert sorted(masking.continuation_ids) == sorted(i for t, i in ids.items() if t.startswith("##"))
    _, masking = pretrain.data_vocabulary(str(data), None, masked_lm_prob=0.2, whole_word_masking=False)
    assert (masking.masked_lm_prob, masking.continuation_ids) == (0.2, None)

    static = tmp_path / "static"
    prep([corpus], static, vocab, max_seq_length=64)
    args = pretrain.parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data",
                                str(static), "--output", str(tmp_path / "out"), "--model", "tiny",
                                "--masked-lm-prob", "0.3"])
    _, masking = pretrain.data_vocabulary(str(static), None, masked_lm_prob=0.3)
    infos, _ = shards.inspect_paths(sorted((static / "train").glob("*.hdf5")))
    assert pretrain.remasks(args, infos, masking)
    with pytest.raises(ConfigError, match="--masked-lm-prob: masking .* anew needs the vocabulary's .MASK. id"):
        pretrain.remasks(args, infos, None)
    args.masked_lm_prob = None
    assert not pretrain.remasks(args, infos, masking)


def test_static_shards_masked_anew_at_thirty_percent(wordy, tmp_path):
    """--masked-lm-prob on statically masked shards: the stored masks are undone (the original tokens come
    back) and every batch is masked at the new rate; without remask the stored masks are used."""
    from pld_ds import pretrain

    root, vocab, corpus = wordy
    data = tmp_path / "static"
    prep([corpus], data, vocab, max_seq_length=64)
    _, masking = pretrain.data_vocabulary(str(data), None, masked_lm_prob=0.3)
    paths = sorted((data / "train").glob("*.hdf5"))
    stored = ShardBatches(paths, micro_batch=16, vocab_size=1000, prefetch=0, seed=3)
    anew = ShardBatches(paths, micro_batch=16, vocab_size=1000, prefetch=0, seed=3, masking=masking, remask=True)
    mask_id = vocab_ids(vocab)["[MASK]"]
    special = set(masking.special_ids)
    rates = []
    for old, new, _ in zip(stored, anew, range(6), strict=False):
        originals = old["input_ids"].clone()
        labelled = old["masked_lm_labels"] != -100
        originals[labelled] = old["masked_lm_labels"][labelled]
        targets = new["masked_lm_labels"] != -100
        # The labels are the original tokens, wherever they are; unlabelled positions hold the originals.
        assert (new["masked_lm_labels"][targets] == originals[targets]).all()
        assert (new["input_ids"][~targets] == originals[~targets]).all()
        assert (new["input_ids"][targets] == mask_id).float().mean() > 0.6
        real = (old["attention_mask"].numpy() != 0) & ~np.isin(originals.numpy(), list(special))
        rates.append(float(targets.sum()) / float(real.sum()))
        assert not (targets.numpy() & ~real).any()
    assert abs(np.mean(rates) - 0.3) < 0.02, rates
    stored_rate = np.mean([(b["masked_lm_labels"] != -100).float().mean()
                           for b, _ in zip(stored, range(6), strict=False)])
    assert abs(float(stored_rate) - 0.15 * 62 / 64) < 0.03


def test_a_classifier_starts_from_an_mlm_only_model_with_a_fresh_pooler():
    import torch
    from pld_helpers import tiny_config

    from pld_ds.model import BertForPreTraining, BertForSequenceClassification, load_pretraining_weights

    torch.manual_seed(0)
    mlm_only = BertForPreTraining(tiny_config(nsp=False))
    assert not hasattr(mlm_only.heads, "pooler") and not hasattr(mlm_only.heads, "nsp")
    out = mlm_only(torch.tensor([[2, 7, 8, 3]]), next_sentence_labels=torch.tensor([1]))
    assert out.nsp_logits is None and out.nsp_loss is None and out.loss is None  # NSP labels are ignored
    classifier = BertForSequenceClassification(tiny_config(), num_labels=2)
    fresh = load_pretraining_weights(classifier, mlm_only.state_dict())
    assert sorted(fresh) == ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]
    assert torch.equal(classifier.encoder.layers[1].attn.qkv.weight, mlm_only.encoder.layers[1].attn.qkv.weight)
