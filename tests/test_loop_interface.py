"""What pld-pretrain's loop stands on: the config read once (RunConfig), the engine interface both engines
implement (pld_ds.engine_api.TrainingEngine), and EarlyBERT's search as a component of the loop."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pld_helpers import DS_CONFIGS, REPO, child_env, load_ds_config, tiny_config, write_json

from pld_ds import config as config_module
from pld_ds import earlybert
from pld_ds.config import ConfigError, PipelineConfig, PLDConfig, RunConfig, pipeline_config, split_ds_config
from pld_ds.earlybert import EarlyBertConfig, SearchThenSlim, TicketSearch
from pld_ds.engine_api import TrainingEngine
from pld_ds.model import BertForPreTraining

# -- the config, read once ------------------------------------------------------------------------------


def test_run_config_reads_the_file_once_and_every_reader_takes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    raw = {**load_ds_config(), "pipeline": {"stages": 2, "schedule": "ouroboros"},
           "earlybert": {"enabled": True, "window": 3}}
    path = write_json(tmp_path / "ds.json", raw)
    reads: list[Path] = []
    real_read = config_module.read_json
    monkeypatch.setattr(config_module, "read_json", lambda p, *a: reads.append(Path(p)) or real_read(p, *a))
    run = RunConfig.read(path)
    assert reads == [path]
    assert run.source == str(path)
    assert run.pld == PLDConfig.from_dict(raw["progressive_layer_drop"])
    assert run.pipeline == PipelineConfig(stages=2, schedule="ouroboros", staleness=1)
    assert run.earlybert == EarlyBertConfig(enabled=True, window=3)
    assert not {"progressive_layer_drop", "pipeline", "earlybert"} & set(run.ds_config)
    ds_config, pld_config, source = split_ds_config(run, pipeline_engine=True)
    assert (ds_config, pld_config, source) == split_ds_config(raw, pipeline_engine=True)[:2] + (str(path),)
    ds_config["train_micro_batch_size_per_gpu"] = 999  # a copy: the typed object stays as read
    assert run.ds_config["train_micro_batch_size_per_gpu"] != 999
    assert pipeline_config(run) == (run.pipeline, str(path))
    assert EarlyBertConfig.from_ds_config(run) is run.earlybert
    assert RunConfig.read(run) is run
    assert reads == [path]  # nobody read the file again
    with pytest.raises(ConfigError, match=rf"^{path}: pipeline\.stages: 2 stages need the pipeline engine"):
        split_ds_config(run)  # a data-parallel-only reader still refuses a pipeline


def test_run_config_names_the_bad_key_of_each_block(tmp_path: Path) -> None:
    cases = {"earlybert": ({"earlybert": {"window": 1}}, r"earlybert\.window: expected an integer >= 2"),
             "pipeline": ({"pipeline": {"schedule": "gpipe"}}, r"pipeline\.schedule: expected one of"),
             "pld": ({"progressive_layer_drop": {"theta": 2}}, r"progressive_layer_drop\.theta: expected")}
    for name, (block, message) in cases.items():
        path = write_json(tmp_path / f"{name}.json", {**load_ds_config(), **block})
        with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
            RunConfig.read(path)


# -- the engine interface ----------------------------------------------------------------------------


def interface_members() -> tuple[list[str], list[str]]:
    """(data attributes, methods and properties) that TrainingEngine declares."""
    declared = vars(TrainingEngine)
    data = list(declared["__annotations__"])
    methods = [name for name, value in declared.items()
               if (callable(value) or isinstance(value, property)) and (not name.startswith("_") or name == "__call__")]
    return data, methods


def test_both_engines_define_every_method_and_property_of_the_interface() -> None:
    from pld_ds.engine import PLDEngine
    from pld_ds.pipeline import PipelineEngine

    data, methods = interface_members()
    assert {"train_batch", "save_checkpoint", "load_checkpoint", "write_scalars", "global_steps", "data_parallel",
            "num_stages", "__call__"} <= set(methods) and "module" in data
    for engine_class in (PLDEngine, PipelineEngine):
        missing = [name for name in methods if not hasattr(engine_class, name)]
        assert not missing, (engine_class.__name__, missing)


def test_a_data_parallel_engine_is_a_training_engine_of_one_stage(tmp_path: Path) -> None:
    """In a child process: an earlier in-process run may have torn down the process group DeepSpeed cached."""
    code = f"""
import json, torch
from pld_ds.config import RunConfig, model_config
from pld_ds.engine import PLDEngine
from pld_ds.engine_api import TrainingEngine
from pld_ds.model import BertForPreTraining
config = RunConfig.read({str(DS_CONFIGS / "tiny_cpu_pld.json")!r})
engine = PLDEngine(BertForPreTraining(model_config("tiny", vocab_size=100)), config, output_dir={str(tmp_path)!r})
print("RESULT", json.dumps([isinstance(engine, TrainingEngine), engine.data_parallel, engine.num_stages,
                            isinstance(object(), TrainingEngine)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # every data attribute too, on the instance; and the check can fail
    assert result == [True, [0, 1], 1, False]


# -- EarlyBERT's search as a component -------------------------------------------------------------------


class SearchEngine:
    """The parts of an engine the search component uses: the model, the monitors, the release."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module, self.written, self.destroyed = model, [], False

    def write_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        self.written.append((step, sorted(scalars)))

    def destroy(self) -> None:
        self.destroyed = True


def test_search_then_slim_checks_at_its_cadence_then_draws_records_and_hands_over(tmp_path: Path) -> None:
    cfg = EarlyBertConfig(enabled=True, check_interval=2, max_search_steps=4, neuron_prune_ratio=0.5)
    model_cfg, offset, searching = earlybert.start_phase(cfg, tiny_config(), tmp_path, resuming=False)
    assert (offset, searching, model_cfg.slimming) == (0, True, True)
    model = BertForPreTraining(model_cfg)
    engine, built, lines = SearchEngine(model), [], []
    resolved: dict[str, Any] = {"model": {"full": True}}
    ticket = SearchThenSlim(TicketSearch(model, cfg), output=tmp_path, resolved=resolved, seq_len=16,
                            build_engine=lambda slim: built.append(slim) or "slim engine", log=lines.append)
    assert [ticket.after_step(step, engine) for step in (1, 2, 3)] == [None, None, None]
    assert ticket.searching and [step for step, _ in engine.written] == [2]  # one mask check, at step 2
    assert lines[0].startswith("earlybert: step 2  mask distance")
    assert ticket.after_step(4, engine) == ("slim engine", 4)  # max_search_steps: drawn, the loop swaps
    assert not ticket.searching and engine.destroyed and ticket.after_step(5, engine) is None
    slim_cfg = built[0].config
    assert sum(slim_cfg.layer_intermediate) < 4 * 128 and sum(slim_cfg.layer_heads) < 4 * 2  # pruned
    assert json.loads((tmp_path / earlybert.TICKET_FILE).read_text())["layer_intermediate"] == \
        list(slim_cfg.layer_intermediate)
    assert json.loads((tmp_path / earlybert.RECORD_FILE).read_text())["search_steps"] == 4
    written = json.loads((tmp_path / earlybert.RUN_CONFIG_FILE).read_text())
    assert resolved["model"] == dataclasses.asdict(slim_cfg) and written["model"]["layer_intermediate"] == \
        list(slim_cfg.layer_intermediate)
    assert any(line.startswith("earlybert: ticket did not emerge by step 4") for line in lines)
    # A resumed run continues the slim model from the step the search ended; a fresh one searches again.
    resumed_cfg, offset, searching = earlybert.start_phase(cfg, tiny_config(), tmp_path, resuming=True)
    assert (resumed_cfg, offset, searching) == (slim_cfg, 4, False)
    assert earlybert.start_phase(cfg, tiny_config(), tmp_path, resuming=False)[1:] == (0, True)
    assert earlybert.start_phase(EarlyBertConfig(), tiny_config(), tmp_path, resuming=True) == (tiny_config(), 0,
                                                                                                False)
