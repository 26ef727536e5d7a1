"""Shards and per-rank batches (pld_ds/data/shards.py, pld_ds/data/loader.py)."""

from __future__ import annotations

import itertools
import math

import h5py
import numpy as np
import pytest
import torch
from shard_fixtures import CLS, MASK, SEP, VOCAB_SIZE, make_samples, make_shard_dir, write_shard

from pld_ds.data import schema, shards
from pld_ds.data.loader import ShardBatches
from pld_ds.data.masking import DynamicMasking
from pld_ds.data.shards import ShardError, find_shards, inspect_shard

SEQ = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # three shards of different sizes so global batches straddle shard boundaries
    return make_shard_dir(tmp_path_factory.mktemp("shards"), shard_sizes=(37, 50, 29), seq_len=SEQ)


@pytest.fixture(scope="module")
def paths(data_dir):
    return find_shards(data_dir / "train")


@pytest.fixture(scope="module")
def all_rows(paths):
    """Every sample of the folder as {input_ids row bytes: (shard, index)}; rows are unique."""
    rows = {}
    for path in paths:
        with h5py.File(path, "r") as f:
            ids = f["input_ids"][:]
        for i, row in enumerate(ids):
            rows[row.astype(np.int64).tobytes()] = (path.name, i)
    assert len(rows) == 37 + 50 + 29
    return rows


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: v[:] for k, v in f.items()}


def keys(batch):
    return [row.numpy().tobytes() for row in batch["input_ids"]]


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


# -- ranks ----------------------------------------------------------------------------------------


def test_batch_fields_and_shapes(paths):
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "masked_lm_labels", "next_sentence_labels"}
    for name in ("input_ids", "token_type_ids", "attention_mask", "masked_lm_labels"):
        assert batch[name].shape == (4, SEQ) and batch[name].dtype == torch.int64
    assert batch["next_sentence_labels"].shape == (4,)
    assert loader.seq_len == SEQ
    assert loader.batches_per_epoch == (37 + 50 + 29) // 4


def test_two_ranks_are_disjoint_and_cover_every_full_global_batch(paths, all_rows):
    micro, world = 5, 2
    ranks = [ShardBatches(paths, micro_batch=micro, vocab_size=VOCAB_SIZE, rank=r, world_size=world, seed=3)
             for r in range(world)]
    per_epoch = (37 + 50 + 29) // (micro * world)
    assert [r.batches_per_epoch for r in ranks] == [per_epoch, per_epoch]
    seen = [[k for b in take(r, per_epoch) for k in keys(b)] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == per_epoch * micro
    assert not set(seen[0]) & set(seen[1])
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union) == per_epoch * micro * world  # each exactly once
    assert set(union) <= set(all_rows)
    # only the remainder that does not fill a global batch is left out
    assert len(all_rows) - len(union) == (37 + 50 + 29) % (micro * world)
    # both ranks' positions advanced by the same amount
    assert ranks[0].state_dict()["batch_in_epoch"] == ranks[1].state_dict()["batch_in_epoch"] == per_epoch


def test_world_of_one_equals_concatenated_ranks(paths):
    """Rank r's micro-batch is slice r of the stream a single process would read with a global batch."""
    single = ShardBatches(paths, micro_batch=8, vocab_size=VOCAB_SIZE, seed=1)
    ranks = [ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for whole, part0, part1 in zip(take(single, 5), take(ranks[0], 5), take(ranks[1], 5), strict=True):
        for name in whole:
            assert torch.equal(whole[name], torch.cat([part0[name], part1[name]]))


def test_samples_match_the_shard_contents(paths, all_rows):
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    data = {p.name: read_all(p) for p in paths}
    for batch in take(loader, 6):
        for row, key in enumerate(keys(batch)):
            shard, index = all_rows[key]
            raw = data[shard]
            assert np.array_equal(batch["attention_mask"][row].numpy(), raw["input_mask"][index])
            assert np.array_equal(batch["token_type_ids"][row].numpy(), raw["segment_ids"][index])
            assert batch["next_sentence_labels"][row].item() == int(raw["next_sentence_labels"][index])


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, 22, 23, 30])  # 23 batches per epoch with micro 5: 22/23 straddle the boundary
def test_resume_equals_uninterrupted(paths, k):
    total = 40
    reference = take(ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7), total)
    first = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7)
    head = take(first, k)
    state = first.state_dict()
    assert state["global_batch"] == 5
    resumed = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7)
    resumed.load_state_dict(state)
    tail = take(resumed, total - k)
    got = head + tail
    assert len(got) == total
    for a, b in zip(reference, got, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])


def test_resume_two_ranks(paths):
    for rank in (0, 1):
        reference = take(ShardBatches(paths, micro_batch=3, vocab_size=VOCAB_SIZE, rank=rank, world_size=2), 25)
        first = ShardBatches(paths, micro_batch=3, vocab_size=VOCAB_SIZE, rank=rank, world_size=2)
        head = take(first, 12)
        resumed = ShardBatches(paths, micro_batch=3, vocab_size=VOCAB_SIZE, rank=rank, world_size=2)
        resumed.load_state_dict(first.state_dict())
        got = head + take(resumed, 13)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference, got, strict=True))


def test_state_dict_counts_epochs(paths):
    loader = ShardBatches(paths, micro_batch=10, vocab_size=VOCAB_SIZE)
    assert loader.batches_per_epoch == 11
    take(loader, 11)
    assert loader.state_dict()["batch_in_epoch"] == 11
    it = iter(loader)
    next(it)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_in_epoch"] == 1


def test_load_state_dict_with_a_different_global_batch_raises(paths):
    state = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE).state_dict()
    other = ShardBatches(paths, micro_batch=2, vocab_size=VOCAB_SIZE, rank=0, world_size=1)
    with pytest.raises(ShardError, match="global batch 4"):
        other.load_state_dict(state)
    # same global batch from a different split over ranks is fine
    ShardBatches(paths, micro_batch=2, vocab_size=VOCAB_SIZE, rank=1, world_size=2).load_state_dict(state)


def test_load_state_dict_with_a_different_seed_does_not_silently_reorder(paths):
    """The saved position indexes the saved seed's order: resuming it under another seed must either be
    refused (like a different global batch) or continue the saved order, never repeat or skip samples."""
    reference = take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=0), 29)
    first = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=0)
    head = take(first, 10)
    resumed = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=1)
    try:
        resumed.load_state_dict(first.state_dict())
    except ShardError as err:
        assert "seed" in str(err)
        return
    epoch = [k for b in head + take(resumed, 19) for k in keys(b)]
    repeats = len(epoch) - len(set(epoch))
    assert repeats == 0, f"{repeats} of {len(epoch)} samples repeated within one epoch after resuming"
    assert epoch == [k for b in reference for k in keys(b)]


# -- order ----------------------------------------------------------------------------------------


def test_epochs_use_different_orders(paths):
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    per_epoch = loader.batches_per_epoch
    batches = take(loader, 2 * per_epoch)
    epoch0 = [k for b in batches[:per_epoch] for k in keys(b)]
    epoch1 = [k for b in batches[per_epoch:] for k in keys(b)]
    assert epoch0 != epoch1
    assert len(set(epoch0)) == len(epoch0) and len(set(epoch1)) == len(epoch1)
    # the leftover samples differ between epochs, the overlap is almost everything
    assert len(set(epoch0) & set(epoch1)) >= len(epoch0) - (37 + 50 + 29) % 4


def test_order_depends_on_seed_and_is_reproducible(paths):
    a = [keys(b) for b in take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=0), 5)]
    b = [keys(b) for b in take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=0), 5)]
    c = [keys(b) for b in take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, seed=1), 5)]
    assert a == b
    assert a != c


def test_order_is_shuffled_not_file_order(paths, all_rows):
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    order = [all_rows[k] for b in take(loader, 10) for k in keys(b)]
    assert order != sorted(order)


def test_one_pass_is_epoch_zero_and_leaves_position_alone(paths):
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    take(loader, 3)
    before = loader.state_dict()
    passed = list(loader.one_pass())
    assert loader.state_dict() == before
    fresh = take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE), loader.batches_per_epoch)
    assert len(passed) == len(fresh)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(passed, fresh, strict=True))


# -- static masking -------------------------------------------------------------------------------


def test_static_masking_labels(paths, all_rows):
    data = {p.name: read_all(p) for p in paths}
    loader = ShardBatches(paths, micro_batch=8, vocab_size=VOCAB_SIZE)
    checked = 0
    for batch in take(loader, loader.batches_per_epoch):
        labels = batch["masked_lm_labels"]
        for row, key in enumerate(keys(batch)):
            shard, index = all_rows[key]
            positions = data[shard]["masked_lm_positions"][index]
            ids = data[shard]["masked_lm_ids"][index]
            expected = torch.full((SEQ,), schema.IGNORE_INDEX, dtype=torch.int64)
            for pos, tok in zip(positions, ids, strict=True):
                if pos > 0:
                    expected[pos] = int(tok)
            assert torch.equal(labels[row], expected)
            assert labels[row, 0] == schema.IGNORE_INDEX
            valid = positions[positions > 0]
            assert (labels[row] != schema.IGNORE_INDEX).sum() == len(valid) > 0
            checked += 1
    assert checked == loader.batches_per_epoch * 8


def test_padding_slot_zero_is_ignored(tmp_path):
    rng = np.random.default_rng(0)
    arrays = make_samples(4, 16, 6, rng)
    arrays["masked_lm_positions"][:, -2:] = 0  # unused prediction slots
    arrays["masked_lm_ids"][:, -2:] = 0
    arrays["masked_lm_positions"][0] = [2, 3, 0, 0, 0, 0]
    arrays["masked_lm_ids"][0] = [50, 51, 0, 0, 0, 0]
    path = write_shard(tmp_path / "s.hdf5", arrays)
    loader = ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE)
    batch = next(iter(loader))
    first = torch.from_numpy(arrays["input_ids"][0]).long()
    row = [i for i, r in enumerate(batch["input_ids"]) if torch.equal(r, first)]
    labels = batch["masked_lm_labels"][row[0]]
    assert labels[2] == 50 and labels[3] == 51
    assert labels[0] == schema.IGNORE_INDEX  # id 0 at position 0 is padding, not a target
    assert (labels != schema.IGNORE_INDEX).sum() == 2


def dynamic_shard(tmp_path, num=16, seq_len=32):
    """A dynamic-masking shard (no masked_lm_* datasets, unmasked input_ids), as `pld-prep --dynamic-masking` writes."""
    arrays = make_samples(num, seq_len, 5, np.random.default_rng(0))
    for i in range(num):  # undo make_samples' static masking
        valid = arrays["masked_lm_positions"][i] > 0
        arrays["input_ids"][i, arrays["masked_lm_positions"][i][valid]] = arrays["masked_lm_ids"][i][valid]
    original = arrays["input_ids"].copy()
    del arrays["masked_lm_positions"], arrays["masked_lm_ids"]
    return write_shard(tmp_path / "dynamic.hdf5", arrays), original


def test_dynamic_masking_shard_is_recognised(tmp_path):
    path, _ = dynamic_shard(tmp_path)
    info = inspect_shard(path)
    assert not info.static_masking and info.max_predictions == 0


def test_dynamic_masking_shard_is_masked_at_load_time(tmp_path):
    """schema.py: dynamic-masking shards "omit the masked_lm_* fields and are masked at load time".
    A batch from one must carry MLM targets (the original ids), or the MLM loss is a mean over nothing: NaN."""
    from pld_helpers import tiny_model

    path, original = dynamic_shard(tmp_path)
    rows = {row.astype(np.int64).tobytes(): i for i, row in enumerate(original)}
    masking = DynamicMasking(mask_id=MASK, special_ids=(0, CLS, SEP, MASK), vocab_size=VOCAB_SIZE)
    batch = next(iter(ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, masking=masking)))
    labels = batch["masked_lm_labels"]
    targets = labels != schema.IGNORE_INDEX
    assert targets.any(dim=1).all(), "no MLM targets in a batch from a dynamic-masking shard"
    assert not targets[:, 0].any()
    assert not (targets & (batch["attention_mask"] == 0)).any()
    for row in range(8):
        unmasked = batch["input_ids"][row].clone()
        unmasked[targets[row]] = labels[row][targets[row]]
        # masking only touches target positions, and the labels are the shard's tokens there
        assert unmasked.numpy().tobytes() in rows
    loss = tiny_model()(**batch).loss
    assert torch.isfinite(loss)


def test_dynamic_masking_follows_the_bert_recipe(tmp_path):
    path, original = dynamic_shard(tmp_path, num=256, seq_len=64)
    masking = DynamicMasking(mask_id=MASK, special_ids=(0, CLS, SEP, MASK), vocab_size=VOCAB_SIZE)
    loader = ShardBatches([path], micro_batch=256, vocab_size=VOCAB_SIZE, masking=masking, seed=3)
    batch = next(iter(loader))
    labels, ids = batch["masked_lm_labels"], batch["input_ids"]
    targets = labels != schema.IGNORE_INDEX
    real = (batch["attention_mask"] == 1).sum(1).float()
    # 15% of the real tokens (the specials are few), at least one per row
    assert abs(targets.sum(1).float().mean() / real.mean() - 0.15) < 0.03
    assert not torch.isin(labels[targets], torch.tensor([0, CLS, SEP, MASK])).any()
    replaced = ids[targets]
    frac_mask = (replaced == MASK).float().mean().item()
    frac_kept = (replaced == labels[targets]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.05 and 0.07 < frac_kept < 0.16  # 10% kept + random hits of the same id
    # the draw depends on the position only: a fresh loader at the same position masks identically
    again = next(iter(ShardBatches([path], micro_batch=256, vocab_size=VOCAB_SIZE, masking=masking, seed=3)))
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["masked_lm_labels"], labels)


def test_dynamic_masking_shard_without_a_vocabulary_is_refused(tmp_path):
    path, _ = dynamic_shard(tmp_path)
    with pytest.raises(ShardError, match=r"\[MASK\]"):
        ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE)


def test_next_sentence_labels_n_by_1_accepted(tmp_path):
    arrays = make_samples(8, 16, 3, np.random.default_rng(0))
    arrays["next_sentence_labels"] = arrays["next_sentence_labels"].reshape(-1, 1)
    path = write_shard(tmp_path / "nsp.hdf5", arrays)
    batch = next(iter(ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE)))
    assert batch["next_sentence_labels"].shape == (4,)


# -- validation -----------------------------------------------------------------------------------


def good_arrays(num=8, seq_len=16, max_pred=3):
    return make_samples(num, seq_len, max_pred, np.random.default_rng(0))


def write_raw(path, arrays):
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
    return path


def test_inspect_good_shard(tmp_path):
    path = write_shard(tmp_path / "ok.hdf5", good_arrays())
    info = inspect_shard(path)
    assert (info.num_samples, info.seq_len, info.max_predictions, info.static_masking) == (8, 16, 3, True)


# next_sentence_labels may be absent: an MLM-only shard (tests/test_masking.py).
@pytest.mark.parametrize("missing", ["input_ids", "input_mask", "segment_ids"])
def test_missing_dataset(tmp_path, missing):
    arrays = good_arrays()
    del arrays[missing]
    path = write_raw(tmp_path / "missing.hdf5", arrays)
    with pytest.raises(ShardError, match=f"missing dataset {missing}") as info:
        inspect_shard(path)
    assert str(path) in str(info.value)


def test_only_one_mask_field(tmp_path):
    arrays = good_arrays()
    del arrays["masked_lm_ids"]
    path = write_raw(tmp_path / "half.hdf5", arrays)
    with pytest.raises(ShardError, match="masked_lm_positions / masked_lm_ids") as info:
        inspect_shard(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field", ["input_ids", "input_mask", "masked_lm_positions"])
def test_float_dtype(tmp_path, field):
    arrays = good_arrays()
    arrays[field] = arrays[field].astype(np.float32)
    path = write_raw(tmp_path / "float.hdf5", arrays)
    with pytest.raises(ShardError, match=f"{field} has dtype float32") as info:
        inspect_shard(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field, shape", [
    ("input_mask", (8, 15)),
    ("segment_ids", (7, 16)),
    ("masked_lm_ids", (8, 4)),
    ("next_sentence_labels", (8, 2)),
    ("input_ids", (8,)),
])
def test_wrong_shape(tmp_path, field, shape):
    arrays = good_arrays()
    arrays[field] = np.zeros(shape, dtype=arrays[field].dtype)
    path = write_raw(tmp_path / "shape.hdf5", arrays)
    with pytest.raises(ShardError, match=r"has shape") as info:
        inspect_shard(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field, value", [("input_ids", VOCAB_SIZE), ("input_ids", -1), ("masked_lm_ids", 500)])
def test_token_id_outside_vocabulary(tmp_path, field, value):
    arrays = good_arrays()
    arrays[field][3, 1] = value
    path = write_shard(tmp_path / "vocab.hdf5", arrays)
    loader = ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE)
    with pytest.raises(ShardError, match=rf"{field} holds token ids outside \[0, {VOCAB_SIZE}\)") as info:
        next(iter(loader))
    assert str(path) in str(info.value)
    # the largest valid id is fine
    arrays[field][3, 1] = VOCAB_SIZE - 1
    ok = write_shard(tmp_path / "ok.hdf5", arrays)
    next(iter(ShardBatches([ok], micro_batch=4, vocab_size=VOCAB_SIZE)))


def test_masked_position_outside_the_sequence(tmp_path):
    """Like a token id outside the vocabulary, a prediction position past the sequence is a bad shard:
    the error must be a ShardError naming the shard, not an IndexError from the collate step."""
    arrays = good_arrays(seq_len=16)
    arrays["masked_lm_positions"][2, 0] = 16
    path = write_shard(tmp_path / "positions.hdf5", arrays)
    with pytest.raises(ShardError) as info:
        next(iter(ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE)))
    assert str(path) in str(info.value) and "masked_lm_positions" in str(info.value)


def test_sequence_length_mismatch_between_shards(tmp_path):
    a = write_shard(tmp_path / "a.hdf5", good_arrays(seq_len=16))
    b = write_shard(tmp_path / "b.hdf5", good_arrays(seq_len=24))
    with pytest.raises(ShardError, match="sequence length 24 \\(expected 16") as info:
        ShardBatches([a, b], micro_batch=4, vocab_size=VOCAB_SIZE)
    assert str(b) in str(info.value)
    with pytest.raises(ShardError, match="sequence length 16 \\(expected 24"):
        ShardBatches([a], micro_batch=4, vocab_size=VOCAB_SIZE, seq_len=24)


@pytest.mark.parametrize("content", [b"", b"this is not hdf5" * 100, b"\x89HDF\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.hdf5"
    path.write_bytes(content)
    with pytest.raises(ShardError, match="not a readable HDF5 shard") as info:
        inspect_shard(path)
    assert str(path) in str(info.value)


def test_truncated_file(tmp_path):
    good = write_shard(tmp_path / "good.hdf5", good_arrays(num=64, seq_len=32))
    path = tmp_path / "truncated.hdf5"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ShardError) as info:
        ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE)
        # if the header survived, reading the data must fail
        list(itertools.islice(iter(ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE)), 16))
    assert str(path) in str(info.value)


def test_folder_with_no_shards(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(ShardError, match=r"no \*\.hdf5 shards") as info:
        find_shards(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ShardError, match="no such directory") as info:
        find_shards(tmp_path / "absent", "--data")
    assert str(tmp_path / "absent") in str(info.value) and "--data" in str(info.value)


def test_find_shards_is_sorted_and_filtered(tmp_path):
    for name in ("b.hdf5", "a.hdf5", "c.h5", "manifest.json"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_shards(tmp_path)] == ["a.hdf5", "b.hdf5"]


def test_fewer_samples_than_a_global_batch(tmp_path):
    path = write_shard(tmp_path / "small.hdf5", good_arrays(num=5))
    with pytest.raises(ShardError, match="fewer than one global batch of 8"):
        ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE, world_size=2)


def test_shard_error_is_a_user_error():
    from pld_ds.errors import UserError

    assert issubclass(shards.ShardError, UserError)


# -- reading only a rank's rows, prefetch ---------------------------------------------------------


def whole_shard_batches(paths, micro, rank, world, seed, n):
    """The reference: every shard read whole, then the documented order (shards by (seed, epoch), samples of
    each shard by (seed, epoch, shard)), global batch b, slice `rank`."""
    data = [read_all(p) for p in paths]
    sizes = [len(d["input_ids"]) for d in data]
    out = []
    per_epoch = sum(sizes) // (micro * world)
    for b in range(n):
        epoch, batch = divmod(b, per_epoch)
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        stream = [(int(i), int(r)) for i in shard_order
                  for r in np.random.default_rng([seed, epoch, int(i)]).permutation(sizes[i])]
        first = batch * micro * world + rank * micro
        out.append(np.stack([data[i]["input_ids"][r] for i, r in stream[first:first + micro]]).astype(np.int64))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_equal_the_whole_shard_reference(paths, world):
    for rank in range(world):
        loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, rank=rank, world_size=world, seed=5)
        n = loader.batches_per_epoch + 3  # into the second epoch
        expected = whole_shard_batches(paths, 4, rank, world, 5, n)
        assert all(np.array_equal(b["input_ids"].numpy(), e) for b, e in zip(take(loader, n), expected, strict=True))


def test_a_rank_keeps_only_its_rows(paths, monkeypatch):
    """Over an epoch each rank reads from the shards only the rows of its own slices, each once."""
    read = {}
    original = shards.read_rows

    def counting(info, rows, vocab_size):
        read.setdefault(current, []).extend((info.path.name, int(r)) for r in rows)
        return original(info, rows, vocab_size)

    monkeypatch.setattr(shards, "read_rows", counting)
    micro, world = 5, 2
    for current in range(world):
        loader = ShardBatches(paths, micro_batch=micro, vocab_size=VOCAB_SIZE, rank=current, world_size=world,
                              prefetch=0)
        take(loader, loader.batches_per_epoch)
    per_rank = loader.batches_per_epoch * micro
    assert [len(read[r]) for r in range(world)] == [per_rank, per_rank]
    assert len(set(read[0])) == len(set(read[1])) == per_rank
    assert not set(read[0]) & set(read[1])


def test_read_rows_in_any_order_matches_the_file(paths):
    info = inspect_shard(paths[1])
    raw = read_all(paths[1])
    rows = np.array([49, 0, 7, 7, 31, 2])
    got = shards.read_rows(info, rows, VOCAB_SIZE)
    for name, values in got.items():
        assert np.array_equal(values, raw[name][rows].reshape(len(rows), *values.shape[1:]))


def test_small_slabs_give_the_same_rows(paths, monkeypatch):
    monkeypatch.setattr(shards, "SLAB_BYTES", 1)  # one HDF5 chunk per read
    info = inspect_shard(paths[0])
    rows = np.random.default_rng(0).permutation(info.num_samples)[:20]
    assert np.array_equal(shards.read_rows(info, rows, VOCAB_SIZE)["input_ids"], read_all(paths[0])["input_ids"][rows])


@pytest.mark.parametrize("k", [0, 5, 22, 23, 31])
def test_prefetch_keeps_order_and_resume_exact(paths, k):
    total = 40
    reference = take(ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7, prefetch=0), total)
    first = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7, prefetch=4)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    # the thread has prepared batches beyond k by now; the position is still that of batch k
    state = first.state_dict()
    assert (state["epoch"], state["batch_in_epoch"]) == ((0, k) if k <= 23 else (1, k - 23))
    resumed = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=7, prefetch=4)
    resumed.load_state_dict(state)
    got = head + take(resumed, total - k)
    for a, b in zip(reference, got, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])
    # the interrupted iterator itself also goes on exactly
    rest = [next(it) for _ in range(total - k)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference[k:], rest, strict=True))


def test_prefetch_with_dynamic_masking_resumes_identically(tmp_path):
    path, _ = dynamic_shard(tmp_path, num=64)
    masking = DynamicMasking(mask_id=MASK, special_ids=(0, CLS, SEP, MASK), vocab_size=VOCAB_SIZE)
    reference = take(ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, masking=masking, prefetch=0), 12)
    first = ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, masking=masking, prefetch=3)
    head = take(first, 5)
    resumed = ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, masking=masking, prefetch=3)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(reference, head + take(resumed, 7), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["masked_lm_labels"], b["masked_lm_labels"])


def test_load_state_dict_during_iteration_moves_a_prefetching_iterator(paths):
    reference = take(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, prefetch=0), 10)
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, prefetch=3)
    it = iter(loader)
    for _ in range(6):
        next(it)
    loader.load_state_dict({"epoch": 0, "batch_in_epoch": 2})
    assert torch.equal(next(it)["input_ids"], reference[2]["input_ids"])
    assert loader.state_dict()["batch_in_epoch"] == 3


def test_a_bad_row_raises_at_its_batch_with_prefetch(tmp_path):
    arrays = good_arrays(num=16)
    arrays["input_ids"][:, 1] = VOCAB_SIZE + 5  # every row bad: the first batch fails, not a later one
    path = write_shard(tmp_path / "bad.hdf5", arrays)
    loader = ShardBatches([path], micro_batch=4, vocab_size=VOCAB_SIZE, prefetch=2)
    with pytest.raises(ShardError, match="input_ids holds token ids outside") as info:
        next(iter(loader))
    assert str(path) in str(info.value)
    assert loader.state_dict()["batch_in_epoch"] == 0


# -- skipping bad shards --------------------------------------------------------------------------


def test_skip_bad_shards_flag(tmp_path):
    good = [write_shard(tmp_path / f"good_{i}.hdf5", good_arrays(num=8)) for i in range(2)]
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"this is not hdf5" * 10)
    paths = sorted([*good, bad])
    with pytest.raises(ShardError, match="not a readable HDF5 shard"):
        ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE)
    loader = ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, skip_bad_shards=True)
    assert [info.path for info in loader.infos] == good
    assert len(loader.skipped) == 1 and str(bad) in str(loader.skipped[0])
    assert loader.batches_per_epoch == 4
    with pytest.raises(ShardError, match="all 1 shards failed validation"):
        ShardBatches([bad], micro_batch=4, vocab_size=VOCAB_SIZE, skip_bad_shards=True)


def test_pretrain_skip_bad_shards_trains_on_the_rest(tmp_path, capsys):
    from pld_helpers import REPO, torch_threads

    from pld_ds import pretrain

    data = make_shard_dir(tmp_path / "data", shard_sizes=(32, 32, 32), seq_len=SEQ)
    corrupt = data / "train" / "train_00001.hdf5"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    common = ["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu_pld.json"), "--data", str(data),
              "--model", "tiny", "--log-interval", "1", "--max-steps", "2"]
    with pytest.raises(ShardError, match="train_00001.hdf5"):
        pretrain.run(pretrain.parse_args([*common, "--output", str(tmp_path / "strict")]))
    with torch_threads(1):
        scalars = pretrain.run(pretrain.parse_args([*common, "--output", str(tmp_path / "out"), "--skip-bad-shards"]))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "skipping bad shard 1 of 1 (3 in the folder)" in warnings[0] and str(corrupt) in warnings[0]
    assert "2 shards, 4 steps/epoch" in out  # two shards of 32 left, micro batch 16
    assert math.isfinite(scalars["train/loss"])
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "global_step2"


def reference_masking(m, input_ids, input_mask, rng):
    """DynamicMasking's draw written plainly, row by row: the vectorised version must draw exactly the same.
    Random keys (high bits of the generator's raw 32-bit words, the position below them) order each row's
    candidates; the `want` first are targets; then one uniform per target, row by row in key order."""
    rows, seq_len = input_ids.shape
    special = set(m.special_ids)
    cap = min(seq_len, m.max_predictions or max(1, round(seq_len * m.masked_lm_prob)))
    pos_bits = max(1, (seq_len - 1).bit_length())
    words = rng.bit_generator.random_raw(-(-rows * seq_len // 2)).view(np.uint32)
    targets = []
    for r in range(rows):
        cand = [c for c in range(seq_len) if input_mask[r, c] != 0 and int(input_ids[r, c]) not in special]
        want = min(cap, max(1, round(len(cand) * m.masked_lm_prob)))
        key = {c: ((int(words[r * seq_len + c]) >> (pos_bits + 1)) << pos_bits) | c for c in cand}
        targets += [(r, c) for c in sorted(cand, key=key.get)[:want]]
    labels = np.full((rows, seq_len), schema.IGNORE_INDEX, dtype=np.int64)
    masked = input_ids.astype(np.int64, copy=True)
    action = rng.random(len(targets))
    randomised = []
    for (r, c), a in zip(targets, action, strict=True):
        labels[r, c] = input_ids[r, c]
        if a < 0.8:
            masked[r, c] = m.mask_id
        elif a < 0.9:
            randomised.append((r, c))
    for (r, c), token in zip(randomised, rng.integers(0, m.vocab_size, len(randomised)), strict=True):
        masked[r, c] = token
    return masked, labels


@pytest.mark.parametrize("max_predictions", [None, 3, 500])
def test_dynamic_masking_draws_as_before(max_predictions):
    masking = DynamicMasking(mask_id=MASK, special_ids=(0, CLS, SEP, MASK), vocab_size=VOCAB_SIZE,
                             max_predictions=max_predictions)
    gen = np.random.default_rng(1)
    for trial in range(100):
        rows, seq = int(gen.integers(1, 40)), int(gen.integers(2, 80))
        ids = gen.integers(0, VOCAB_SIZE, (rows, seq)).astype(np.int32)
        mask = (np.arange(seq)[None] < gen.integers(0, seq + 1, rows)[:, None]).astype(np.int8)  # some rows empty
        want = reference_masking(masking, ids, mask, np.random.default_rng(trial))
        got = masking(ids, mask, np.random.default_rng(trial))
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])


# -- shuffle windows (shards larger than memory), worker processes --------------------------------


def write_chunked_shard(path, arrays, chunk_rows):
    """A shard with HDF5 chunks of `chunk_rows` rows, so read slabs (and shuffle blocks) are that small."""
    with h5py.File(path, "w") as f:
        for field in schema.ALL_FIELDS:
            data = arrays[field.name].astype(field.dtype)
            f.create_dataset(field.name, data=data, compression=schema.COMPRESSION,
                             chunks=(chunk_rows, *data.shape[1:]))
    return path


@pytest.fixture(scope="module")
def windowed_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    rng = np.random.default_rng(11)
    return [write_chunked_shard(root / f"train_{i}.hdf5", make_samples(n, SEQ, 5, rng), 4)
            for i, n in enumerate((45, 30, 22))]


@pytest.fixture
def small_windows(monkeypatch):
    """Slabs of 4 rows (one chunk), windows of 3 slabs: shards of 45 and 30 rows have 4 and 3 windows."""
    from pld_ds.data import loader as loader_module

    monkeypatch.setattr(shards, "SLAB_BYTES", 1)
    monkeypatch.setattr(loader_module, "SHUFFLE_WINDOW_BYTES", 3 * 4 * 4 * SEQ)
    return 12


def windowed_reference(paths, micro, rank, world, seed, n):
    """The documented order written out: blocks of 4 rows in an order by (seed, epoch, shard), grouped 3 to a
    window, each window's rows shuffled by (seed, epoch, shard, window); a shard of one window is permuted whole."""
    data = [read_all(p) for p in paths]
    sizes = [len(d["input_ids"]) for d in data]
    per_epoch = sum(sizes) // (micro * world)
    out = []
    for b in range(n):
        epoch, batch = divmod(b, per_epoch)
        stream = []
        for i in np.random.default_rng([seed, epoch]).permutation(len(paths)):
            i, blocks = int(i), -(-sizes[int(i)] // 4)
            if blocks <= 3:
                stream += [(i, int(r)) for r in np.random.default_rng([seed, epoch, i]).permutation(sizes[i])]
                continue
            order = np.random.default_rng([seed, epoch, i]).permutation(blocks)
            for j, start in enumerate(range(0, blocks, 3)):
                blk = order[start:start + 3]
                rows = np.array([r for b in blk for r in range(4 * b, min(4 * b + 4, sizes[i]))])
                stream += [(i, int(r)) for r in rows[np.random.default_rng([seed, epoch, i, j]).permutation(len(rows))]]
        first = batch * micro * world + rank * micro
        out.append(np.stack([data[i]["input_ids"][r] for i, r in stream[first:first + micro]]).astype(np.int64))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_windowed_order_equals_the_documented_order(windowed_paths, small_windows, world):
    for rank in range(world):
        loader = ShardBatches(windowed_paths, micro_batch=4, vocab_size=VOCAB_SIZE, rank=rank, world_size=world,
                              seed=2)
        n = loader.batches_per_epoch + 4
        expected = windowed_reference(windowed_paths, 4, rank, world, 2, n)
        assert all(np.array_equal(b["input_ids"].numpy(), e) for b, e in zip(take(loader, n), expected, strict=True))


def test_windowed_reads_never_hold_a_whole_shard(windowed_paths, small_windows, monkeypatch):
    """Each read is one window (at most 12 rows here), and the reader keeps at most two windows."""
    from pld_ds.data import loader as loader_module

    sizes, held = [], []
    original_read, original_batch = shards.read_rows, loader_module._Reader.batch

    def counting_read(info, rows, vocab_size):
        sizes.append(len(rows))
        return original_read(info, rows, vocab_size)

    def watching_batch(self, epoch, batch):
        out = original_batch(self, epoch, batch)
        held.append(sum(len(rows.stream) for rows in self.cache.values()))
        return out

    monkeypatch.setattr(shards, "read_rows", counting_read)
    monkeypatch.setattr(loader_module._Reader, "batch", watching_batch)
    loader = ShardBatches(windowed_paths, micro_batch=3, vocab_size=VOCAB_SIZE, prefetch=0)
    take(loader, 2 * loader.batches_per_epoch)
    assert max(sizes) <= small_windows < 45 and len(sizes) >= 2 * (4 + 3 + 1)
    assert max(held) <= 2 * small_windows


@pytest.mark.parametrize("k", [0, 7, 31, 32, 40])
def test_windowed_resume_equals_uninterrupted(windowed_paths, small_windows, k):
    total = 45
    reference = take(ShardBatches(windowed_paths, micro_batch=3, vocab_size=VOCAB_SIZE, seed=4), total)
    first = ShardBatches(windowed_paths, micro_batch=3, vocab_size=VOCAB_SIZE, seed=4)
    head = take(first, k)
    resumed = ShardBatches(windowed_paths, micro_batch=3, vocab_size=VOCAB_SIZE, seed=4)
    resumed.load_state_dict(first.state_dict())
    got = head + take(resumed, total - k)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference, got, strict=True))


@pytest.mark.slow
def test_workers_give_the_same_batches_and_read_disjoint_rows(paths, tmp_path):
    """Two DataLoader worker processes: the same batches in the same order as one process (across an epoch
    boundary, from a resumed position too), each worker reading only its own batches' rows."""
    per_epoch = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE).batches_per_epoch
    total = per_epoch + 5
    reference = take(ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=9, prefetch=0), total)
    with_workers = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=9, workers=2)
    got = take(with_workers, 7)
    resumed = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=9, workers=2)
    resumed.load_state_dict(with_workers.state_dict())
    got += take(resumed, total - 7)
    for a, b in zip(reference, got, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])
    evaluation = list(ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=9, workers=2).one_pass())
    assert len(evaluation) == per_epoch
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference, evaluation, strict=False))

    from pld_ds.data.loader import _Reader

    loader = ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=9)
    readers = [_Reader(loader, w, 2, start=(0, 3)) for w in range(2)]
    rows = [[key for b in range(3 + w, per_epoch, 2) for key in keys(readers[w].batch(0, b))] for w in range(2)]
    held = [sum(len(r.stream) for r in reader.cache.values()) for reader in readers]
    assert not set(rows[0]) & set(rows[1])
    assert held[0] < 5 * per_epoch and held[1] < 5 * per_epoch


def test_a_worker_error_is_the_original_one_line_error(tmp_path):
    arrays = make_samples(40, SEQ, 5, np.random.default_rng(0))
    arrays["input_ids"][30, 3] = VOCAB_SIZE + 7
    path = write_shard(tmp_path / "bad.hdf5", arrays)
    loader = ShardBatches([path], micro_batch=5, vocab_size=VOCAB_SIZE, workers=2)
    with pytest.raises(ShardError) as err:
        take(loader, 8)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# -- binning by length ----------------------------------------------------------------------------


def real_lengths(batch):
    mask = batch["attention_mask"].numpy() != 0
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


@pytest.mark.parametrize("world", [1, 2])
def test_binned_epoch_covers_each_sample_once_and_only_cuts_padding(paths, all_rows, world):
    micro = 4
    loaders = [ShardBatches(paths, micro_batch=micro, vocab_size=VOCAB_SIZE, rank=r, world_size=world, seed=6,
                            bin_by_length=True) for r in range(world)]
    per_epoch = loaders[0].batches_per_epoch
    seen = []
    for loader in loaders:
        for batch in take(loader, per_epoch):
            width = batch["input_ids"].shape[1]
            longest = int(real_lengths(batch).max())
            assert width == min(SEQ, -(-longest // 8) * 8)  # cut to the longest sample, rounded up to 8
            for row in batch["input_ids"].numpy().astype(np.int64):
                # the dropped columns were padding: the row padded back is a row of the shards
                key = np.pad(row, (0, SEQ - width)).tobytes()
                assert key in all_rows
                seen.append(key)
    assert len(seen) == len(set(seen)) == per_epoch * micro * world


def test_binned_batches_hold_similar_lengths(tmp_path):
    """One shard, lengths from 16 to 32: without binning every batch needs all 32 columns."""
    rng = np.random.default_rng(0)
    arrays = make_samples(256, SEQ, 5, rng)
    path = write_shard(tmp_path / "s.hdf5", arrays)
    plain = take(ShardBatches([path], micro_batch=16, vocab_size=VOCAB_SIZE, seed=1), 16)
    binned = take(ShardBatches([path], micro_batch=16, vocab_size=VOCAB_SIZE, seed=1, bin_by_length=True), 16)
    computed = [b["input_ids"].numel() for b in binned]
    assert sum(computed) <= 0.9 * sum(b["input_ids"].numel() for b in plain)  # lengths 16..32, widths 16/24/32
    spread = [int(np.ptp(real_lengths(b))) for b in binned]
    assert max(spread) <= 4  # 256 samples over ~16 lengths: a batch of 16 spans at most a few


def test_length_buckets_bound_the_batch_shapes(tmp_path):
    """With buckets, a binned batch is cut to the smallest bucket that holds its longest sample: a whole
    epoch shows only the bucket lengths (and the full length), never more shapes than len(batch_lengths)."""
    path = write_shard(tmp_path / "s.hdf5", make_samples(256, SEQ, 5, np.random.default_rng(4)))
    default = ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, seed=2, bin_by_length=True)
    assert default.batch_lengths == (8, 16, 24, 32)
    loader = ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, seed=2, bin_by_length=True,
                          length_buckets=[26, 18, 22])
    assert loader.batch_lengths == (18, 22, 26, 32)
    epoch = take(loader, loader.batches_per_epoch)
    widths = [b["input_ids"].shape[1] for b in epoch]
    for batch, width in zip(epoch, widths, strict=True):
        longest = int(real_lengths(batch).max())
        assert width == min(b for b in loader.batch_lengths if b >= longest)
        assert all(v.shape[1] == width for k, v in batch.items() if v.dim() == 2)
    assert set(widths) <= set(loader.batch_lengths) and len(set(widths)) >= 3  # lengths 16..32: buckets all used
    default_widths = {b["input_ids"].shape[1] for b in take(default, default.batches_per_epoch)}
    assert default_widths <= {16, 24, 32} and not default_widths & {18, 22, 26}


@pytest.mark.parametrize("buckets", [[0, 16], [16, 33], [], [16.5]])
def test_bad_length_buckets_are_one_line_errors(tmp_path, buckets):
    path = write_shard(tmp_path / "s.hdf5", make_samples(16, SEQ, 5, np.random.default_rng(4)))
    with pytest.raises(ShardError, match=r"length buckets: expected lengths from 1 to the shards' sequence length 32"):
        ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, bin_by_length=True, length_buckets=buckets)


@pytest.mark.parametrize("k", [0, 9, 23, 30])
def test_binned_resume_equals_uninterrupted(paths, k):
    total = 40
    make = lambda: ShardBatches(paths, micro_batch=5, vocab_size=VOCAB_SIZE, seed=8, bin_by_length=True)  # noqa: E731
    reference = take(make(), total)
    first = make()
    head = take(first, k)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    got = head + take(resumed, total - k)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(reference, got, strict=True) for n in a)


def test_cutting_padding_columns_leaves_the_loss_unchanged(tmp_path):
    from pld_helpers import tiny_model

    path = write_shard(tmp_path / "s.hdf5", make_samples(64, SEQ, 5, np.random.default_rng(2)))
    loader = ShardBatches([path], micro_batch=16, vocab_size=VOCAB_SIZE, seed=3, bin_by_length=True)
    batch = min(take(loader, 4), key=lambda b: b["input_ids"].shape[1])  # the shortest group
    width = batch["input_ids"].shape[1]
    assert width < SEQ
    padded = {k: torch.nn.functional.pad(v, (0, SEQ - width), value=-100 if k == "masked_lm_labels" else 0)
              if v.dim() == 2 else v for k, v in batch.items()}
    model = tiny_model().eval()
    with torch.no_grad():
        cut, full = model(**batch), model(**padded)
    assert torch.allclose(cut.loss, full.loss, atol=1e-6) and torch.allclose(cut.mlm_logits, full.mlm_logits, atol=1e-5)


def test_prefetch_threads_left_open_are_stopped_before_the_interpreter_exits(paths):
    """A stream still referenced at the end of a program (here: a generator never closed) keeps its daemon
    prefetch thread; the exit handler stops and joins it, so no thread is inside h5py or torch when the
    interpreter finalizes (which aborts the process after a finished run)."""
    import threading

    from pld_ds.data.loader import _Prefetch

    stream = iter(ShardBatches(paths, micro_batch=4, vocab_size=VOCAB_SIZE, prefetch=2))
    next(stream)
    live = [t for t in threading.enumerate() if t.name == "ShardBatches-prefetch" and t.is_alive()]
    assert live, "the stream should have a prefetch thread running"
    _Prefetch.close_all()  # what the exit handler registered by pld_ds.data.loader runs
    assert not any(t.is_alive() for t in live)
    assert not list(_Prefetch._live)
    stream.close()
