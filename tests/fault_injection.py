"""Kill pld-pretrain with SIGKILL at random moments, start the same command again, compare with a run never killed.

    python tests/fault_injection.py [--trials 20] [--seed 0] [--steps 12]

Each trial kills the run one to three times: after a random logged step plus a random delay, or
the moment a checkpoint is being written (a `.partial-*` folder exists). Then it lets the same
command finish and checks that the final weights and the per-step `train/loss` trace (TensorBoard
events, where a resumed run's re-done steps replace the earlier ones) are bit for bit those of the
uninterrupted run, and that no partial checkpoint is left. Prints one line per trial and "k/N".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pld_helpers import REPO, child_env  # noqa: E402
from shard_fixtures import make_shard_dir  # noqa: E402

from pld_ds import checkpoint  # noqa: E402
from pld_ds.plot import read_scalars  # noqa: E402

CONFIG = REPO / "ds_configs" / "tiny_cpu_pld.json"
TIMEOUT = 300


def command(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "pld_ds.pretrain", "--deepspeed_config", str(CONFIG), "--data", str(data),
            "--output", str(out), "--model", "tiny", "--max-steps", str(steps), "--log-interval", "1",
            "--save-interval", "2", "--keep-checkpoints", "2", "--resume", "auto"]


def make_data(root: Path) -> Path:
    # 88 samples, micro batch 16: 5 steps an epoch, so runs cross epoch boundaries
    return make_shard_dir(root, shard_sizes=(48, 40), seq_len=32)


class Run:
    """One pld-pretrain process whose stdout is watched for `step N` lines."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.last_step, self.lines = 0, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("step "):
                self.last_step = int(line.split()[1])

    def wait_for(self, ready, timeout: float = TIMEOUT) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if ready():
                return True
            time.sleep(0.002)
        return False

    def kill(self) -> None:
        self.proc.kill()
        self.finish()

    def finish(self) -> int:
        code = self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=10)
        return code


def partial_folders(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(f"{checkpoint.PARTIAL}*")] if folder.is_dir() else []


def final_state(out: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    folder = out / "checkpoints" / checkpoint.tag_for(steps)
    weights = checkpoint.safe_load(folder / "mp_rank_00_model_states.pt")["module"]
    losses = dict(read_scalars(out / "tensorboard")["train/loss"])
    return weights, losses


def reference(data: Path, out: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    run = Run(command(data, out, steps))
    code = run.finish()
    if code != 0:
        raise RuntimeError(f"reference run failed ({code}):\n{''.join(run.lines[-30:])}")
    return final_state(out, steps)


def trial(data: Path, out: Path, steps: int, expected, rng: np.random.Generator) -> tuple[bool, str]:
    """Kill the run 1-3 times at random moments, finish it, compare. (ok, what happened)"""
    events = []
    for _ in range(int(rng.integers(1, 4))):
        folder = out / "checkpoints"
        stale = set(partial_folders(folder))  # left by an earlier kill: the next save removes them
        run = Run(command(data, out, steps))
        start = run.last_step
        if rng.random() < 0.4:  # during a checkpoint write
            hit = run.wait_for(lambda f=folder, old=stale: bool(set(partial_folders(f)) - old))
            events.append("kill in save" if hit else "finished before a save")
        else:
            target = int(rng.integers(start + 1, steps + 1))
            run.wait_for(lambda r=run, t=target: r.last_step >= t)
            time.sleep(float(rng.uniform(0, 0.3)))
            events.append(f"kill after step {run.last_step}")
        if run.proc.poll() is not None:
            events[-1] += f" (exited {run.proc.returncode} first)"
        run.kill()
    run = Run(command(data, out, steps))
    code = run.finish()
    if code != 0:
        return False, f"{', '.join(events)}; final run exited {code}: {''.join(run.lines[-5:])}"
    ok, detail = compare(out, steps, expected)
    return ok, f"{', '.join(events)}; {detail}"


def compare(out: Path, steps: int, expected) -> tuple[bool, str]:
    """A finished run against the uninterrupted one: bit-equal final weights and loss trace, no partial folder."""
    weights, losses = final_state(out, steps)
    ref_weights, ref_losses = expected
    same_weights = weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k])
                                                                for k in ref_weights)
    leftovers = partial_folders(out / "checkpoints")
    ok = same_weights and losses == ref_losses and not leftovers
    detail = f"weights {'equal' if same_weights else 'DIFFER'}, "
    detail += f"loss trace {'equal' if losses == ref_losses else 'DIFFERS'}"
    return ok, detail + (f", partial folders left: {leftovers}" if leftovers else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root / "data")
        expected = reference(data, root / "reference", args.steps)
        passed = 0
        for k in range(args.trials):
            ok, detail = trial(data, root / f"trial{k}", args.steps, expected, rng)
            passed += ok
            print(f"trial {k + 1}: {'ok' if ok else 'FAILED'}: {detail}", flush=True)
    print(f"{passed}/{args.trials}")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
