"""Bad input is rejected cleanly: exit code 2 and one line that names the file, key or shard.

Every case goes through a public entry point: pld-pretrain (``pld_ds.pretrain.main``), pld-prep
(``data_prep.cli.main``) or the library functions they call. Hypothesis feeds random PLD blocks,
model files, JSON texts and shard corruptions to the validators: each input is either accepted with
valid values or rejected with a ConfigError / ShardError naming the culprit, never another exception.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pld_helpers import REPO, child_env, console_script, load_ds_config, write_json
from shard_fixtures import VOCAB_SIZE, make_samples, make_shard_dir, write_shard

from data_prep import cli as prep_cli
from pld_ds import pretrain
from pld_ds.config import PLD_KEY, ConfigError, PLDConfig, model_config, read_json, split_ds_config
from pld_ds.data import schema
from pld_ds.data.loader import ShardBatches
from pld_ds.data.masking import DynamicMasking
from pld_ds.data.shards import ShardError
from pld_ds.model import BertConfig

GOOD_CONFIG = REPO / "ds_configs" / "tiny_cpu_pld.json"
Capsys = pytest.CaptureFixture[str]
PrepInputs = tuple[Path, Path]  # (corpus, vocab)
FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- the contract ----------------------------------------------------------------------------------


def error_line(code: object, out: str, err: str, prog: str) -> str:
    """The one stderr line of a rejected input, after checking exit code 2 and no traceback."""
    assert "Traceback" not in out + err, err[-3000:]
    assert code == 2, (code, err[-3000:])
    lines = err.splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def assert_names(line: str, *fragments: object) -> None:
    for fragment in fragments:
        assert str(fragment) in line, (fragment, line)


def pretrain_error(capsys: Capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        pretrain.main(args)
    out, err = capsys.readouterr()
    return error_line(exited.value.code, out, err, "pld-pretrain")


def prep_error(capsys: Capsys, args: list[str]) -> str:
    try:
        code: object = prep_cli.main(args)
    except SystemExit as exited:  # argparse
        code = exited.code
    out, err = capsys.readouterr()
    return error_line(code, out, err, "pld-prep")


def pretrain_args(tmp: Path, config: Path | str = GOOD_CONFIG, data: Path | None = None, model: str = "tiny",
                  *extra: str) -> list[str]:
    return ["--deepspeed_config", str(config), "--data", str(data or tmp / "data"), "--output", str(tmp / "out"),
            "--model", model, "--max-steps", "2", *extra]


class DataOnlyEngine:
    """Stands in for PLDEngine: pretrain checks the shards after building the engine, and here that takes
    milliseconds instead of a DeepSpeed start-up."""

    micro_batch_size = 4
    global_steps = 0
    data_parallel, num_stages = (0, 1), 1  # what the loop's interface (pld_ds.engine_api) asks before the first step

    def __init__(self, model: Any, config: Any, **_: Any) -> None:
        self.module, self.ds_config = model, {}
        _, self.pld, _ = split_ds_config(config)

    def train_batch(self, batches: Any, **_: Any) -> None:
        for _ in range(100):  # several epochs of the small test shards: every shard is read
            next(batches)
        raise AssertionError("100 batches of bad data went through")


@pytest.fixture(autouse=True)
def no_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process pld-pretrain never starts DeepSpeed: a case that gets past its check fails in milliseconds."""
    fake = types.ModuleType("pld_ds.engine")
    fake.PLDEngine = DataOnlyEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pld_ds.engine", fake)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_shard_dir(tmp_path / "data", shard_sizes=(16, 16), seq_len=32, max_pred=5)


# -- pld-pretrain: the DeepSpeed JSON --------------------------------------------------------------


def with_pld(block: object) -> dict[str, Any]:
    config = load_ds_config()
    config[PLD_KEY] = block
    return config


def pld_with(**values: object) -> dict[str, Any]:
    return with_pld({"enabled": True, "theta": 0.5, "gamma": 0.001, **values})


# name -> (file content: text, bytes or a JSON value; fragments the error line must hold besides the file)
CONFIG_CASES: dict[str, tuple[object, list[str]]] = {
    "not_json": ("train_batch_size = 16\n", ["invalid JSON at line 1 column 1"]),
    "empty_file": ("", ["invalid JSON"]),
    "trailing_comma": ('{"train_micro_batch_size_per_gpu": 4,\n "gradient_accumulation_steps": 1,\n}\n',
                       ["invalid JSON at line 3"]),
    "top_level_array": ("[16, 1]", ["expected a JSON object", "list"]),
    "top_level_string": ('"ds_configs/tiny_cpu_pld.json"', ["expected a JSON object", "str"]),
    "not_utf8": (b'{"optimizer": {"type": "Adam\xe9"}}', ["cannot read", "UTF-8"]),
    "integer_too_long_for_python": ('{"train_batch_size": ' + "9" * 5000 + "}", ["invalid JSON"]),
    "nested_too_deeply": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", ["invalid JSON", "nested too deeply"]),
    "pld_block_is_a_list": (with_pld([True, 0.5, 0.001]), [PLD_KEY, "expected an object", "list"]),
    "pld_block_is_true": (with_pld(True), [PLD_KEY, "expected an object", "bool"]),
    "theta_zero": (pld_with(theta=0), [f"{PLD_KEY}.theta", "(0, 1]"]),
    "theta_negative": (pld_with(theta=-0.5), [f"{PLD_KEY}.theta", "-0.5"]),
    "theta_above_one": (pld_with(theta=1.01), [f"{PLD_KEY}.theta", "1.01"]),
    "theta_nan": (pld_with(theta=float("nan")), [f"{PLD_KEY}.theta", "nan"]),
    "theta_string": (pld_with(theta="0.5"), [f"{PLD_KEY}.theta", "'0.5'"]),
    "theta_bool": (pld_with(theta=True), [f"{PLD_KEY}.theta", "True"]),
    "theta_null": (pld_with(theta=None), [f"{PLD_KEY}.theta", "None"]),
    "gamma_negative": (pld_with(gamma=-0.001), [f"{PLD_KEY}.gamma", ">= 0"]),
    "gamma_nan": (pld_with(gamma=float("nan")), [f"{PLD_KEY}.gamma", "nan"]),
    "gamma_infinite": (pld_with(gamma=float("inf")), [f"{PLD_KEY}.gamma", "inf"]),
    "gamma_beyond_float_range": (pld_with(gamma=10**400), [f"{PLD_KEY}.gamma", "..."]),
    "enabled_string": (pld_with(enabled="true"), [f"{PLD_KEY}.enabled", "true or false"]),
    "enabled_one": (pld_with(enabled=1), [f"{PLD_KEY}.enabled", "got 1"]),
    "unknown_pld_key": (pld_with(theta_bar=0.5), [f"{PLD_KEY}.theta_bar", "unknown key", "enabled, gamma, theta"]),
    "two_problems_at_once": (pld_with(theta=2, gamma=-1), [f"{PLD_KEY}.theta", f"{PLD_KEY}.gamma"]),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_bad_deepspeed_config(name: str, tmp_path: Path, data: Path, capsys: Capsys) -> None:
    content, fragments = CONFIG_CASES[name]
    path = tmp_path / f"{name}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_json(path, content)
    line = pretrain_error(capsys, pretrain_args(tmp_path, path))
    assert_names(line, path, *fragments)


def test_deepspeed_config_missing_or_a_folder(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    missing = tmp_path / "no_such.json"
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, missing)), missing, "no such DeepSpeed config")
    folder = tmp_path / "configs.json"
    folder.mkdir()
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, folder)), folder, "is a directory")


def test_debug_shows_the_traceback(tmp_path: Path, data: Path) -> None:
    path = write_json(tmp_path / "theta.json", pld_with(theta=0))
    with pytest.raises(ConfigError, match="theta"):
        pretrain.main([*pretrain_args(tmp_path, path), "--debug"])


# -- pld-pretrain: --model -------------------------------------------------------------------------


MODEL_CASES: dict[str, tuple[object, list[str]]] = {
    "unknown_field": ({"hidden_size": 64, "num_layer": 2}, ["unknown key num_layer", "num_layers"]),
    "string_value": ({"hidden_size": "64"}, ["hidden_size", "an integer", "'64'"]),
    "negative_value": ({"num_layers": -2}, ["num_layers", "positive integer"]),
    "float_for_an_integer": ({"num_heads": 2.0}, ["num_heads", "an integer"]),
    "bool_for_an_integer": ({"num_layers": True}, ["num_layers", "an integer", "True"]),
    "string_for_a_float": ({"hidden_dropout": "0.1"}, ["hidden_dropout", "number"]),
    "null_for_a_float": ({"attention_dropout": None}, ["attention_dropout", "number"]),
    "string_for_a_bool": ({"activation_checkpointing": "yes"}, ["activation_checkpointing", "true or false"]),
    "dropout_of_one": ({"hidden_dropout": 1.0}, ["hidden_dropout", "[0, 1)"]),
    "hidden_not_divisible_by_heads": ({"hidden_size": 64, "num_heads": 3}, ["not divisible", "num_heads 3"]),
    "top_level_array": ([64, 4], ["expected a JSON object"]),
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_bad_model_file(name: str, tmp_path: Path, data: Path, capsys: Capsys) -> None:
    fields, fragments = MODEL_CASES[name]
    path = write_json(tmp_path / f"{name}.json", fields)
    line = pretrain_error(capsys, pretrain_args(tmp_path, model=str(path)))
    assert_names(line, path, *fragments)


def test_unknown_preset_or_missing_model_file(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, model="gigantic")), "--model", "'gigantic'", "tiny")
    missing = tmp_path / "model.json"
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, model=str(missing))), missing, "no such model file")


# -- pld-pretrain: data folders and manifest -------------------------------------------------------


def test_data_folder_missing_empty_or_a_file(tmp_path: Path, capsys: Capsys) -> None:
    missing = tmp_path / "nowhere"
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, data=missing)), "--data", missing, "no such directory")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "notes.txt").write_text("shards go here")
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, data=empty)), "--data", empty / "train", "no *.hdf5")
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, data=GOOD_CONFIG)), "--data", GOOD_CONFIG)


def test_eval_data_missing(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    missing = tmp_path / "no_eval"
    line = pretrain_error(capsys, pretrain_args(tmp_path, GOOD_CONFIG, data, "tiny", "--eval-data", str(missing)))
    assert_names(line, "--eval-data", missing)


MANIFEST_CASES: dict[str, tuple[str, list[str]]] = {
    "not_json": ('{"vocab": {"size": 100}', ["invalid JSON"]),
    "top_level_array": ('[{"vocab": {"size": 100}}]', ["expected a JSON object"]),
    "size_a_string": ('{"vocab": {"size": "100"}}', ["vocab.size", "positive integer", "'100'"]),
    "size_a_bool": ('{"vocab": {"size": true}}', ["vocab.size", "positive integer"]),
    "size_zero": ('{"vocab": {"size": 0}}', ["vocab.size", "positive integer"]),
    "vocab_not_an_object": ('{"vocab": "vocab.txt"}', ["vocab.size"]),
}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_bad_manifest(name: str, tmp_path: Path, data: Path, capsys: Capsys) -> None:
    text, fragments = MANIFEST_CASES[name]
    manifest = data / schema.MANIFEST_NAME
    manifest.write_text(text)
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path)), manifest, *fragments)


def test_manifest_vocab_file_without_mask(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    (data / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nword\n")
    (data / schema.MANIFEST_NAME).write_text('{"vocab": {"size": 100, "file": "vocab.txt"}}')
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path)), data / "vocab.txt", "[MASK]")


# -- pld-pretrain: shards (the checks after engine start-up, with DeepSpeed stood in for) ---------


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def write_arrays(path: Path, arrays: dict[str, Any], groups: tuple[str, ...] = (), compression: str | None = None
                 ) -> Path:
    """As given: any dtype, any shape, no casting to the schema (unlike shard_fixtures.write_shard)."""
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            value = np.asarray(value)
            f.create_dataset(name, data=value, compression=compression if value.size and value.ndim else None)
        for name in groups:
            f.create_group(name)
    return path


def edit_shard(path: Path, edit: Callable[[dict[str, np.ndarray]], object], groups: tuple[str, ...] = ()) -> Path:
    arrays = read_arrays(path)
    edit(arrays)
    return write_arrays(path, arrays, groups)


def set_value(name: str, index: tuple[int, ...], value: int) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = arrays[name].astype(np.int64)
        arrays[name][index] = value
    return edit


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# name -> (what to do to the second training shard, fragments besides its path)
SHARD_CASES: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), ["not a readable HDF5 shard"]),
    "empty_file": (lambda p: p.write_bytes(b""), ["not a readable HDF5 shard"]),
    "truncated": (truncate, []),
    "a_folder": (lambda p: p.unlink() or p.mkdir(), ["not a readable HDF5 shard"]),
    "missing_dataset": (lambda p: edit_shard(p, lambda a: a.pop("segment_ids")), ["missing dataset segment_ids"]),
    "only_one_mask_field": (lambda p: edit_shard(p, lambda a: a.pop("masked_lm_ids")), ["masked_lm_positions"]),
    "float_ids": (lambda p: edit_shard(p, lambda a: a.update(input_ids=a["input_ids"].astype(np.float32))),
                  ["input_ids", "dtype float32"]),
    "string_labels": (lambda p: edit_shard(p, lambda a: a.update(next_sentence_labels=np.array([b"IsNext"] * 16))),
                      ["next_sentence_labels", "dtype"]),
    "wrong_shape": (lambda p: edit_shard(p, lambda a: a.update(input_mask=a["input_mask"][:, :31])),
                    ["input_mask", "shape (16, 31)", "(16, 32)"]),
    "mismatched_rows": (lambda p: edit_shard(p, lambda a: a.update(masked_lm_ids=a["masked_lm_ids"][:15])),
                        ["masked_lm_ids", "shape (15, 5)"]),
    "scalar_ids": (lambda p: edit_shard(p, lambda a: a.update(input_ids=np.int32(7))), ["input_ids", "shape ()"]),
    "group_for_a_dataset": (lambda p: edit_shard(p, lambda a: a.pop("input_mask"), groups=("input_mask",)),
                            ["input_mask", "not a dataset"]),
    "token_id_at_vocab_size": (lambda p: edit_shard(p, set_value("input_ids", (5, 3), VOCAB_SIZE)),
                               ["input_ids", f"[0, {VOCAB_SIZE})"]),
    "negative_token_id": (lambda p: edit_shard(p, set_value("input_ids", (0, 1), -1)), ["input_ids"]),
    "label_id_beyond_vocab": (lambda p: edit_shard(p, set_value("masked_lm_ids", (3, 0), 10**6)), ["masked_lm_ids"]),
    "masked_position_at_seq_len": (lambda p: edit_shard(p, set_value("masked_lm_positions", (7, 0), 32)),
                                   ["masked_lm_positions", "[0, 32)"]),
    "negative_masked_position": (lambda p: edit_shard(p, set_value("masked_lm_positions", (7, 1), -3)),
                                 ["masked_lm_positions"]),
    "other_sequence_length": (lambda p: write_shard(p, make_samples(16, 48, 5, np.random.default_rng(1))),
                              ["sequence length 48", "expected 32"]),
    "dynamic_masking_without_vocab": (lambda p: edit_shard(p, lambda a: [a.pop("masked_lm_ids"),
                                                                         a.pop("masked_lm_positions")]),
                                      ["dynamic-masking", "[MASK]"]),
}


@pytest.mark.parametrize("name", SHARD_CASES)
def test_bad_training_shard(name: str, tmp_path: Path, data: Path, capsys: Capsys) -> None:
    damage, fragments = SHARD_CASES[name]
    shard = data / "train" / "train_00001.hdf5"
    damage(shard)
    line = pretrain_error(capsys, pretrain_args(tmp_path))
    assert_names(line, shard, *fragments)


def test_sequence_longer_than_the_model_allows(tmp_path: Path, capsys: Capsys) -> None:
    data = make_shard_dir(tmp_path / "data", shard_sizes=(8,), seq_len=160, max_pred=5)
    line = pretrain_error(capsys, pretrain_args(tmp_path, data=data))  # tiny: max_position_embeddings 128
    assert_names(line, data / "train" / "train_00000.hdf5", "sequence length 160", "max_position_embeddings 128")


def test_validation_shard_of_another_sequence_length(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    (data / "validation").mkdir()
    shard = write_shard(data / "validation" / "validation_00000.hdf5", make_samples(8, 64, 5, np.random.default_rng(2)))
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path)), shard, "sequence length 64", "expected 32")


def test_skip_bad_shards_when_every_shard_is_bad(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    for shard in (data / "train").glob("*.hdf5"):
        shard.write_bytes(b"not hdf5")
    line = pretrain_error(capsys, [*pretrain_args(tmp_path), "--skip-bad-shards"])
    assert_names(line, data / "train", "all 2 shards failed", "train_00000.hdf5")


# -- pld-pretrain: through the real DeepSpeed engine (separate processes: DeepSpeed starts once per process) --


def ds_config_with(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    config = load_ds_config()
    edit(config)
    return config


ENGINE_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown_optimizer": (ds_config_with(lambda c: c["optimizer"].update(type="Adamm")),
                          ["DeepSpeed rejected the config", "Adamm"]),
    "batch_size_inconsistent": (ds_config_with(lambda c: c.update(train_batch_size=24, gradient_accumulation_steps=2)),
                                ["DeepSpeed rejected the config", "train_batch_size"]),
    "negative_lr": (ds_config_with(lambda c: c["optimizer"]["params"].update(lr=-1.0)),
                    ["DeepSpeed rejected the config", "learning rate"]),
    "bad_token_in_a_shard": (load_ds_config(), ["train_00001.hdf5", "input_ids", f"[0, {VOCAB_SIZE})"]),
}


@pytest.fixture(scope="module")
def engine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine_errors")


@pytest.fixture(scope="module")
def engine_runs(engine_root: Path) -> dict[str, tuple[int, str, str]]:
    """Every case at once, as `python -m pld_ds.pretrain` (each spends seconds importing and starting DeepSpeed)."""
    tmp = engine_root
    data = make_shard_dir(tmp / "data", shard_sizes=(16, 16), seq_len=32, max_pred=5)
    bad = make_shard_dir(tmp / "bad_data", shard_sizes=(16, 16), seq_len=32, max_pred=5)
    edit_shard(bad / "train" / "train_00001.hdf5", set_value("input_ids", (9, 4), VOCAB_SIZE + 7))
    procs = {}
    for name, (config, _) in ENGINE_CASES.items():
        path = write_json(tmp / f"{name}.json", config)
        args = pretrain_args(tmp / name, path, bad if name == "bad_token_in_a_shard" else data, "tiny",
                             "--max-steps", "20")
        procs[name] = subprocess.Popen([sys.executable, "-m", "pld_ds.pretrain", *args], cwd=REPO, env=child_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # and one run that works, for what start-up prints
    make_shard_dir(tmp / "good_data", shard_sizes=(16, 16), seq_len=32, max_pred=5, validation=16)
    args = pretrain_args(tmp / "good_run", GOOD_CONFIG, tmp / "good_data", "tiny", "--max-steps", "2",
                         "--log-interval", "1", "--eval-interval", "1", "--eval-batches", "1")
    procs["good_run"] = subprocess.Popen([sys.executable, "-m", "pld_ds.pretrain", *args], cwd=REPO, env=child_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_CASES)
def test_rejected_through_the_engine(name: str, engine_runs: dict[str, tuple[int, str, str]], engine_root: Path
                                     ) -> None:
    code, out, err = engine_runs[name]
    line = error_line(code, out, err, "pld-pretrain")
    assert_names(line, *ENGINE_CASES[name][1])
    if name != "bad_token_in_a_shard":
        assert_names(line, f"{name}.json")
    # DeepSpeed's monitors had created csv/ and an events file, and run_config.json was written: all gone
    assert not (engine_root / name / "out").exists()


@pytest.mark.slow
def test_startup_says_what_it_does_once(engine_runs: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = engine_runs["good_run"]
    assert code == 0, err[-3000:]
    lines = (out + err).splitlines()
    for said in ("pld-pretrain: checking 2 training shards",
                 "pld-pretrain: starting DeepSpeed on its CPU accelerator (no GPU found)",
                 "pld-pretrain: DeepSpeed started in "):
        assert sum(line.startswith(said) for line in lines) == 1, (said, lines)
    # evaluations at --eval-interval reach the console, not only TensorBoard (step 2 is the final one)
    evals = [line.split()[:2] for line in lines if line.startswith("eval ")]
    assert evals == [["eval", "1"], ["eval", "eval/mlm_loss"]], lines
    for noise in ("Setting accelerator to CPU", "before it has started", "built successfully"):
        assert not [line for line in lines if noise in line], noise


# -- pld-prep --------------------------------------------------------------------------------------

WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi") for b in ("ba", "de", "fo", "gu", "pi")]


def write_vocab(path: Path, specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    path.write_text("\n".join([*specials, *".,!?", *letters, *("##" + c for c in letters), *WORDS]) + "\n")
    return path


def write_corpus(path: Path, documents: int = 6) -> Path:
    rng = np.random.default_rng(0)
    docs = ["\n".join(" ".join(rng.choice(WORDS, 8)).capitalize() + "." for _ in range(12)) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture
def prep_inputs(tmp_path: Path) -> tuple[Path, Path]:
    return write_corpus(tmp_path / "corpus.txt"), write_vocab(tmp_path / "vocab.txt")


def prep_args(corpus: Path | list[Path], vocab: Path, output: Path, *extra: str) -> list[str]:
    inputs = [str(p) for p in (corpus if isinstance(corpus, list) else [corpus])]
    return ["--input", *inputs, "--output", str(output), "--vocab", str(vocab), "--workers", "1",
            "--max-seq-length", "32", "--dupe-factor", "1", *extra]


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-seq-length", "4", "from 8 to"),
    ("--max-seq-length", "long", "'long'"),
    ("--masked-lm-prob", "0", "> 0.0"),
    ("--masked-lm-prob", "1.5", "<= 1.0"),
    ("--masked-lm-prob", "nan", "'nan'"),
    ("--num-shards", "0", ">= 1"),
    ("--workers", "0", ">= 1"),
    ("--validation-fraction", "1", "<= 0.5"),
    ("--dupe-factor", "-1", ">= 1"),
    ("--max-predictions-per-seq", "40", "at most --max-seq-length"),
])
def test_prep_bad_flag_value(flag: str, value: str, expected: str, prep_inputs: PrepInputs, tmp_path: Path,
                             capsys: Capsys) -> None:
    line = prep_error(capsys, prep_args(*prep_inputs, tmp_path / "out", flag, value))
    assert_names(line, flag, expected)
    assert not (tmp_path / "out").exists()


def test_prep_input_missing_or_empty(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    _, vocab = prep_inputs
    missing = tmp_path / "no_corpus.txt"
    assert_names(prep_error(capsys, prep_args(missing, vocab, tmp_path / "o1")), "--input", missing, "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    line = prep_error(capsys, prep_args(empty, vocab, tmp_path / "o2"))
    assert_names(line, "--input", empty, "no documents")
    # it got as far as copying the vocabulary and making its work folder, and says so
    assert_names(line, f"this run left .pld-prep-work/, vocab.txt in {tmp_path / 'o2'}", "a re-run reuses",
                 f"to clean up, rm -r {tmp_path / 'o2'}")
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "notes.txt").write_text("mine")
    line = prep_error(capsys, prep_args(empty, vocab, tmp_path / "o4"))  # a folder of the user's: only ours goes
    assert_names(line, "this run left .pld-prep-work/, vocab.txt in", f"remove {tmp_path / 'o4' / '.pld-prep-work/'} ")
    assert "notes.txt" not in line
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    assert_names(prep_error(capsys, prep_args(folder, vocab, tmp_path / "o3")), folder, "no input files")


def test_prep_vocab_missing_or_incomplete(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    corpus, _ = prep_inputs
    missing = tmp_path / "no_vocab.txt"
    assert_names(prep_error(capsys, prep_args(corpus, missing, tmp_path / "o")), "--vocab", missing)
    no_mask = write_vocab(tmp_path / "no_mask.txt", ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
    assert_names(prep_error(capsys, prep_args(corpus, no_mask, tmp_path / "o")), "--vocab", no_mask, "[MASK]")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ncaf\xe9\n".encode("latin-1"))
    assert_names(prep_error(capsys, prep_args(corpus, latin1, tmp_path / "o")), "--vocab", latin1, "UTF-8")


def test_prep_jsonl_without_usable_lines(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    _, vocab = prep_inputs
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"id": 1, "body": "a document under the wrong key, long enough"}\n{"text": \n[1, 2]\n')
    assert_names(prep_error(capsys, prep_args(jsonl, vocab, tmp_path / "o")), jsonl, "'text' field", "3 skipped")


def test_prep_output_is_a_file(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    corpus, vocab = prep_inputs
    target = tmp_path / "shards"
    target.write_text("a file, not a folder")
    assert_names(prep_error(capsys, prep_args(corpus, vocab, target)), "--output", target, "not a directory")
    assert_names(prep_error(capsys, prep_args(corpus, vocab, target / "sub")), "--output", target / "sub")


def test_prep_compressed_input(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    _, vocab = prep_inputs
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00")
    assert_names(prep_error(capsys, prep_args(gz, vocab, tmp_path / "o")), gz, "compressed input is not supported")


def test_prep_bad_bytes_and_jsonl_lines_are_counted(prep_inputs: PrepInputs, tmp_path: Path, capsys: Capsys) -> None:
    """Stray bytes and malformed JSONL lines are what real corpora hold: replaced or skipped, and counted."""
    corpus, vocab = prep_inputs
    binary = tmp_path / "mixed.txt"
    binary.write_bytes(corpus.read_bytes().replace(b"ka", b"k\xff\xfe", 7) + bytes(range(256)) * 4)
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": doc}) for doc in corpus.read_text().split("\n\n")]
    jsonl.write_text("\n".join([lines[0], "{broken", json.dumps({"title": "no text"}), *lines[1:]]) + "\n")
    out = tmp_path / "out"
    assert prep_cli.main(prep_args([binary, jsonl], vocab, out)) == 0
    assert "Traceback" not in capsys.readouterr().err
    manifest = read_json(out / schema.MANIFEST_NAME)
    by_path = {source["path"]: source for source in manifest["sources"]}
    assert by_path[str(binary)]["replaced_bytes"] >= 7
    assert by_path[str(jsonl)]["skipped_documents"] == 2
    assert by_path[str(jsonl)]["documents"] == len(lines)


@pytest.mark.slow
def test_console_scripts_report_one_line(prep_inputs: PrepInputs, tmp_path: Path) -> None:
    """The installed commands, as a shell runs them: exit status 2 and one line on stderr."""
    corpus, vocab = prep_inputs
    config = write_json(tmp_path / "theta.json", pld_with(theta=1.5))
    commands = {
        "pld-pretrain": [console_script("pld-pretrain"), *pretrain_args(tmp_path, config)],
        "pld-prep": [console_script("pld-prep"), *prep_args(tmp_path / "missing.txt", vocab, tmp_path / "o")],
    }
    procs = {prog: subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for prog, cmd in commands.items()}
    for prog, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        line = error_line(proc.returncode, out, err, prog)
        assert_names(line, config if prog == "pld-pretrain" else tmp_path / "missing.txt")


# -- gaps found by these tests, since fixed --------------------------------------------------------------


def test_pretrain_bad_flag_is_one_line(tmp_path: Path, capsys: Capsys) -> None:
    line = pretrain_error(capsys, [*pretrain_args(tmp_path), "--vocab-size", "many"])
    assert_names(line, "--vocab-size", "'many'")


def test_pretrain_unknown_compile_backend_is_one_line(tmp_path: Path, capsys: Capsys) -> None:
    assert_names(pretrain_error(capsys, [*pretrain_args(tmp_path), "--compile", "nope"]), "--compile", "'nope'",
                 "inductor")


def test_pretrain_negative_vocab_size_names_the_flag(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    assert_names(pretrain_error(capsys, [*pretrain_args(tmp_path), "--vocab-size", "-5"]), "--vocab-size")


def test_manifest_vocab_file_not_utf8(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    (data / "vocab.txt").write_bytes("[PAD]\n[MASK]\ncaf\xe9\n".encode("latin-1"))
    (data / schema.MANIFEST_NAME).write_text('{"vocab": {"size": 100, "file": "vocab.txt"}}')
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path)), data / "vocab.txt", "UTF-8")


def test_negative_initializer_range(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    path = write_json(tmp_path / "model.json", {"initializer_range": -0.02})
    assert_names(pretrain_error(capsys, pretrain_args(tmp_path, model=str(path))), path, "initializer_range")


# -- errors and warnings a user met, before DeepSpeed starts and around it ---------------------------


def test_manifest_vocab_larger_than_vocab_size_flag_is_an_error(tmp_path: Path, data: Path, capsys: Capsys) -> None:
    """Shards of a 100-token vocab with --vocab-size 50: token ids beyond the embedding."""
    line = pretrain_error(capsys, [*pretrain_args(tmp_path), "--vocab-size", str(VOCAB_SIZE // 2)])
    assert_names(line, f"--vocab-size {VOCAB_SIZE // 2}", data / schema.MANIFEST_NAME, f"vocab.size {VOCAB_SIZE}")


def test_vocab_size_flag_above_the_manifest_warns_once(tmp_path: Path, data: Path, capsys: Capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2,000-token shards run under --vocab-size 30522 case: it runs (an explicit override), and says so."""
    monkeypatch.setattr(DataOnlyEngine, "train_batch", stop_at_first_step)
    with pytest.raises(FirstStep):
        pretrain.main([*pretrain_args(tmp_path), "--vocab-size", "30522"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("pld-pretrain: warning: --vocab-size 30522 overrides"), err
    assert_names(err[0], data / schema.MANIFEST_NAME, "vocab.size 100", "30422 extra embedding rows", "vocab.txt")


class FirstStep(Exception):
    pass


def stop_at_first_step(self: Any, batches: Any, **_: Any) -> None:
    next(batches)
    raise FirstStep


def test_fp16_on_cpu_is_refused_before_deepspeed_starts(tmp_path: Path, data: Path, capsys: Capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pld_ds import startup

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the engine was built")

    monkeypatch.setattr(DataOnlyEngine, "__init__", never)
    monkeypatch.setattr(startup, "runs_on_cpu", lambda: True)
    config = write_json(tmp_path / "fp16.json", ds_config_with(lambda c: c.update(fp16={"enabled": True})))
    line = pretrain_error(capsys, pretrain_args(tmp_path, config))
    assert_names(line, config, "fp16.enabled", "CPU accelerator", '"bf16": {"enabled": true}', "fp32")
    assert not (tmp_path / "out").exists()


def test_fp16_check_only_on_cpu_and_only_when_enabled() -> None:
    from pld_ds.startup import check_precision

    check_precision({"fp16": {"enabled": True}}, "x.json", on_cpu=False)
    check_precision({"fp16": {"enabled": False}, "bf16": {"enabled": True}}, "x.json", on_cpu=True)
    with pytest.raises(ConfigError, match=r"^x\.json: fp16\.enabled: "):
        check_precision({"fp16": {"enabled": True, "loss_scale": 0}}, "x.json", on_cpu=True)


def test_schedule_warnings() -> None:
    from pld_ds.startup import schedule_warnings

    config = load_ds_config()  # WarmupDecayLR, total_num_steps 1000, lr 0.003
    assert schedule_warnings(config, "c.json", 1000) == []
    (beyond,) = schedule_warnings(config, "c.json", 1500)
    assert_names(beyond, "c.json", "total_num_steps is 1000", "--max-steps is 1500", "steps 1001-1500",
                 "warmup_min_lr: lr 0.0", "set total_num_steps to 1500")
    cosine = {**config, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}}
    assert_names(schedule_warnings(cosine, "c.json", 20)[0], "steps 11-20", "cos_min_ratio: 0.0001 x the peak lr")
    assert schedule_warnings({**config, "scheduler": {"type": "WarmupLR", "params": {}}}, "c.json", 10**6) == []
    # an old DeepSpeedExamples PLD config: warm-up in the script's flags, none in the JSON
    (constant,) = schedule_warnings({k: v for k, v in config.items() if k != "scheduler"}, "old.json", 200)
    assert_names(constant, 'old.json: no "scheduler" block', "0.003", "for all 200 steps", "no warm-up",
                 '"type": "WarmupDecayLR"', '"total_num_steps": 200')
    json.loads(constant.split("add ", 1)[1].split(": ", 1)[1])  # the suggested block is valid JSON


def test_schedule_warnings_are_printed_at_start(tmp_path: Path, data: Path, capsys: Capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DataOnlyEngine, "train_batch", stop_at_first_step)
    config = write_json(tmp_path / "old.json", ds_config_with(lambda c: c.pop("scheduler")))
    with pytest.raises(FirstStep):
        pretrain.main([*pretrain_args(tmp_path, config), "--max-steps", "2"])
    out, err = capsys.readouterr()
    assert err.startswith(f'pld-pretrain: warning: {config}: no "scheduler" block') and err.count("\n") == 1
    assert "checking 2 training shards" in out and "starting DeepSpeed" in out  # what start-up is doing


def test_output_that_cannot_be_a_folder_fails_before_deepspeed_starts(tmp_path: Path, data: Path, capsys: Capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the engine was built")

    monkeypatch.setattr(DataOnlyEngine, "__init__", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = pretrain_args(tmp_path)
    for output, fragment in ((blocker, f"--output {blocker}: exists"),
                             (blocker / "run", f"--output {blocker / 'run'}: cannot be made: {blocker} is a file")):
        args[args.index("--output") + 1] = str(output)
        assert_names(pretrain_error(capsys, args), fragment, "expected a folder")


def test_without_noise_drops_only_deepspeeds_every_run_lines(capfd: pytest.CaptureFixture[str]) -> None:
    from pld_ds.startup import without_noise

    with without_noise():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line that matters\nand another", end="")
        assert isinstance(sys.stdout.isatty(), bool) and sys.stdout.encoding
    print(" one")
    assert capfd.readouterr().out == "a line that matters\nand another one\n"


def test_op_build_locks_are_reported_and_a_stale_one_named(tmp_path: Path) -> None:
    """torch waits for an op build's lock file forever and silently: a killed build hung every later start."""
    import os

    from pld_ds.startup import STALE_LOCK_SECONDS, build_lock_notes

    assert build_lock_notes(tmp_path) == []
    stale = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    now = stale.stat().st_mtime + STALE_LOCK_SECONDS + 60
    fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh.parent.mkdir()
    fresh.touch()
    os.utime(fresh, (now - 30, now - 30))
    (waiting, note), (is_stale, warning) = build_lock_notes(tmp_path, now)
    assert not waiting and note.startswith("another process is building the op deepspeed_shm_comm")
    assert is_stale and warning.startswith(f"{stale} has held the build of the op fused_adam since ")
    assert warning.endswith(f"if no build is running, delete {stale}") and "(11 min)" in warning


def test_start_up_says_which_ops_it_will_compile(tmp_path: Path) -> None:
    from pld_ds.startup import starting_message

    adam = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    torch_adam = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    assert starting_message(adam, True, tmp_path) == (
        "starting DeepSpeed on its CPU accelerator (no GPU found); it compiles fused_adam and deepspeed_shm_comm "
        "first (once per machine: a minute or two on idle cores, more on busy ones; \"torch_adam\": true in the "
        "optimizer's params uses torch's Adam and compiles none)")
    offload = {**adam, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert "it compiles cpu_adam and deepspeed_shm_comm first" in starting_message(offload, True, tmp_path)
    for op in ("fused_adam", "deepspeed_shm_comm"):  # built before: nothing to compile
        (tmp_path / "py311_cpu" / op).mkdir(parents=True)
        (tmp_path / "py311_cpu" / op / f"{op}.so").touch()
    assert starting_message(adam, True, tmp_path) == "starting DeepSpeed on its CPU accelerator (no GPU found)"
    assert starting_message(torch_adam, False, tmp_path / "empty") == "starting DeepSpeed"


def test_eval_interval_without_validation_shards_warns(tmp_path: Path, data: Path, capsys: Capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DataOnlyEngine, "train_batch", stop_at_first_step)
    with pytest.raises(FirstStep):
        pretrain.main([*pretrain_args(tmp_path), "--eval-interval", "100"])
    err = capsys.readouterr().err
    assert err.startswith("pld-pretrain: warning: --eval-interval 100: no validation shards") and err.count("\n") == 1
    make_shard_dir(data, shard_sizes=(16, 16), seq_len=32, max_pred=5, validation=16)
    with pytest.raises(FirstStep):
        pretrain.main([*pretrain_args(tmp_path), "--eval-interval", "100"])
    assert capsys.readouterr().err == ""


def test_resume_at_or_past_max_steps_says_nothing_will_train(tmp_path: Path, data: Path, capsys: Capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out" / "checkpoints" / "global_step5").mkdir(parents=True)

    def resumed(engine: Any, *_: Any) -> None:
        engine.global_steps = 5

    def stop(*_: Any, **__: Any) -> None:
        raise FirstStep

    monkeypatch.setattr(pretrain, "resume_from", resumed)
    monkeypatch.setattr(pretrain.checkpoint, "Checkpointer", stop)  # built after the resume, before the loop
    with pytest.raises(FirstStep):
        pretrain.main([*pretrain_args(tmp_path), "--resume", "auto"])  # --max-steps 2
    err = capsys.readouterr().err
    assert err.startswith(f"pld-pretrain: warning: --resume auto: {tmp_path / 'out' / 'checkpoints' / 'global_step5'}"
                          " is at step 5, not below --max-steps 2: nothing to train") and err.count("\n") == 1


def test_resume_that_does_not_fit_names_the_tensor_and_shapes(tmp_path: Path) -> None:
    """What torch raises for a checkpoint of another model: its first line alone names nothing."""
    from pld_ds.model import BertForPreTraining

    small, other = BertForPreTraining(model_config("tiny")), BertForPreTraining(model_config("tiny", vocab_size=640))

    class Engine:
        def load_checkpoint(self, *_: Any) -> None:
            small.load_state_dict(other.state_dict())

    with pytest.raises(pretrain.UserError) as err:
        pretrain.resume_from(Engine(), "auto", (tmp_path / "ck", "global_step4"), None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--resume auto: {tmp_path / 'ck' / 'global_step4'} does not fit")
    assert_names(message, "size mismatch for embeddings.word.weight", "torch.Size([640, 64])",
                 "torch.Size([30528, 64])", "more)")


def test_load_failure_keeps_short_messages_and_counts_the_rest() -> None:
    assert pretrain.load_failure(AssertionError()) == "AssertionError"
    assert pretrain.load_failure(RuntimeError("no such step")) == "no such step"
    many = RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(f"problem {i}" for i in range(5)))
    assert pretrain.load_failure(many) == "Error(s) in loading state_dict: problem 0 problem 1 (and 3 more)"


def monitors_at_start(self: DataOnlyEngine, model: Any, config: Any, *, output_dir: Any = None, **_: Any) -> None:
    """What DeepSpeed's monitors create when its engine starts: csv/ and a TensorBoard events file."""
    DataOnlyEngine.__init__(self, model, config)
    (Path(output_dir) / "csv" / "run").mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "tensorboard" / "run").mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "tensorboard" / "run" / "events.out.tfevents.1.host").write_bytes(b"header")


def test_a_run_that_fails_before_its_first_step_leaves_no_output(tmp_path: Path, data: Path, capsys: Capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["pld_ds.engine"], "PLDEngine", type("Engine", (DataOnlyEngine,),
                                                                         {"__init__": monitors_at_start}))
    edit_shard(data / "train" / "train_00001.hdf5", set_value("input_ids", (9, 4), VOCAB_SIZE + 7))  # read in step 1
    line = pretrain_error(capsys, pretrain_args(tmp_path))
    assert_names(line, "train_00001.hdf5", "input_ids")
    assert not (tmp_path / "out").exists()
    # A folder that held an earlier run keeps what it held, run_config.json as it was, and nothing new.
    out = tmp_path / "out"
    (out / "checkpoints" / "global_step2").mkdir(parents=True)
    (out / "tensorboard" / "run").mkdir(parents=True)
    old_events = out / "tensorboard" / "run" / "events.out.tfevents.0.host"
    old_events.write_bytes(b"old")
    (out / "run_config.json").write_text('{"earlier": true}')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    pretrain_error(capsys, pretrain_args(tmp_path))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "run_config.json").read_text() == '{"earlier": true}' and old_events.read_bytes() == b"old"


def test_outputs_of_a_run_that_took_a_step_stay(tmp_path: Path) -> None:
    from pld_ds.startup import FreshOutputs

    steps = [0]
    with pytest.raises(RuntimeError), FreshOutputs(tmp_path / "out") as outputs:
        outputs.watch(lambda: steps[0])
        (tmp_path / "out" / "csv").mkdir(parents=True)
        steps[0] = 1
        raise RuntimeError("a failure at step 2")
    assert (tmp_path / "out" / "csv").is_dir()
    with FreshOutputs(tmp_path / "other"):  # no failure: nothing is undone
        (tmp_path / "other").mkdir()
    assert (tmp_path / "other").is_dir()


@pytest.mark.parametrize("field, index, value", [("next_sentence_labels", (3,), 5), ("segment_ids", (2, 4), 2)])
def test_label_and_segment_values_are_checked(field: str, index: tuple[int, ...], value: int, tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.hdf5", make_samples(8, 16, 3, np.random.default_rng(0)))
    edit_shard(path, set_value(field, index, value))
    with pytest.raises(ShardError, match=field):
        list(itertools.islice(iter(ShardBatches([path], micro_batch=8, vocab_size=VOCAB_SIZE, prefetch=0)), 1))


# -- property: random PLD blocks -------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.just(10**400) | st.floats()
                | st.floats(0, 1) | st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
PLD_KEYS = st.sampled_from(["enabled", "theta", "gamma"]) | st.from_regex(r"[A-Za-z_]{1,12}", fullmatch=True)


def finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def bad_pld_keys(block: dict[str, Any]) -> set[str]:
    """The spec, written out independently: which keys of a block must be named in the error."""
    bad = {key for key in block if key not in ("enabled", "theta", "gamma")}
    if "enabled" in block and not isinstance(block["enabled"], bool):
        bad.add("enabled")
    theta = block.get("theta", 1.0)
    if not (finite_number(theta) and 0 < theta <= 1):
        bad.add("theta")
    gamma = block.get("gamma", 0.0)
    if not (finite_number(gamma) and gamma >= 0):
        bad.add("gamma")
    return bad


@FAST
@given(block=st.dictionaries(PLD_KEYS, JSON_VALUES, max_size=5)
       | st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "theta": st.floats(-0.5, 1.5),
                                             "gamma": st.floats(-1, 1)})
       | st.fixed_dictionaries({}, optional=dict.fromkeys(["enabled", "theta", "gamma"], JSON_SCALARS)))
def test_random_pld_block_is_accepted_in_range_or_named(block: dict[str, Any]) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, PLD_KEY: block}
    bad = bad_pld_keys(block)
    try:
        rest, pld, _ = split_ds_config(config)
    except ConfigError as err:
        message = str(err)
        assert bad, message
        assert "\n" not in message
        for key in bad:
            assert f"{PLD_KEY}.{key}" in message, (key, message)
        return
    assert not bad, (bad, pld)
    assert rest == {"train_micro_batch_size_per_gpu": 2}
    assert isinstance(pld.enabled, bool) and 0 < pld.theta <= 1 and 0 <= pld.gamma < math.inf
    assert pld == PLDConfig(block.get("enabled", False), float(block.get("theta", 1.0)),
                            float(block.get("gamma", 0.001)))


@FAST
@given(block=JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_pld_block_that_is_not_an_object_is_named(block: object) -> None:
    with pytest.raises(ConfigError, match=rf"^DeepSpeed config: {PLD_KEY}: expected an object"):
        split_ds_config({PLD_KEY: block})


# -- property: random JSON texts and model files ---------------------------------------------------

GOOD_TEXT = GOOD_CONFIG.read_text()


@st.composite
def damaged_json_texts(draw: st.DrawFn) -> str:
    """The shipped config with a few characters deleted, replaced or inserted, or random text."""
    if draw(st.booleans()):
        return draw(st.text(max_size=40))
    text = GOOD_TEXT
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        text = text[:at] + draw(st.sampled_from(["", ",", "}", "]", '"', "NaN", "-", "1e999", "\\", "\x00"])) \
            + text[at + cut:]
    return text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@FAST
@given(text=damaged_json_texts())
def test_damaged_config_text_is_parsed_or_named(text: str, scratch: Path) -> None:
    path = scratch / "config.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        rest, pld, source = split_ds_config(path)
    except ConfigError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)
        return
    assert source == str(path) and PLD_KEY not in rest and 0 < pld.theta <= 1


MODEL_FIELDS = [f.name for f in dataclasses.fields(BertConfig)]
MODEL_VALUES = JSON_SCALARS | st.integers(1, 8) | st.sampled_from([64, 128, 0.1, 1e-12, "pre", "post"])


@FAST
@given(fields=st.dictionaries(st.sampled_from(MODEL_FIELDS) | st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                              MODEL_VALUES, max_size=4))
def test_random_model_file_is_a_valid_config_or_named(fields: dict[str, Any], scratch: Path) -> None:
    path = scratch / "model.json"
    path.write_text(json.dumps(fields))
    try:
        cfg = model_config(str(path))
    except ConfigError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert any(key in message for key in fields), message
        return
    for field in dataclasses.fields(cfg):
        value, default = getattr(cfg, field.name), field.default
        if default is None:  # per-layer widths of a slim (EarlyBERT) model
            assert value is None or all(isinstance(w, int) and w >= 1 for w in value), (field.name, value)
        elif isinstance(default, bool):
            assert isinstance(value, bool), (field.name, value)
        elif isinstance(default, int):
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (field.name, value)
        elif isinstance(default, str):  # layer_norm
            assert value in ("pre", "post"), (field.name, value)
        else:
            assert finite_number(value), (field.name, value)
    assert cfg.hidden_size % cfg.num_heads == 0


# -- property: random shard corruptions ------------------------------------------------------------

SEQ, PRED, ROWS, MICRO = 16, 3, 8, 4
MASKING = DynamicMasking(mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB_SIZE)
FIELDS = [field.name for field in schema.ALL_FIELDS]
DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float64", "bool", "S3"]


@st.composite
def corruptions(draw: st.DrawFn) -> list[tuple]:
    """One to three edits of a good shard's datasets."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        kind = draw(st.sampled_from(["drop", "dtype", "shape", "rows", "value", "scalar", "group"]))
        if kind == "dtype":
            edits.append((kind, field, draw(st.sampled_from(DTYPES))))
        elif kind == "shape":
            edits.append((kind, field, tuple(draw(st.lists(st.integers(0, 20), max_size=3)))))
        elif kind == "rows":
            edits.append((kind, field, draw(st.integers(0, 2 * ROWS))))
        elif kind == "value":
            value = draw(st.integers(-(2**40), 2**40) | st.sampled_from([-100, -1, 0, SEQ, VOCAB_SIZE - 1, VOCAB_SIZE]))
            edits.append((kind, field, (draw(st.integers(0, ROWS - 1)), draw(st.integers(0, SEQ - 1)), value)))
        else:
            edits.append((kind, field, None))
    return edits


def corrupt(arrays: dict[str, np.ndarray], edits: list[tuple]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    groups: list[str] = []
    for kind, field, arg in edits:
        if field not in arrays:
            continue
        if kind == "drop":
            del arrays[field]
        elif kind == "dtype":
            arrays[field] = arrays[field].astype(arg)
        elif kind == "shape":
            arrays[field] = np.random.default_rng(len(arg)).integers(0, SEQ, arg).astype(np.int32)
        elif kind == "rows" and arrays[field].size:  # fewer rows, or rows repeated
            arrays[field] = np.take(arrays[field], np.arange(arg) % len(arrays[field]), axis=0)
        elif kind == "value" and arrays[field].size and arrays[field].dtype.kind in "iu":
            target = arrays[field].astype(np.int64)
            row, col, value = arg
            index = (row % len(target), *((col % target.shape[1],) if target.ndim == 2 and target.shape[1] else ()))
            target[index] = value
            arrays[field] = target
        elif kind == "scalar":
            arrays[field] = np.int32(1)
        elif kind == "group":
            del arrays[field]
            groups.append(field)
    return arrays, tuple(groups)


def assert_valid_batch(batch: dict[str, Any]) -> None:
    ids, labels = batch["input_ids"], batch["masked_lm_labels"]
    assert ids.shape == (MICRO, SEQ) and labels.shape == (MICRO, SEQ)
    assert batch["token_type_ids"].shape == batch["attention_mask"].shape == (MICRO, SEQ)
    if "next_sentence_labels" in batch:  # absent from MLM-only shards
        labels_nsp = batch["next_sentence_labels"]
        assert labels_nsp.shape == (MICRO,) and set(labels_nsp.tolist()) <= {0, 1}
    assert 0 <= ids.min() and ids.max() < VOCAB_SIZE
    targets = labels[labels != schema.IGNORE_INDEX]
    assert targets.numel() == 0 or (0 <= targets.min() and targets.max() < VOCAB_SIZE)


def batches_or_shard_error(path: Path, prefetch: int) -> None:
    """Every batch of one epoch (and the start of the next) is valid, or a ShardError names ``path``."""
    try:
        loader = ShardBatches([path], micro_batch=MICRO, vocab_size=VOCAB_SIZE, masking=MASKING, prefetch=prefetch)
        batches = iter(loader)
        try:
            for batch in itertools.islice(batches, loader.batches_per_epoch + 1):
                assert_valid_batch(batch)
        finally:
            batches.close()  # stops the prefetch thread before the next example rewrites the file
        event("accepted: valid batches")
    except ShardError as err:
        event("rejected: ShardError")
        message = str(err)
        assert (str(path) in message or str(path.parent) in message) and "\n" not in message, message


@FAST
@given(edits=corruptions(), compression=st.sampled_from([None, "gzip"]), prefetch=st.sampled_from([0, 2]))
def test_corrupted_shard_gives_valid_batches_or_a_shard_error(edits: list[tuple], compression: str | None,
                                                             prefetch: int, scratch: Path) -> None:
    arrays, groups = corrupt(make_samples(ROWS, SEQ, PRED, np.random.default_rng(0)), edits)
    path = write_arrays(scratch / "corrupt.hdf5", arrays, groups, compression)
    batches_or_shard_error(path, prefetch)


@pytest.fixture(scope="module")
def good_shard_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "good.hdf5"
    return write_shard(path, make_samples(ROWS, SEQ, PRED, np.random.default_rng(0))).read_bytes()


@FAST
@given(data=st.data())
def test_damaged_shard_bytes_give_valid_batches_or_a_shard_error(data: st.DataObject, good_shard_bytes: bytes,
                                                                scratch: Path) -> None:
    raw = bytearray(good_shard_bytes)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    for _ in range(data.draw(st.integers(0, 8), label="flips") if raw else 0):
        raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(st.integers(0, 255), label="byte")
    path = scratch / "damaged.hdf5"
    path.write_bytes(bytes(raw))
    batches_or_shard_error(path, prefetch=data.draw(st.sampled_from([0, 2]), label="prefetch"))

