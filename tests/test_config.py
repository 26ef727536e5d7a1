"""The PLD block, DeepSpeed configs and model presets (pld_ds/config.py, ds_configs/*.json)."""

from __future__ import annotations

import json

import pytest
import torch.distributed
from pld_helpers import DS_CONFIGS, load_ds_config, write_json

from pld_ds.config import (
    MODEL_PRESETS,
    PLD_KEY,
    ConfigError,
    PLDConfig,
    model_config,
    padded_vocab_size,
    read_json,
    split_ds_config,
)
from pld_ds.errors import UserError
from pld_ds.model import BertConfig

ALL_DS_CONFIGS = sorted(DS_CONFIGS.glob("*.json"))

# -- the progressive_layer_drop block -------------------------------------------------------------


def test_valid_block():
    cfg = PLDConfig.from_dict({"enabled": True, "theta": 0.5, "gamma": 0.001})
    assert cfg == PLDConfig(enabled=True, theta=0.5, gamma=0.001)
    assert isinstance(cfg.theta, float) and isinstance(cfg.gamma, float)


def test_block_defaults_and_int_values():
    assert PLDConfig.from_dict({}) == PLDConfig(enabled=False, theta=1.0, gamma=0.001)
    cfg = PLDConfig.from_dict({"enabled": True, "theta": 1, "gamma": 0})
    assert cfg.theta == 1.0 and type(cfg.theta) is float
    assert cfg.gamma == 0.0 and type(cfg.gamma) is float


@pytest.mark.parametrize("theta", [0, 0.0, 1.5, -0.1, "0.5", True, float("nan"), float("inf"), None, [0.5]])
def test_bad_theta_is_named(theta):
    with pytest.raises(ConfigError, match=r"progressive_layer_drop\.theta") as info:
        PLDConfig.from_dict({"enabled": True, "theta": theta, "gamma": 0.001}, source="my.json")
    assert "my.json" in str(info.value)
    assert "gamma" not in str(info.value) and "enabled" not in str(info.value)


@pytest.mark.parametrize("gamma", [-1, -1e-9, "0.1", float("nan"), float("inf"), False])
def test_bad_gamma_is_named(gamma):
    with pytest.raises(ConfigError, match=r"progressive_layer_drop\.gamma"):
        PLDConfig.from_dict({"enabled": True, "theta": 0.5, "gamma": gamma})


@pytest.mark.parametrize("enabled", ["yes", 1, 0, None, "true"])
def test_bad_enabled_is_named(enabled):
    with pytest.raises(ConfigError, match=r"progressive_layer_drop\.enabled"):
        PLDConfig.from_dict({"enabled": enabled, "theta": 0.5, "gamma": 0.001})


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"progressive_layer_drop\.thetta: unknown key"):
        PLDConfig.from_dict({"enabled": True, "thetta": 0.5})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        PLDConfig.from_dict({"enabled": "yes", "theta": 2, "gamma": -1, "extra": 1})
    message = str(info.value)
    for key in ("enabled", "theta", "gamma", "extra"):
        assert f"progressive_layer_drop.{key}" in message
    assert "\n" not in message


@pytest.mark.parametrize("block", [[], "on", 0.5, True, None])
def test_block_that_is_not_an_object(block):
    with pytest.raises(ConfigError, match="progressive_layer_drop: expected an object"):
        PLDConfig.from_dict(block)


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# -- split_ds_config ------------------------------------------------------------------------------


def test_split_removes_the_block_and_keeps_the_rest(tmp_path):
    original = load_ds_config("tiny_cpu_pld.json")
    snapshot = json.loads(json.dumps(original))
    remainder, pld_cfg, source = split_ds_config(original)
    assert PLD_KEY not in remainder
    assert remainder == {k: v for k, v in snapshot.items() if k != PLD_KEY}
    assert original == snapshot  # the caller's dict is not modified
    assert pld_cfg == PLDConfig(enabled=True, theta=0.5, gamma=0.01)
    assert source == "DeepSpeed config"
    path = write_json(tmp_path / "ds.json", snapshot)
    from_file, pld_from_file, file_source = split_ds_config(path)
    assert from_file == remainder and pld_from_file == pld_cfg
    assert file_source == str(path)


def test_missing_block_is_disabled():
    config = load_ds_config("tiny_cpu_pld.json")
    del config[PLD_KEY]
    remainder, pld_cfg, _ = split_ds_config(config)
    assert pld_cfg == PLDConfig()
    assert not pld_cfg.enabled
    assert remainder == config


def test_split_names_the_file_in_block_errors(tmp_path):
    config = load_ds_config("tiny_cpu_pld.json")
    config[PLD_KEY]["theta"] = 0
    path = write_json(tmp_path / "bad_theta.json", config)
    with pytest.raises(ConfigError, match=r"bad_theta\.json: progressive_layer_drop\.theta"):
        split_ds_config(path)


# -- read_json ------------------------------------------------------------------------------------


def test_malformed_json_reports_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "a": 1,\n  "b": ,\n}\n')
    with pytest.raises(ConfigError) as info:
        read_json(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3 column 8" in message


def test_top_level_array_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json: expected a JSON object.*list"):
        read_json(path)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: no such DeepSpeed config"):
        split_ds_config(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match=r"latin1\.json: cannot read"):
        read_json(path)


# -- the shipped DeepSpeed configs ----------------------------------------------------------------


def test_there_are_shipped_configs():
    names = {p.name for p in ALL_DS_CONFIGS}
    assert {"bert_base_pld.json", "bert_base_baseline.json", "tiny_cpu_pld.json", "tiny_cpu_baseline.json"} <= names


@pytest.mark.parametrize("path", ALL_DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    remainder, pld_cfg, source = split_ds_config(path, pipeline_engine=True)  # pipeline configs too
    assert source == str(path)
    assert PLD_KEY in json.loads(path.read_text())
    assert 0.0 < pld_cfg.theta <= 1.0 and pld_cfg.gamma >= 0.0
    assert pld_cfg.enabled == ("baseline" not in path.name)
    # DeepSpeed's own parser needs no process group (world size 1 without one) and does not start one.
    initialized = torch.distributed.is_initialized()
    ds = DeepSpeedConfig(remainder)
    assert torch.distributed.is_initialized() == initialized
    assert ds.train_micro_batch_size_per_gpu == remainder["train_micro_batch_size_per_gpu"]
    assert ds.gradient_clipping == remainder["gradient_clipping"]


def test_deepspeed_rejects_what_the_pld_block_used_to_be():
    """The reason the block is split off: DeepSpeed's parser refuses inconsistent batch settings, and the
    remainder is what it sees; a bad batch size in the remainder is caught by DeepSpeed itself."""
    from deepspeed.runtime.config import DeepSpeedConfig

    remainder, _, _ = split_ds_config(load_ds_config("tiny_cpu_pld.json"))
    remainder["train_batch_size"] = 7
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(remainder)


@pytest.mark.parametrize("name", ["bert_base_pld.json", "bert_large_pld.json"])
def test_paper_recipe(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    remainder, pld_cfg, _ = split_ds_config(DS_CONFIGS / name)
    assert pld_cfg == PLDConfig(enabled=True, theta=0.5, gamma=0.001)
    assert remainder["optimizer"]["params"]["lr"] == pytest.approx(1e-3)
    sched = remainder["scheduler"]["params"]
    assert sched["warmup_max_lr"] == pytest.approx(1e-3)
    assert sched["warmup_num_steps"] / sched["total_num_steps"] == pytest.approx(0.02)
    assert remainder["gradient_clipping"] == 1.0
    ds = DeepSpeedConfig(remainder)
    assert ds.gradient_clipping == 1.0
    bf16 = (ds.torch_autocast_enabled and "bfloat16" in str(ds.torch_autocast_dtype)) or ds.bfloat16_config.enabled
    assert bf16
    assert not remainder.get("fp16", {}).get("enabled", False)


@pytest.mark.parametrize("pld_name, baseline_name", [("bert_base_pld.json", "bert_base_baseline.json"),
                                                     ("tiny_cpu_pld.json", "tiny_cpu_baseline.json")])
def test_baseline_twin_differs_only_in_enabled(pld_name, baseline_name):
    with_pld = load_ds_config(pld_name)
    baseline = load_ds_config(baseline_name)
    assert with_pld[PLD_KEY]["enabled"] is True
    assert baseline[PLD_KEY]["enabled"] is False
    baseline[PLD_KEY]["enabled"] = True
    assert baseline == with_pld


# -- model_config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets(name):
    cfg = model_config(name)
    assert {k: getattr(cfg, k) for k in MODEL_PRESETS[name]} == MODEL_PRESETS[name]


def test_preset_overrides_and_none_overrides():
    cfg = model_config("tiny", vocab_size=128, hidden_dropout=0.0, activation_checkpointing=None)
    assert cfg.vocab_size == 128 and cfg.hidden_dropout == 0.0
    assert cfg.activation_checkpointing is False  # None means "not given"


def test_model_json_file(tmp_path):
    fields = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "vocab_size": 99}
    cfg = model_config(str(write_json(tmp_path / "model.json", fields)))
    assert cfg == BertConfig(**fields)


def test_unknown_preset():
    presets = "tiny, micro, narrow12, deep12, mini, small, base, large"
    with pytest.raises(ConfigError, match=rf"--model: expected one of {presets}.*'huge'"):
        model_config("huge")


def test_unknown_key_in_model_json(tmp_path):
    path = write_json(tmp_path / "model.json", {"hidden_size": 32, "num_layer": 2})
    with pytest.raises(ConfigError, match=r"model\.json: unknown key num_layer"):
        model_config(str(path))


@pytest.mark.parametrize("fields, fragment", [
    ({"hidden_size": 30, "num_heads": 4}, "not divisible"),
    ({"num_layers": 0}, "num_layers"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
])
def test_bad_value_in_model_json(tmp_path, fields, fragment):
    path = write_json(tmp_path / "model.json", fields)
    with pytest.raises(ConfigError, match=fragment) as info:
        model_config(str(path))
    assert "model.json" in str(info.value)


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError, match="model preset tiny"):
        model_config("tiny", num_heads=3)


def test_missing_and_malformed_model_files(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.json: no such model file"):
        model_config(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        model_config(str(bad))


@pytest.mark.parametrize("vocab, padded", [(1, 64), (64, 64), (65, 128), (100, 128), (30522, 30528)])
def test_padded_vocab_size(vocab, padded):
    assert padded_vocab_size(vocab) == padded
