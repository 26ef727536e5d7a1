"""On a CUDA device only (skipped elsewhere): the fast paths that CPU runs cannot reach.

    python -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import math

import pytest
import torch
from pld_helpers import load_ds_config, synthetic_batch, tiny_config

from pld_ds import pld
from pld_ds.model import BertForPreTraining

pytestmark = pytest.mark.gpu


def cuda_batch(**kwargs) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in synthetic_batch(**kwargs).items()}


def gpu_config(**changes) -> dict:
    config = load_ds_config("tiny_cpu_pld.json")
    for monitor in ("tensorboard", "csv_monitor"):
        config.pop(monitor)
    config["optimizer"]["params"].pop("foreach")
    config["optimizer"]["params"]["fused"] = True
    config["progressive_layer_drop"] = {"enabled": True, "theta": 0.5, "gamma": 1.0}
    config.update(changes)
    return config


@pytest.mark.parametrize("precision", ["amp-bf16", "bf16", "fp16"])
def test_engine_trains_on_cuda(precision):
    from pld_ds.engine import PLDEngine

    blocks = {"amp-bf16": {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
              "bf16": {"bf16": {"enabled": True}},
              "fp16": {"fp16": {"enabled": True, "initial_scale_power": 12}}}
    torch.manual_seed(0)
    engine = PLDEngine(BertForPreTraining(tiny_config(dropout=0.1)), gpu_config(**blocks[precision]), seed=3)
    assert engine.device.type == "cuda"
    losses = [engine.train_batch(iter([cuda_batch(batch=4, seed=step)]))["loss"].item() for step in range(6)]
    assert all(math.isfinite(loss) for loss in losses)
    scalars = engine.optimizer_scalars()
    if precision == "fp16":
        assert scalars["train/loss_scale"] > 0
    if precision == "amp-bf16":
        assert engine.engine.gradient_clipping() == 0.0 and math.isfinite(scalars["train/grad_norm"])
    engine.engine.destroy()


def test_compiled_layers_match_eager_layers_on_cuda():
    """Inductor-compiled layers under bf16 autocast: the eager model's loss under the same gates, and one
    graph for PLD training at every theta."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(1)
    eager = BertForPreTraining(tiny_config()).cuda()
    compiled = BertForPreTraining(tiny_config()).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_layers()
    batch = cuda_batch(batch=8, seq_len=32)
    for step, theta_now in enumerate([1.0, 0.7, 0.5]):
        losses = []
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now,
                            pld_generator=pld.gate_generator(0, step, 0))
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert counters["stats"]["unique_graphs"] == 1


def test_attention_runs_on_a_fused_kernel():
    """bf16 with a padding mask must find a fused SDPA kernel (efficient, cuDNN or flash), not only math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = BertForPreTraining(tiny_config()).cuda()
    batch = cuda_batch(batch=8, seq_len=64)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    assert math.isfinite(loss.item())


def test_bench_reports_mfu_and_memory_on_cuda():
    from pld_ds import bench

    rows = bench.run(bench.parse_args(["--model", "tiny", "--seq-len", "64", "--micro-batch", "8", "--steps", "3",
                                       "--warmup", "2", "--repeats", "2", "--precision", "amp-bf16"]))
    assert [r.pld_theta for r in rows] == [None, 0.5]
    for row in rows:
        assert row.device != "cpu" and row.samples_per_sec > 0 and row.peak_mem_gb > 0
        assert row.mfu is None or 0 < row.mfu < 1


def test_unpadded_path_matches_padded_on_cuda_through_a_fused_kernel():
    """BertConfig.unpadded under bf16 autocast with only the fused SDPA kernels allowed (no math fallback):
    nested-tensor attention then runs on a varlen kernel, and loss and gradients match the padded path."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(2)
    padded = BertForPreTraining(tiny_config()).cuda()
    unpadded = BertForPreTraining(dataclasses.replace(tiny_config(), unpadded=True)).cuda()
    unpadded.load_state_dict(padded.state_dict())
    batch = cuda_batch(batch=8, seq_len=64, seed=5)
    assert (batch["attention_mask"].sum(1) < 64).any()
    results = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        for model in (padded, unpadded):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch)
            out.loss.backward()
            results.append((out.loss.float().item(), model.encoder.layers[0].attn.qkv.weight.grad.float()))
    (loss_p, grad_p), (loss_u, grad_u) = results
    assert loss_u == pytest.approx(loss_p, rel=2e-2)
    assert torch.allclose(grad_u, grad_p, rtol=5e-2, atol=5e-3 * grad_p.abs().max().item())


def test_reduce_overhead_layers_follow_eager_under_pld():
    """Per-layer CUDA graphs (compile_layers(mode="reduce-overhead")): a dropped layer's graph is simply not
    replayed; losses under the same gates match the eager model at every theta."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = BertForPreTraining(tiny_config()).cuda()
    graphed = BertForPreTraining(tiny_config()).cuda()
    graphed.load_state_dict(eager.state_dict())
    graphed.compile_layers(mode="reduce-overhead")
    batch = cuda_batch(batch=8, seq_len=32)
    for step, theta_now in enumerate([1.0, 1.0, 0.7, 0.5, 0.5, 0.3]):
        losses = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch, progressive_layer_drop=True, pld_theta=theta_now,
                            pld_generator=pld.gate_generator(0, step, 0))
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=2e-2), step


def test_length_buckets_bound_the_compiled_graphs_on_cuda():
    """Batches cut to three bucket lengths: inductor-compiled layers recompile at most once per bucket and
    never break the graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(4)
    model = BertForPreTraining(tiny_config()).cuda().compile_layers()
    for rounds in range(2):
        for width in (32, 48, 64):
            batch = cuda_batch(batch=8, seq_len=width, seed=width)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, progressive_layer_drop=True, pld_theta=0.6,
                             pld_generator=pld.gate_generator(0, rounds, width)).loss
            loss.backward()
        if rounds == 0:
            first = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == first <= 3
