"""pld-prep's start-up: workers started before the pipeline is imported, lazy imports in the parent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_data_prep import REPO, SPECIALS, read_split, run_cli, write_vocab, write_wiki

from data_prep import pipeline, workers
from data_prep.vocab import WordPieceEncoder, load_vocab


def prep(corpus: Path, output: Path, vocab: Path, count: int, pool: object = None, seed: int = 7) -> pipeline.Summary:
    cfg = pipeline.PrepConfig(inputs=(str(corpus),), output=output, vocab=vocab, workers=count, seed=seed,
                              validation_fraction=0.05, dupe_factor=2)
    return pipeline.run(cfg, pool=pool)  # type: ignore[arg-type]


def test_pipeline_imports_no_tokenizer_segmenter_or_hdf5() -> None:
    # A parent with a forkserver tokenizes nothing and writes no shard: it must not pay for those
    # imports before it can hand out the first batch (the forkserver imports them, in parallel).
    code = ("import sys, data_prep.cli, data_prep.pipeline; "
            "print(sorted(m for m in ('blingfire', 'tokenizers', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


FORK_CHECK = """
import os, sys, threading
from data_prep import workers
release = threading.Event()
if sys.argv[1] == "with-thread":
    threading.Thread(target=release.wait).start()
pool = workers.start_pool(2, fork_here=True)
parents = {pool.submit(os.getppid).result() for _ in range(6)}
release.set()
pool.shutdown()
print("forked here" if parents == {os.getpid()} else "forkserver", sorted(sys.modules.keys() & {"h5py", "blingfire"}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked from the parent on Linux only")
def test_single_threaded_parent_forks_its_workers_otherwise_a_forkserver_does() -> None:
    # pld-prep forks its workers itself (no second interpreter importing numpy & co. again), but only
    # while no other thread runs: a lock held by another thread would stay locked in the child.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    results = {}
    for case in ("alone", "with-thread"):
        out = subprocess.run([sys.executable, "-c", FORK_CHECK, case], capture_output=True, text=True, env=env,
                             timeout=120, check=True)
        results[case] = out.stdout.strip()
    assert results == {"alone": "forked here ['blingfire', 'h5py']", "with-thread": "forkserver []"}


def test_pool_shut_down_while_its_processes_start_ends_quietly() -> None:
    # The forkserver's processes start on a thread; a run that fails at once shuts the pool down
    # while that thread may still be starting them: nothing may hang or stay running, and the
    # thread, finding the pool shut down, stops without an error.
    pool = workers.start_pool(2)
    assert pool is not None
    pool.shutdown(wait=False, cancel_futures=True)
    starters = [t for t in threading.enumerate() if t.name == "pld-prep-pool-start"]
    for thread in starters:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in starters)
    pool.shutdown(wait=True)
    closed = ProcessPoolExecutor(2)
    closed.shutdown()
    workers._start_processes(closed, 2)  # the order in which the shutdown comes first: no error


def test_cli_forked_workers_write_the_one_process_shards(tmp_path: Path) -> None:
    # pld-prep as a program (workers forked from it) and as one process give the same shards.
    vocab = write_vocab(tmp_path / "vocab.txt")
    corpus = write_wiki(tmp_path / "wiki_00", 60)
    args = ["--input", str(corpus), "--vocab", str(vocab), "--dupe-factor", "2", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPENBLAS_NUM_THREADS", None)  # the program sets it itself
    subprocess.run([sys.executable, "-m", "data_prep", *args, "--output", str(tmp_path / "a"), "--workers", "2"],
                   capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=True)
    cfg = pipeline.PrepConfig(inputs=(str(corpus),), output=tmp_path / "b", vocab=vocab, workers=1, seed=3,
                              dupe_factor=2)
    alone = pipeline.run(cfg)
    assert alone.instances["train"] > 0
    for split in ("train", "validation"):
        a, b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("lowercase", [True, False])
def test_vocabulary_words_skip_hf_with_its_answer(tmp_path: Path, lowercase: bool) -> None:
    # A word that is a vocabulary entry is looked up, not sent to HF: the answer must stay HF's for
    # entries that are duplicated (HF keeps the last), longer than WordPiece's 100 characters (HF:
    # [UNK]), cased, accented, or written with trailing blanks (HF strips them).
    from tokenizers import BertWordPieceTokenizer

    long = "x" * 120
    tokens = [*SPECIALS, *"abcdefghijklmnopqrstuvwxyz", *("##" + c for c in "abcdefghijklmnopqrstuvwxyz"), ".",
              "kalo", "mine", "kalo", "Toru", "toru", "café", "cafe", "sane  ", long, "##ne", "ka", "##lo"]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    sentences = ["Kalo mine kalo.", "Toru toru TORU café cafe CAFÉ.", "sane sane  .", f"{long} {long[:99]} kaka",
                 "kalokalo minemine", "ka lo ne kane"]
    encoder = WordPieceEncoder(load_vocab(path, lowercase))
    hf = BertWordPieceTokenizer(str(path), lowercase=lowercase)
    expected = [r.ids for r in hf.encode_batch(sentences, add_special_tokens=False)]
    assert hf.token_to_id("kalo") == len(tokens) - 1 - tokens[::-1].index("kalo")  # the duplicate's later id
    for _ in range(2):  # from the vocabulary, then from the cache
        ids, lengths = encoder.encode(sentences)
        ends = np.cumsum(lengths)
        assert [ids[e - n : e].tolist() for e, n in zip(ends, lengths, strict=True)] == expected


def test_prestarted_pool_serves_runs_and_is_shut_down(tmp_path: Path) -> None:
    vocab = write_vocab(tmp_path / "vocab.txt")
    corpus = write_wiki(tmp_path / "wiki_00", 80)
    pipeline.BATCH_CHARS, original = 20_000, pipeline.BATCH_CHARS  # several batches per worker
    try:
        pool = workers.start_pool(2, str(vocab), lowercase=True)
        assert pool is not None
        first = prep(corpus, tmp_path / "a", vocab, 2, pool, seed=7)
        with pytest.raises(RuntimeError):  # the run shut the pool down
            pool.submit(int)
        # Same settings, one process: the same shards (output never depends on --workers); and the
        # same with a pool started without the vocabulary (the workers load it with the first batch).
        alone = prep(corpus, tmp_path / "b", vocab, 1, seed=7)
        cold = prep(corpus, tmp_path / "c", vocab, 2, workers.start_pool(2), seed=7)
    finally:
        pipeline.BATCH_CHARS = original
    assert first.instances == alone.instances == cold.instances
    for split in ("train", "validation"):
        a, b, c = (read_split(tmp_path / x, split) for x in "abc")
        assert a.keys() == b.keys() == c.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])


def test_bad_vocab_with_workers_started_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_wiki(tmp_path / "wiki_00", 10)
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\n[UNK]\nkalo\n", encoding="utf-8")
    code, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "o"), "--vocab", str(bad),
                        "--workers", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bad_vocab.txt" in err and "[MASK]" in err


def test_small_corpora_get_several_shards_independent_of_workers() -> None:
    # One shard is one process's work: a 4 MB corpus (about 45k samples) in a single shard would
    # leave every other worker idle while it is compressed.
    assert [pipeline._num_shards("train", n, None) for n in (0, 10, 16383, 45_028, 139_000)] == [0, 1, 1, 2, 4]
    assert pipeline._num_shards("train", 300_000, None) == 5  # one per ~65k samples from there on
    assert pipeline._num_shards("train", 45_028, 1) == 1  # --num-shards wins
    assert pipeline._num_shards("validation", 45_028, 1) == 2


def test_cli_starts_workers_first_unless_an_input_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_prep import cli

    calls: list[tuple] = []
    monkeypatch.setattr(cli, "start_pool", lambda *a, **k: calls.append((a, k)))  # returns None: one process
    vocab = write_vocab(tmp_path / "vocab.txt")
    corpus = write_wiki(tmp_path / "wiki_00", 10)
    code, err = run_cli(capsys, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                        "--vocab", str(vocab), "--workers", "2")
    assert code == 2 and "missing" in err and calls == []
    code, _ = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "o"), "--vocab", str(vocab),
                      "--workers", "3")
    assert code == 0 and calls == [((3, str(vocab)), {"lowercase": True, "fork_here": True})]


def test_spill_batches_are_reused_only_when_their_arrays_are_intact(tmp_path: Path) -> None:
    # Spill files are not fsynced: a re-run checks each array against the CRC-32 in the batch's
    # JSON, so a batch that a machine crash left with stale or missing bytes is made again.
    from data_prep import writer

    arrays = {name: None for name in writer.SPILL_ARRAYS}
    arrays.update(input_ids=np.arange(40, dtype=np.int64).reshape(4, 10), lengths=np.array([10, 9, 8, 7]),
                  b_starts=np.array([3, 4, 5, 2]), next_sentence_labels=np.array([0, 1, 1, 0]))
    stats = {"documents": 2, "instances": 4}
    dtypes = writer.spill_dtypes(100)
    writer.write_spill(tmp_path, 3, arrays, dtypes, stats)
    assert writer.read_spill_meta(tmp_path, 3) == stats
    assert writer.read_spill_meta(tmp_path, 4) is None  # never written
    ids = next(tmp_path.glob("batch_000003.input_ids.npy"))
    good = ids.read_bytes()
    ids.write_bytes(good[:-2] + bytes([good[-2] ^ 1, good[-1]]))  # same size, one bit changed
    assert writer.read_spill_meta(tmp_path, 3) is None
    ids.write_bytes(good[: len(good) // 2])  # cut short
    assert writer.read_spill_meta(tmp_path, 3) is None
    ids.write_bytes(good)
    assert writer.read_spill_meta(tmp_path, 3) == stats
    (tmp_path / "batch_000003.json").write_text('{"documents": 2, "instances": 4}')  # no checksums
    assert writer.read_spill_meta(tmp_path, 3) is None
