"""pld-prep's start-up: workers started before the pipeline is imported, lazy imports in the parent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_prep import read_split, run_cli, write_vocab, write_wiki

from data_prep import pipeline, workers


def prep(corpus: Path, output: Path, vocab: Path, count: int, pool: object = None, seed: int = 7) -> pipeline.Summary:
    cfg = pipeline.PrepConfig(inputs=(str(corpus),), output=output, vocab=vocab, workers=count, seed=seed,
                              validation_fraction=0.05, dupe_factor=2)
    return pipeline.run(cfg, pool=pool)  # type: ignore[arg-type]


def test_parent_imports_no_tokenizer_or_segmenter() -> None:
    # The parent of a --vocab run tokenizes nothing: it must not pay for those imports before it can
    # hand out the first batch (the workers import them, in parallel).
    code = "import sys, data_prep.cli; print(sorted(m for m in ('blingfire', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
    assert code == 0 and calls == [((3, str(vocab)), {"lowercase": True})]
