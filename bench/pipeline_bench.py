"""Sync pipeline against Ouroboros on CPU ranks, and a cost model of both schedules against K.

    python bench/pipeline_bench.py run --model mini --stages 2 --steps 40 --data SHARDS --json out.json
    python bench/pipeline_bench.py layer-times --model base --micro-batch 32 --seq-len 128 --json layers.json
    python bench/pipeline_bench.py model --layers-json layers.json --bandwidth-gbs 25 --micro-batches 8

`run` trains the same model, seed and batches once per schedule with K processes (gloo) and reports the time
per optimizer step (after --skip warm-up steps), the CPU seconds per step of all ranks together, each stage's
idle fraction (time blocked waiting for a message, over the step time) and the loss trace: with a barrier
before every step, then --free-steps back to back, then --loop-steps back to back with pld-pretrain's
pre-emption check (checkpoint.Preemption.requested) after each, as its training loop makes it.
`layer-times` measures one layer's forward and backward and the heads' on this machine (any device torch
sees). `model` predicts throughput against K from such times.

The cost model, per pipeline replica, G micro-batches per optimizer step, stage k holding layers L_k:
  F_k, B_k   forward and backward time of stage k per micro-batch (sum of its layers' times, plus the
             embeddings on stage 0 and the heads on stage K-1); c = activation bytes / bandwidth + latency
  sync       T = (G + K - 1) * max_k (F_k + B_k + 2c): GPipe, a fill and a drain every step
  ouroboros  T = G * max_k (F_k + R_k + B_k, 2c): no flush, every stage busy; R_k = F_k, the recomputed
             forward of a stage with stale gradients (every stage but the last)
  ouroboros with a per-step barrier (any blocking collective every step lines the stages up; pld-pretrain's
             loop had one, its pre-emption check, until that check became lagged and asynchronous)
             T = (G + K - 1) * max_k (F_k + c) + G * max_k (R_k + B_k + c)
  throughput = G * micro-batch / T
It ignores the optimizer step and the data-parallel all-reduce (the same for both schedules), and assumes
transfers overlap compute in Ouroboros (it sends while it computes) but not in GPipe's fill and drain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# -- cost model -------------------------------------------------------------------------------------------

def stage_times(layer_fwd: float, layer_bwd: float, heads_fwd: float, heads_bwd: float, num_layers: int,
                stages: int) -> list[tuple[float, float]]:
    """(forward, backward) per micro-batch of each stage, layers cut as evenly as the heads allow."""
    from pld_ds.pipeline import partition_layers

    costs = [0.0] + [layer_fwd + layer_bwd] * num_layers + [heads_fwd + heads_bwd]
    bounds = partition_layers(costs, stages)
    times = []
    for k, layers in enumerate(bounds):
        fwd = len(layers) * layer_fwd + (heads_fwd if k == stages - 1 else 0.0)
        bwd = len(layers) * layer_bwd + (heads_bwd if k == stages - 1 else 0.0)
        times.append((fwd, bwd))
    return times


def predict(times: dict[str, float], num_layers: int, stages: int, micro_batches: int, micro_batch: int,
            activation_bytes: float, bandwidth: float, latency: float = 20e-6) -> dict[str, float]:
    """Samples per second of one pipeline replica under each schedule (seconds and bytes/s in)."""
    per_stage = stage_times(times["layer_fwd"], times["layer_bwd"], times["heads_fwd"], times["heads_bwd"],
                            num_layers, stages)
    comm = activation_bytes / bandwidth + latency if stages > 1 else 0.0
    sync = (micro_batches + stages - 1) * max(f + b + 2 * comm for f, b in per_stage)
    ouro = micro_batches * max(max(f + (f if k < stages - 1 else 0.0) + b, 2 * comm)
                               for k, (f, b) in enumerate(per_stage))
    # A blocking collective every step (a barrier): the forward then fills the pipeline every step, and only the
    # backward runs without a fill.
    barrier = ((micro_batches + stages - 1) * max(f + comm for f, _ in per_stage)
               + micro_batches * max((f if k < stages - 1 else 0.0) + b + comm for k, (f, b) in enumerate(per_stage)))
    samples = micro_batches * micro_batch
    return {"stages": stages, "sync_samples_per_sec": samples / sync, "ouroboros_samples_per_sec": samples / ouro,
            "ouroboros_barrier_samples_per_sec": samples / barrier, "sync_step_s": sync, "ouroboros_step_s": ouro,
            "ouroboros_barrier_step_s": barrier, "speedup": sync / ouro, "speedup_barrier": sync / barrier}


def layer_times(model_name: str, micro_batch: int, seq_len: int, vocab_size: int, repeats: int,
                dtype: str) -> dict[str, float]:
    """Median forward and backward seconds of one encoder layer and of the heads (15% of positions masked)."""
    from pld_ds.config import model_config
    from pld_ds.model import BertForPreTraining

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = model_config(model_name, vocab_size=vocab_size)
    model = BertForPreTraining(cfg).to(device)
    layer, heads = model.encoder.layers[0], model.heads
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    x = torch.randn(micro_batch, seq_len, cfg.hidden_size, device=device, requires_grad=True)
    masked = torch.randn(int(0.15 * micro_batch * seq_len), cfg.hidden_size, device=device, requires_grad=True)

    def timed(fn) -> tuple[float, float]:
        fwd, bwd = [], []
        for _ in range(repeats + 2):
            sync()
            start = time.perf_counter()
            with autocast:
                out = fn()
            sync()
            middle = time.perf_counter()
            out.float().sum().backward()
            sync()
            fwd.append(middle - start)
            bwd.append(time.perf_counter() - middle)
        return sorted(fwd[2:])[repeats // 2], sorted(bwd[2:])[repeats // 2]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    layer_fwd, layer_bwd = timed(lambda: layer(x, None))
    heads_fwd, heads_bwd = timed(lambda: heads.mlm_logits(masked))
    saved = []  # what autograd keeps for one layer's backward: the memory a stale stage would hold without recompute

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter) and tensor.data_ptr() not in {p for p, _ in saved}:
            saved.append((tensor.data_ptr(), tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        layer(x, None).float().sum()
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": model_name,
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "micro_batch": micro_batch,
            "seq_len": seq_len, "dtype": dtype, "layer_fwd": layer_fwd, "layer_bwd": layer_bwd,
            "heads_fwd": heads_fwd, "heads_bwd": heads_bwd,
            "activation_bytes": micro_batch * seq_len * cfg.hidden_size * (2 if dtype == "bf16" else 4),
            "layer_saved_bytes": sum(size for _, size in saved), "layer_parameter_bytes": 4 * sum(
                p.numel() for p in layer.parameters())}


# -- measured runs ------------------------------------------------------------------------------------------

def bench_config(args: argparse.Namespace, schedule: str) -> dict[str, Any]:
    config = json.loads((REPO / "ds_configs" / "tiny_cpu_pld.json").read_text())
    for monitor in ("tensorboard", "csv_monitor"):
        config.pop(monitor, None)
    config.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=args.micro_batches)
    config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = args.lr
    config["scheduler"]["params"].update(warmup_num_steps=max(1, args.steps // 10), total_num_steps=args.steps)
    config["progressive_layer_drop"]["enabled"] = args.pld
    config["pipeline"] = {"stages": args.stages, "schedule": schedule, "partition": "compute"}
    return config


def run_rank(rank: int, args: argparse.Namespace, schedule: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.stages),
                      LOCAL_WORLD_SIZE=str(args.stages), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from pld_ds.checkpoint import Preemption
    from pld_ds.config import model_config, padded_vocab_size
    from pld_ds.data.loader import ShardBatches
    from pld_ds.data.shards import find_shards
    from pld_ds.model import BertForPreTraining
    from pld_ds.pipeline import make_engine

    dist.init_process_group("gloo", rank=rank, world_size=args.stages)
    vocab = args.vocab_size
    if args.data:
        manifest = Path(args.data) / "manifest.json"
        if manifest.is_file():
            vocab = json.loads(manifest.read_text())["vocab"]["size"]
    torch.manual_seed(args.seed)
    model = BertForPreTraining(model_config(args.model, vocab_size=padded_vocab_size(vocab)))
    engine = make_engine(model, bench_config(args, schedule), seed=args.seed)
    if args.data:
        root = Path(args.data)
        paths = find_shards(root / "train" if (root / "train").is_dir() else root, "--data")
        batches = iter(ShardBatches(paths, micro_batch=args.micro_batch, vocab_size=vocab, rank=0, world_size=1,
                                    seed=args.seed))
    else:
        from pld_helpers import synthetic_batch

        def synthetic():
            i = 0
            while True:
                yield synthetic_batch(batch=args.micro_batch, seq_len=args.seq_len, vocab=vocab, seed=i % 64)
                i += 1
        batches = synthetic()
    losses, times, cpu = [], [], 0.0
    for step in range(args.steps):
        dist.barrier()  # each step timed alone; Ouroboros between steps is measured without it (below)
        if step == args.skip:
            engine.optimizer_scalars()  # restarts the idle-time counters
            cpu = -cpu_seconds()
        start = time.perf_counter()
        step_losses = engine.train_batch(batches)
        times.append(time.perf_counter() - start)
        losses.append(step_losses["loss"].item() if "loss" in step_losses else None)
    cpu += cpu_seconds()
    scalars = engine.optimizer_scalars()
    # Back-to-back steps with no barrier: Ouroboros' stages then overlap consecutive steps.
    free = back_to_back(engine, batches, args.free_steps, lambda: None)
    # Back to back with pld-pretrain's pre-emption check after every step, as its loop does.
    with Preemption() as preemption:
        loop = back_to_back(engine, batches, args.loop_steps, preemption.requested)
    mine = {"rank": rank, "stage": engine.stage_index, "layers": engine.module.layer_ids, "losses": losses,
            "times": times, "scalars": scalars, "cpu_per_step": cpu / max(args.steps - args.skip, 1),
            "free_step_s": free["step_s"], "free": free, "loop": loop}
    gathered: list = [None] * args.stages
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    engine.engine.destroy()
    dist.destroy_process_group()


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread: torch's and the communication library's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def back_to_back(engine: Any, batches: Any, steps: int, after_step: Any) -> dict[str, Any]:
    """`steps` training steps with no barrier between them, `after_step()` after each: wall and CPU seconds per
    step, and this stage's idle fraction over them."""
    import torch.distributed as dist

    engine.optimizer_scalars()  # restarts the idle-time counters
    dist.barrier()
    start, cpu, in_check = time.perf_counter(), cpu_seconds(), 0.0
    for _ in range(steps):
        engine.train_batch(batches)
        checked = time.perf_counter()
        after_step()
        in_check += time.perf_counter() - checked
    engine.collect_in_flight()
    dist.barrier()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    idle = engine.optimizer_scalars()[f"pipeline/idle_fraction_stage{engine.stage_index}"]
    return {"step_s": wall / max(steps, 1), "cpu_per_step": cpu / max(steps, 1), "idle_fraction": idle,
            "after_step_s": in_check / max(steps, 1)}


def phase_summary(ranks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One back-to-back phase over all ranks: the slowest rank's wall time, all ranks' CPU time, idle per stage."""
    return {"step_s": max(r[key]["step_s"] for r in ranks),
            "cpu_per_step": sum(r[key]["cpu_per_step"] for r in ranks),
            "idle_fraction": {f"stage{r['stage']}": r[key]["idle_fraction"] for r in ranks},
            "after_step_s": {f"stage{r['stage']}": r[key]["after_step_s"] for r in ranks}}


def describe(name: str, phase: dict[str, Any]) -> str:
    idle = "/".join(f"{v:.2f}" for v in phase["idle_fraction"].values())
    text = f"{name} {phase['step_s']:.3f} s/step, {phase['cpu_per_step']:.3f} CPU s/step, idle {idle}"
    if "after_step_s" in phase:  # seconds per step each stage spent in the check (waiting for the others)
        text += ", in the check " + "/".join(f"{v:.3f}" for v in phase["after_step_s"].values()) + " s"
    return text


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    results = {}
    for schedule in ("sync", "ouroboros"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = f"{args.json or 'pipeline_bench.json'}.{schedule}.part"
        started = time.perf_counter()
        mp.spawn(run_rank, args=(args, schedule, port, out), nprocs=args.stages, join=True)
        ranks = json.loads(Path(out).read_text())
        Path(out).unlink()
        last = next(r for r in ranks if r["losses"][0] is not None)
        timed = [max(r["times"][i] for r in ranks) for i in range(args.skip, args.steps)]
        tail = [v for v in last["losses"][-args.tail:]]
        by_stage = sorted(ranks, key=lambda r: r["stage"])
        results[schedule] = result = {
            "step_s": sum(timed) / len(timed), "free_step_s": max(r["free_step_s"] for r in ranks),
            "cpu_per_step": sum(r["cpu_per_step"] for r in ranks),
            "idle_fraction": {f"stage{int(r['stage'])}": r["scalars"][f"pipeline/idle_fraction_stage{r['stage']}"]
                              for r in by_stage},
            "back_to_back": phase_summary(by_stage, "free"), "with_preemption_check": phase_summary(by_stage, "loop"),
            "losses": last["losses"], "final_loss": sum(tail) / len(tail),
            "partition": {f"stage{r['stage']}": r["layers"] for r in by_stage}, "wall_s": time.perf_counter() - started}
        print(f"{schedule:>9}: " + "; ".join(describe(name, phase) for name, phase in (
            ("barrier each step", result), ("back to back", result["back_to_back"]),
            ("with the pre-emption check", result["with_preemption_check"])))
            + f"; loss over the last {args.tail} steps {result['final_loss']:.4f}", flush=True)
    return results


def plot(run_json: Path, model_json: Path | None, out: Path) -> None:
    """Loss against step for both schedules, and (with a cost-model JSON) predicted samples/s against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(run_json.read_text())
    panels = 2 if model_json else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for schedule, result in run["schedules"].items():
        losses = [v for v in result["losses"] if v is not None]
        ax.plot(range(1, len(losses) + 1), losses, label=f"{schedule} ({result['step_s']:.2f} s/step)")
    a = run["args"]
    ax.set(xlabel="optimizer step", ylabel="training loss (MLM + NSP)",
           title=f"{a['model']}, K={a['stages']} CPU ranks, {a['micro_batches']}x{a['micro_batch']} per step")
    ax.legend()
    if model_json:
        rows = json.loads(model_json.read_text())["rows"]
        ax = axes[0][1]
        for bandwidth in sorted({r["bandwidth_gbs"] for r in rows}):
            sel = [r for r in rows if r["bandwidth_gbs"] == bandwidth]
            ks = [r["stages"] for r in sel]
            ax.plot(ks, [r["sync_samples_per_sec"] for r in sel], "o-", label=f"sync, {bandwidth:g} GB/s")
            ax.plot(ks, [r["ouroboros_samples_per_sec"] for r in sel], "s--", label=f"ouroboros, {bandwidth:g} GB/s")
            ax.plot(ks, [r["ouroboros_barrier_samples_per_sec"] for r in sel], "^:",
                    label=f"ouroboros, step barrier, {bandwidth:g} GB/s")
        ax.set(xlabel="stages K", ylabel="samples/s per pipeline (predicted)", xscale="log", title="cost model")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="sync against Ouroboros on K CPU processes")
    run.add_argument("--model", default="mini")
    run.add_argument("--stages", type=int, default=2)
    run.add_argument("--steps", type=int, default=40)
    run.add_argument("--skip", type=int, default=3, help="steps left out of the timing (start-up)")
    run.add_argument("--free-steps", type=int, default=5, help="extra steps timed back to back, no barrier")
    run.add_argument("--loop-steps", type=int, default=5,
                     help="then steps timed back to back with pld-pretrain's pre-emption check after each")
    run.add_argument("--tail", type=int, default=5, help="final loss: mean over the last N steps")
    run.add_argument("--micro-batch", type=int, default=8)
    run.add_argument("--micro-batches", type=int, default=4, help="gradient_accumulation_steps")
    run.add_argument("--seq-len", type=int, default=128, help="synthetic data only")
    run.add_argument("--vocab-size", type=int, default=30522, help="synthetic data only")
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--pld", action="store_true")
    run.add_argument("--data", help="shard folder (pld-prep output); default: synthetic batches")
    run.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--json")
    layers = sub.add_parser("layer-times", help="one layer's and the heads' forward/backward time here")
    layers.add_argument("--model", default="base")
    layers.add_argument("--micro-batch", type=int, default=32)
    layers.add_argument("--seq-len", type=int, default=128)
    layers.add_argument("--vocab-size", type=int, default=30528)
    layers.add_argument("--repeats", type=int, default=10)
    layers.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    layers.add_argument("--json")
    model = sub.add_parser("model", help="predicted throughput of both schedules against K")
    model.add_argument("--layers-json", required=True, help="output of layer-times")
    model.add_argument("--num-layers", type=int, help="default: the measured model's")
    model.add_argument("--micro-batches", type=int, default=8)
    model.add_argument("--bandwidth-gbs", type=float, nargs="+", default=[25.0], help="link GB/s between stages")
    model.add_argument("--json")
    drawing = sub.add_parser("plot", help="PNG of a run's losses and a cost model's predictions")
    drawing.add_argument("--run-json", required=True)
    drawing.add_argument("--model-json")
    drawing.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    if args.command == "plot":
        plot(Path(args.run_json), Path(args.model_json) if args.model_json else None, Path(args.out))
        return
    if args.command == "run":
        result = {"args": vars(args), "schedules": measure(args)}
    elif args.command == "layer-times":
        result = layer_times(args.model, args.micro_batch, args.seq_len, args.vocab_size, args.repeats, args.dtype)
        print(json.dumps(result, indent=2))
    else:
        times = json.loads(Path(args.layers_json).read_text())
        layers_n = args.num_layers or times["num_layers"]
        rows = []
        for bandwidth in args.bandwidth_gbs:
            for stages in [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24) if k <= layers_n]:
                row = predict(times, layers_n, stages, args.micro_batches, times["micro_batch"],
                              times["activation_bytes"], bandwidth * 1e9)
                rows.append({"bandwidth_gbs": bandwidth, **row})
                print(f"{bandwidth:>6.1f} GB/s  K={stages:<3} samples/s: sync {row['sync_samples_per_sec']:8.1f}  "
                      f"ouroboros {row['ouroboros_samples_per_sec']:8.1f} (x{row['speedup']:.2f})  "
                      f"ouroboros with a per-step barrier {row['ouroboros_barrier_samples_per_sec']:8.1f} "
                      f"(x{row['speedup_barrier']:.2f})")
        result = {"layer_times": times, "micro_batches": args.micro_batches, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
