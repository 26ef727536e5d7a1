"""Worker for tests/test_pipeline.py: runs training scenarios on a pipeline of CPU ranks (gloo).

    python tests/pipeline_worker.py --out FILE.json --world N --scenarios JSON

Each scenario trains a tiny BertForPreTraining through pld_ds.pipeline.make_engine on the same synthetic data
(a few batches cycled, so the model can fit them) and records, on every rank, the loss per step (last stage),
the PLD gates the engine drew and the encoder layers that actually ran (forward hooks), and a checksum of
the stage's weights. With "reference": true the same scenario also runs in one process through PLDEngine
(micro-batches of every data-parallel replica accumulated in order), which is the exact reference.
The parent process writes {"reference": {...}, "runs": {name: [per-rank records]}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pld_helpers import checksum_of, load_ds_config, synthetic_batch, tiny_config  # noqa: E402

SEED = 7
DISTINCT_BATCHES = 3  # steps cycle over this many global batches


def ds_config(scenario: dict[str, Any], world: int, stages: int) -> dict[str, Any]:
    config = load_ds_config("tiny_cpu_pld.json")
    for monitor in ("tensorboard", "csv_monitor"):
        config.pop(monitor, None)
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=scenario.get("gas", 2),
                  zero_optimization={"stage": scenario.get("zero", 0)})
    config["gradient_clipping"] = scenario.get("clip", 1.0)
    config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = scenario.get("lr", 3e-3)
    config["scheduler"]["params"]["warmup_num_steps"] = 5
    config["progressive_layer_drop"] = {"enabled": scenario.get("pld", False), "theta": 0.5, "gamma": 0.1}
    if stages > 1:
        config["pipeline"] = {"stages": stages, "schedule": scenario.get("schedule", "sync"),
                              "partition": scenario.get("partition", "uniform")}
        for key in ("staleness", "warmup_steps"):
            if key in scenario:
                config["pipeline"][key] = scenario[key]
    return config


def micro_batch(step: int, micro: int, dp_rank: int, gas: int, dp: int) -> dict[str, torch.Tensor]:
    index = ((step % DISTINCT_BATCHES) * dp + dp_rank) * gas + micro
    return synthetic_batch(batch=4, seq_len=16, seed=1000 + index)


def batches_for(start: int, dp_rank: int, gas: int, dp: int):
    step = start
    while True:
        for micro in range(gas):
            yield micro_batch(step, micro, dp_rank, gas, dp)
        step += 1


def run_reference(scenario: dict[str, Any]) -> list[float]:
    """One process, every replica's micro-batches accumulated in order: the same global batch."""
    from pld_ds.engine import PLDEngine
    from pld_ds.model import BertForPreTraining

    dp = scenario["world"] // scenario["stages"]
    gas = scenario.get("gas", 2)
    config = ds_config({**scenario, "gas": gas * dp}, 1, 1)
    torch.manual_seed(0)
    engine = PLDEngine(BertForPreTraining(tiny_config()), config, seed=SEED)
    losses = []
    for step in range(scenario["steps"]):
        batches = iter([micro_batch(step, m, d, gas, dp) for d in range(dp) for m in range(gas)])
        losses.append(engine.train_batch(batches)["loss"].item())
    engine.engine.destroy()
    return losses


def run_pipeline(scenario: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist

    from pld_ds.model import BertForPreTraining
    from pld_ds.pipeline import make_engine

    stages, world = scenario["stages"], scenario["world"]
    torch.manual_seed(0)
    engine = make_engine(BertForPreTraining(tiny_config()), ds_config(scenario, world, stages), seed=SEED)
    dp_rank, dp = engine.data_parallel
    ran: list[int] = []
    for name, layer in zip(engine.module.layer_ids, engine.module.layers, strict=True):
        layer.register_forward_hook(lambda module, args, output, name=name: ran.append(name))
    gas = engine.gradient_accumulation_steps
    steps, resume_at = scenario["steps"], scenario.get("resume_at")
    records = []
    batches = batches_for(0, dp_rank, gas, dp)
    step = 0
    while step < steps:
        if resume_at is not None and step == resume_at:
            # save, throw the engine away, build a fresh one and load: it must continue exactly
            engine.save_checkpoint(tmp / f"ckpt_{scenario['name']}", {"data": step})
            torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
            engine = make_engine(BertForPreTraining(tiny_config()), ds_config(scenario, world, stages), seed=SEED)
            for name, layer in zip(engine.module.layer_ids, engine.module.layers, strict=True):
                layer.register_forward_hook(lambda module, args, output, name=name: ran.append(name))
            client = engine.load_checkpoint(tmp / f"ckpt_{scenario['name']}")
            batches = batches_for(client["data"], dp_rank, gas, dp)
            resume_at = None
        ran.clear()
        losses = engine.train_batch(batches)
        records.append({"step": step, "global_steps": engine.global_steps,
                        "loss": losses["loss"].item() if "loss" in losses else None,
                        "gates": [None if g is None else [[bool(k), p] for k, p in g] for g in engine.last_gates],
                        "layers_run": list(ran), "staleness": engine.staleness(step)})
        step += 1
    engine.collect_in_flight()  # the next scenario must not receive this one's last messages
    scalars = engine.optimizer_scalars()
    weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    tied = engine.module.tied_weight()
    mine = {"rank": dist.get_rank(), "stage": engine.stage_index, "dp_rank": dp_rank,
            "layer_ids": engine.module.layer_ids, "records": records, "checksum": checksum_of(weights),
            "scalars": scalars,
            "tied": None if tied is None else checksum_of({"tied": tied})}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    engine.engine.destroy()
    return gathered


def child(rank: int, world: int, port: int, scenarios: list[dict[str, Any]], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if os.environ.get("PIPELINE_WORKER_TIMEOUT"):  # a hang shows every rank's stack instead of waiting forever
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["PIPELINE_WORKER_TIMEOUT"]), exit=True)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    runs = {s["name"]: run_pipeline(s, Path(out).parent) for s in scenarios}
    if rank == 0:
        Path(out + ".runs").write_text(json.dumps(runs))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenarios", required=True, help="JSON list of scenarios")
    args = parser.parse_args()
    scenarios = json.loads(args.scenarios)
    for s in scenarios:
        s["world"] = args.world
    torch.set_num_threads(1)
    import torch.multiprocessing as mp

    mp.spawn(child, args=(args.world, args.port, scenarios, args.out), nprocs=args.world, join=True)
    reference = {s["name"]: run_reference(s) for s in scenarios if s.get("reference")}
    runs = json.loads(Path(args.out + ".runs").read_text())
    Path(args.out).write_text(json.dumps({"reference": reference, "runs": runs}))


if __name__ == "__main__":
    main()
