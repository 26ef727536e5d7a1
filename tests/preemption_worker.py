"""One rank of the pre-emption agreement tests: python tests/preemption_worker.py SCENARIO RANK PORT FOLDER.

Two gloo ranks make the training loop's step-boundary checks (``Preemption.requested()``) with no model:
  signal  rank 1 starts its check 2 only once rank 0's check 2 has returned (a rank a step behind), and gets
          SIGUSR1 during step 3; both stop when the checks agree
  end     three checks and a normal end of the ``with`` block
  error   rank 0 fails right after its check 3; rank 1, a step behind, makes check 3 and then waits for a message
          rank 0 will never send (as a pipeline stage waits for a failed neighbour)
Prints one JSON line: the value each check returned, and what the scenario saw.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pld_ds.checkpoint import Preemption


def wait_for(path: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def main(scenario: str, rank: int, port: int, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    report: dict = {"rank": rank, "checks": []}
    try:
        with Preemption() as preemption:
            for step in range(1, 7 if scenario == "signal" else 4):
                if scenario == "signal" and rank == 1 and step == 2:
                    report["peer_check2_returned_first"] = wait_for(folder / "rank0_check2", 20)
                if scenario == "signal" and rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    report["own_flag_at_check3"] = preemption.signum
                if scenario == "error" and rank == 1 and step == 3:
                    time.sleep(2)
                signum = preemption.requested()
                report["checks"].append(signum)
                if rank == 0 and step == 2:
                    (folder / "rank0_check2").touch()
                if scenario == "error" and rank == 0 and step == 3:
                    print(json.dumps(report), flush=True)
                    raise RuntimeError("rank 0 failed after its check 3")
                if signum:
                    break
        print(json.dumps(report), flush=True)
        if scenario == "error":
            dist.recv(torch.zeros(1), src=0)  # never sent: ends when rank 0's process is gone
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
