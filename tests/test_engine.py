"""PLDEngine: DeepSpeed plus PLD keyword injection, schedule, monitoring and checkpoints (pld_ds/engine.py)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from pld_helpers import load_ds_config, read_csv_scalar, synthetic_batch, tiny_config, torch_threads, write_json

from pld_ds import pld
from pld_ds.config import ConfigError
from pld_ds.engine import PLDEngine
from pld_ds.model import BertForPreTraining
from pld_ds.pretrain import rng_state, set_rng_state

PLD_KWARGS = ("progressive_layer_drop", "pld_theta", "pld_generator")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield



class RecordingBert(BertForPreTraining):
    """Records the PLD keyword arguments of every forward call; accepts pld_generator."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls: list[dict] = []
        self.layers_run: list[int] = []

    def forward(self, *args, progressive_layer_drop=False, pld_theta=1.0, pld_generator=None, **kwargs):
        given = {"progressive_layer_drop": progressive_layer_drop, "pld_theta": pld_theta,
                 "pld_generator": pld_generator}
        self.calls.append({"training": self.training, "names": set(kwargs), **given,
                           "seed": None if pld_generator is None else pld_generator.initial_seed()})
        out = super().forward(*args, progressive_layer_drop=progressive_layer_drop, pld_theta=pld_theta,
                              pld_generator=pld_generator, **kwargs)
        self.layers_run.append(out.layers_run)
        return out


class TwoKwargBert(BertForPreTraining):
    """A model written for DeepSpeed's old PLD contract: only progressive_layer_drop and pld_theta."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls: list[dict] = []

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_lm_labels=None,
                next_sentence_labels=None, progressive_layer_drop=False, pld_theta=1.0):
        # no **kwargs: an injected pld_generator would be a TypeError here
        self.calls.append({"training": self.training, "progressive_layer_drop": progressive_layer_drop,
                           "pld_theta": pld_theta})
        return super().forward(input_ids, token_type_ids, attention_mask, masked_lm_labels, next_sentence_labels,
                               progressive_layer_drop=progressive_layer_drop, pld_theta=pld_theta)


def ds_config(micro=4, gas=1, pld_block=None, **extra):
    config = load_ds_config("tiny_cpu_pld.json")
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = gas
    if pld_block is not None:
        config["progressive_layer_drop"] = pld_block
    config.update(extra)
    return config


def make_engine(tmp_path, model_cls=RecordingBert, dropout=0.0, seed=0, engine_seed=11, config=None, name="run"):
    torch.manual_seed(seed)
    model = model_cls(tiny_config(dropout=dropout))
    return PLDEngine(model, config or ds_config(), seed=engine_seed, output_dir=tmp_path / name)


def on_device(engine, batch):
    return {k: v.to(engine.device) for k, v in batch.items()}


def batches(n, micro=4, start=0):
    return [synthetic_batch(batch=micro, seq_len=16, seed=start + i) for i in range(n)]


# -- (a) what reaches forward ---------------------------------------------------------------------


def test_kwargs_reach_forward_in_train_mode_only(tmp_path):
    engine = make_engine(tmp_path)
    model = engine.module
    data = batches(3)
    engine.train_batch(iter(data[:1]))
    call = model.calls[-1]
    assert call["training"]
    assert call["progressive_layer_drop"] is True
    assert call["pld_theta"] == pld.theta(0, 0.5, 0.01) == 1.0
    assert isinstance(call["pld_generator"], torch.Generator)
    assert call["seed"] == pld.gate_seed(11, 0, 0)
    assert call["names"] == {"input_ids", "token_type_ids", "attention_mask", "masked_lm_labels",
                             "next_sentence_labels"}
    engine.train_batch(iter(data[1:2]))
    assert model.calls[-1]["pld_theta"] == pld.theta(1, 0.5, 0.01) < 1.0
    assert model.calls[-1]["seed"] == pld.gate_seed(11, 1, 0)

    engine.eval()
    with torch.no_grad():
        out = engine(**on_device(engine, data[2]))
    call = model.calls[-1]
    assert not call["training"]
    assert call["progressive_layer_drop"] is False and call["pld_theta"] == 1.0 and call["pld_generator"] is None
    assert out.layers_run == 4
    engine.train()
    engine(**on_device(engine, data[2]))
    assert model.calls[-1]["progressive_layer_drop"] is True


def test_model_without_pld_generator_gets_exactly_two_kwargs(tmp_path):
    engine = make_engine(tmp_path, model_cls=TwoKwargBert)
    engine.train_batch(iter(batches(2)))
    call = engine.module.calls[-1]
    assert call["training"]
    assert call["progressive_layer_drop"] is True
    assert call["pld_theta"] == 1.0
    engine.train_batch(iter(batches(1, start=5)))
    assert engine.module.calls[-1]["pld_theta"] == pld.theta(1, 0.5, 0.01)
    engine.eval()
    with torch.no_grad():
        engine(**on_device(engine, batches(1)[0]))
    assert engine.module.calls[-1]["progressive_layer_drop"] is False


def test_gates_in_training_are_the_pure_functions_gates(tmp_path):
    """The layers that run in an engine step are sample_gates(L, theta(step), gate_generator(seed, step, micro))."""
    config = ds_config(pld_block={"enabled": True, "theta": 0.3, "gamma": 5.0})
    engine = make_engine(tmp_path, config=config)
    model = engine.module
    for step in range(8):
        engine.train_batch(iter(batches(1, start=step)))
        theta_now = pld.theta(step, 0.3, 5.0)
        gates = pld.sample_gates(4, theta_now, pld.gate_generator(11, step, 0))
        assert model.layers_run[-1] == sum(k for k, _ in gates), step
    assert min(model.layers_run) < 4  # some layer was dropped


# -- (b) monitoring -------------------------------------------------------------------------------


def test_theta_is_logged_to_the_csv_monitor(tmp_path):
    engine = make_engine(tmp_path)
    data = iter(batches(6))
    for _ in range(6):
        losses = engine.train_batch(data)
        assert set(losses) == {"loss", "mlm_loss", "nsp_loss"}
        assert math.isfinite(losses["loss"].item())
        engine.write_scalars({**engine.pld_scalars(), "train/loss": losses["loss"].item()})
    csv_dir = tmp_path / "run" / "csv" / "run"
    theta_rows = read_csv_scalar(csv_dir / "train_pld_theta.csv")
    assert [s for s, _ in theta_rows] == [1, 2, 3, 4, 5, 6]
    for step, value in theta_rows:  # the row of step s: what step s ran with, theta(s - 1)
        assert value == pytest.approx(pld.theta(step - 1, 0.5, 0.01), rel=1e-12)
    values = [v for _, v in theta_rows]
    assert all(a > b for a, b in pairwise(values))
    depth_rows = read_csv_scalar(csv_dir / "train_expected_depth.csv")
    assert [s for s, _ in depth_rows] == [1, 2, 3, 4, 5, 6]
    for step, value in depth_rows:
        assert value == pytest.approx(pld.expected_depth(4, pld.theta(step - 1, 0.5, 0.01)), rel=1e-12)
    assert len(read_csv_scalar(csv_dir / "train_loss.csv")) == 6
    # TensorBoard is enabled in the same config and writes under the output folder too
    assert list((tmp_path / "run" / "tensorboard" / "run").glob("events.out.tfevents.*"))


def test_pld_scalars_are_what_the_step_ran_with(tmp_path):
    """theta moves at the end of a step: the scalars of step s are theta(s - 1), what its forwards used, while
    get_pld_theta() is already the next step's theta(s)."""
    engine = make_engine(tmp_path, config=ds_config(gas=2))
    def theta_and_depth() -> dict:  # pld_scalars also holds per-layer keep rates
        return {k: v for k, v in engine.pld_scalars().items() if k in ("train/pld_theta", "train/expected_depth")}

    assert theta_and_depth() == {"train/pld_theta": 1.0, "train/expected_depth": 4.0}
    for step in range(1, 4):
        engine.train_batch(iter(batches(2, start=2 * step)))
        used = pld.theta(step - 1, 0.5, 0.01)
        assert engine.module.calls[-1]["pld_theta"] == engine.module.calls[-2]["pld_theta"] == used
        assert theta_and_depth() == {"train/pld_theta": used, "train/expected_depth": pld.expected_depth(4, used)}
        assert engine.get_pld_theta() == pld.theta(step, 0.5, 0.01) < used
    assert engine.expected_depth() == pytest.approx(4 - (1 - pld.theta(3, 0.5, 0.01)) * 5 / 2)
    # an evaluation in between runs every layer at theta 1 and changes nothing of this
    engine.eval()
    with torch.no_grad():
        engine(**on_device(engine, batches(1)[0]))
    assert engine.pld_scalars()["train/pld_theta"] == pld.theta(2, 0.5, 0.01)


# -- (c) schedule and gradient accumulation -------------------------------------------------------


def test_theta_follows_global_steps_and_moves_only_at_accumulation_boundaries(tmp_path):
    engine = make_engine(tmp_path, config=ds_config(micro=4, gas=2))
    assert engine.gradient_accumulation_steps == 2 and engine.micro_batch_size == 4
    model = engine.module
    data = batches(8)
    thetas, steps = [], []
    for i, batch in enumerate(data):
        thetas.append(engine.get_pld_theta())
        steps.append(engine.global_steps)
        out = engine(**on_device(engine, batch))
        engine.backward(out.loss)
        engine.step()
        call = model.calls[-1]
        assert call["pld_theta"] == thetas[-1] == pld.theta(i // 2, 0.5, 0.01), i
        assert call["seed"] == pld.gate_seed(11, i // 2, i % 2), i
        assert engine.global_steps == (i + 1) // 2
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert thetas[0] == thetas[1] > thetas[2] == thetas[3] > thetas[4] == thetas[5] > thetas[6] == thetas[7]
    # micro-batches inside one window draw different gates
    assert len({c["seed"] for c in model.calls}) == 8


def test_train_batch_consumes_one_window(tmp_path):
    engine = make_engine(tmp_path, config=ds_config(micro=4, gas=2))
    data = iter(batches(6))
    engine.train_batch(data)
    assert engine.global_steps == 1
    engine.train_batch(data)
    assert engine.global_steps == 2
    assert len(list(data)) == 2
    seeds = [c["seed"] for c in engine.module.calls]
    assert seeds == [pld.gate_seed(11, s, m) for s in (0, 1) for m in (0, 1)]


def test_engine_seed_changes_the_gates(tmp_path):
    a = make_engine(tmp_path, engine_seed=1, name="a")
    b = make_engine(tmp_path, engine_seed=2, name="b")
    a.train_batch(iter(batches(1)))
    b.train_batch(iter(batches(1)))
    assert a.module.calls[-1]["seed"] != b.module.calls[-1]["seed"]


# -- (d) checkpoints ------------------------------------------------------------------------------


def test_checkpoint_resume_is_exact(tmp_path):
    pld_block = {"enabled": True, "theta": 0.3, "gamma": 0.5}  # low theta: gates matter
    config = ds_config(pld_block=pld_block)
    data = batches(5)
    first = make_engine(tmp_path, dropout=0.1, config=config, name="first")
    for batch in data[:3]:
        first.train_batch(iter([batch]))
    tag = first.save_checkpoint(tmp_path / "ckpt", {"rng": rng_state(), "note": "hello"})
    assert tag == "global_step3"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == tag
    theta_at_save = first.get_pld_theta()
    expected_loss = first.train_batch(iter([data[3]]))["loss"]
    expected_params = [p.detach().clone() for p in first.module.parameters()]

    second = make_engine(tmp_path, dropout=0.1, config=config, name="second")
    torch.manual_seed(1234)  # the RNG must come from the checkpoint, not from here
    client = second.load_checkpoint(tmp_path / "ckpt")
    assert client["note"] == "hello"
    assert client["pld"] == {"enabled": True, "theta_bar": 0.3, "gamma": 0.5, "step": 3, "step_offset": 0,
                             "theta": pld.theta(3, 0.3, 0.5)}
    assert client["seed"] == 11
    set_rng_state(client["rng"])
    assert second.global_steps == 3
    assert second.get_pld_theta() == theta_at_save == pld.theta(3, 0.3, 0.5)
    loss = second.train_batch(iter([data[3]]))["loss"]
    assert torch.equal(loss, expected_loss)
    for p, q in zip(second.module.parameters(), expected_params, strict=True):
        assert torch.equal(p.detach(), q)

    # control: the same resume without restoring the RNG gives different dropout, a different loss
    third = make_engine(tmp_path, dropout=0.1, config=config, name="third")
    torch.manual_seed(1234)
    third.load_checkpoint(tmp_path / "ckpt")
    assert not torch.equal(third.train_batch(iter([data[3]]))["loss"], expected_loss)


def test_load_checkpoint_from_empty_folder_returns_none(tmp_path):
    engine = make_engine(tmp_path)
    (tmp_path / "empty").mkdir()
    assert engine.load_checkpoint(tmp_path / "empty") is None
    assert engine.global_steps == 0


# -- (e) disabled PLD -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [{"enabled": False, "theta": 0.5, "gamma": 0.01}, None])
def test_disabled_pld(tmp_path, block):
    config = ds_config()
    if block is None:
        del config["progressive_layer_drop"]
    else:
        config["progressive_layer_drop"] = block
    engine = make_engine(tmp_path, config=config)
    assert not engine.pld.enabled
    for batch in batches(3):
        engine.train_batch(iter([batch]))
        assert engine.get_pld_theta() == 1.0
    assert engine.global_steps == 3
    for call in engine.module.calls:
        assert call["training"]
        assert call["progressive_layer_drop"] is False and call["pld_theta"] == 1.0 and call["pld_generator"] is None
    assert engine.module.layers_run == [4, 4, 4]
    assert engine.pld_scalars()["train/pld_theta"] == 1.0
    assert engine.expected_depth() == 4.0


# -- (f) DeepSpeed config errors ------------------------------------------------------------------


def test_deepspeed_config_error_names_the_file(tmp_path):
    config = ds_config(micro=4, train_batch_size=7)
    path = write_json(tmp_path / "bad_batch.json", config)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="DeepSpeed rejected the config") as info:
        PLDEngine(BertForPreTraining(tiny_config()), path, output_dir=tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "train_batch_size" in message and "\n" not in message


def test_deepspeed_config_error_from_a_dict(tmp_path):
    config = ds_config(micro=4)
    config["zero_optimization"] = {"stage": 7}
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as info:
        PLDEngine(BertForPreTraining(tiny_config()), config, output_dir=tmp_path / "out")
    assert str(info.value).startswith("DeepSpeed config: DeepSpeed rejected the config")
    assert "stage" in str(info.value)


def test_bad_optimizer_params_are_a_config_error(tmp_path):
    """A negative learning rate in the DeepSpeed JSON is a user error like any other bad value in it:
    it must come back as a ConfigError naming the file (one line in pld-pretrain), not a torch traceback."""
    config = ds_config(micro=4)
    config["optimizer"]["params"]["lr"] = -0.001
    path = write_json(tmp_path / "negative_lr.json", config)
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as info:
        PLDEngine(BertForPreTraining(tiny_config()), path, output_dir=tmp_path / "out")
    assert str(info.value).startswith(f"{path}: ")


def test_pld_block_error_before_deepspeed(tmp_path):
    config = ds_config(pld_block={"enabled": True, "theta": 0.0})
    with pytest.raises(ConfigError, match=r"progressive_layer_drop\.theta"):
        PLDEngine(BertForPreTraining(tiny_config()), config, output_dir=tmp_path / "out")


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    """A plain torch optimizer: DeepSpeed clips without keeping the norm, so the engine measures it."""
    config = ds_config(pld_block={"enabled": False}, gradient_clipping=1e-3)
    engine = make_engine(tmp_path, model_cls=BertForPreTraining, config=config)
    replica = BertForPreTraining(tiny_config())
    replica.load_state_dict(engine.module.state_dict())
    batch = synthetic_batch(batch=4, seed=3)
    replica(**batch).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in replica.parameters() if p.grad is not None])
    engine.train_batch(iter([batch]))
    scalars = engine.optimizer_scalars()
    assert scalars["train/grad_norm"] == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 1e-3 and "train/loss_scale" not in scalars  # clipped hard, fp32: no loss scale


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_engine_step_equals_a_plain_torch_loop(tmp_path, precision):
    """The engine clips with torch's foreach kernels and skips DeepSpeed's one-rank all-reduce; the weights
    must still be those of a plain loop: the same gates, loss / gradient_accumulation_steps, zero gradients
    for dropped layers (what DeepSpeed's all-reduce gives them), clip at the boundary, AdamW."""
    config = ds_config(gas=2, pld_block={"enabled": True, "theta": 0.3, "gamma": 0.5}, gradient_clipping=0.05)
    config.pop("scheduler")
    if precision == "amp-bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine = make_engine(tmp_path, model_cls=BertForPreTraining, config=config)
    assert engine.engine.gradient_clipping() == 0.0  # the engine clips, not DeepSpeed
    replica = BertForPreTraining(tiny_config(dropout=0.0))
    replica.load_state_dict(engine.module.state_dict())
    params = config["optimizer"]["params"]
    opt = torch.optim.AdamW(replica.parameters(), lr=params["lr"], betas=params["betas"], eps=params["eps"],
                            weight_decay=params["weight_decay"], foreach=True)
    data = batches(8)
    dropped = 0
    for step in range(4):
        for micro in range(2):
            gen = pld.gate_generator(11, step, micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp-bf16"):
                out = replica(**data[2 * step + micro], progressive_layer_drop=True,
                              pld_theta=pld.theta(step, 0.3, 0.5), pld_generator=gen)
            (out.loss / 2).backward()
        for p in replica.parameters():
            dropped += p.grad is None
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        norm = torch.nn.utils.clip_grad_norm_(replica.parameters(), 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.train_batch(iter(data[2 * step: 2 * step + 2]))
        assert float(engine.optimizer_scalars()["train/grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
        assert float(norm) > 0.05  # clipping was active
    assert dropped  # some layer was dropped for a whole step
    for (name, mine), theirs in zip(engine.module.state_dict().items(), replica.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra, match", [
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
     r"zero_optimization\.offload_optimizer\.device: nvme"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": True}, "gradient_accumulation_steps": 2},
     r"zero_optimization\.overlap_comm: true with ZeRO stage 1"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 150_000},
      "gradient_accumulation_steps": 2}, r"zero_optimization\.reduce_bucket_size: 150,000 is below the model's "),
], ids=["unmanaged-accumulation", "nvme-offload", "zero1-overlap-comm", "offload-buckets"])
def test_configs_that_would_train_wrong_are_refused_before_deepspeed_starts(tmp_path, monkeypatch, extra, match):
    """managed_gradient_accumulation false made every micro-batch an optimizer step of its own, with clipping and
    grad_norm gone; NVMe optimizer offload keeps gradients the engine cannot clear for dropped layers; ZeRO-1 with
    overlap_comm and accumulation never reduces the gradient of a layer its last micro-batch dropped; ZeRO-2/3
    offload with accumulation and more than one reduce bucket accumulates wrong gradients, PLD or not."""
    import deepspeed

    def no_start(*args, **kwargs):
        raise AssertionError("deepspeed.initialize was called")

    monkeypatch.setattr(deepspeed, "initialize", no_start)
    path = write_json(tmp_path / "bad.json", ds_config(pld_block={"enabled": True, "theta": 0.5, "gamma": 0.01},
                                                       **extra))
    with pytest.raises(ConfigError, match=match) as info:
        PLDEngine(BertForPreTraining(tiny_config()), path, output_dir=tmp_path / "out")
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_zero1_overlap_comm_with_derived_accumulation_is_refused_after_start(tmp_path):
    """The accumulation DeepSpeed derives from train_batch_size is known only once it started."""
    config = ds_config(pld_block={"enabled": True, "theta": 0.5, "gamma": 0.01},
                       zero_optimization={"stage": 1, "overlap_comm": True}, train_batch_size=8)
    del config["gradient_accumulation_steps"]
    with pytest.raises(ConfigError, match=r"overlap_comm: true with ZeRO stage 1"):
        PLDEngine(BertForPreTraining(tiny_config()), config, output_dir=tmp_path / "out")
    config["progressive_layer_drop"]["enabled"] = False  # without PLD every layer runs in every micro-batch
    PLDEngine(BertForPreTraining(tiny_config()), config, output_dir=tmp_path / "out2")


def test_plain_optimizer_is_clipped_at_every_step_it_takes(tmp_path):
    """Clipping hangs on the optimizer's own pre-step hook: however DeepSpeed decides that a step happens (here a
    boundary forced after the first micro-batch of a window of 4), that step is clipped and its norm logged."""
    config = ds_config(gas=4, pld_block={"enabled": False}, gradient_clipping=1e-3)
    for key in ("scheduler", "optimizer"):
        config.pop(key)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    replica = BertForPreTraining(tiny_config())
    replica.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PLDEngine(model, config, output_dir=tmp_path / "run", optimizer=sgd)
    batch = batches(1)[0]
    out = engine(**on_device(engine, batch))
    engine.backward(out.loss)
    engine.engine.set_gradient_accumulation_boundary(True)
    engine.step()
    assert engine.global_steps == 1
    (replica(**batch).loss / 4).backward()
    expected = torch.nn.utils.clip_grad_norm_(replica.parameters(), 1e-3)
    assert float(expected) > 1e-3  # clipping was active
    torch.optim.SGD(replica.parameters(), lr=1.0).step()
    assert engine.optimizer_scalars()["train/grad_norm"] == pytest.approx(float(expected), rel=1e-5)
    for (name, mine), theirs in zip(engine.module.state_dict().items(), replica.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)
