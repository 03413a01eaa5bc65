"""Several processes, one run: the process group torchrun asks for, and `--nproc`, which starts torchrun.

torchrun starts one process per GPU (or per CPU share) and tells each who it is through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup` reads that, joins the group (NCCL between
GPUs, Gloo between CPUs) and picks the process's device; without torchrun it is the ordinary one-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import pick_device
from .errors import ConfigError, DeviceError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes. rank 0 prints, validates and saves."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def current() -> World:
    """The group this process has joined (a notebook may have joined one itself), else one process alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local)


def _rank_device(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK where a GPU is asked for (or auto and one is there), else the CPU."""
    if requested.startswith("cuda:"):
        raise DeviceError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK; pass --device "
                          "cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if requested == "mps":
        raise DeviceError("--device mps: torch.distributed has no MPS backend; use --device cpu under torchrun")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    pick_device("cuda")  # a DeviceError when no GPU is visible at all
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"LOCAL_RANK {local_rank}, but this node has {count} GPU(s); start at most {count} "
                          f"process(es) per node (torchrun --nproc_per_node={count})")
    return torch.device("cuda", local_rank)


def setup(requested_device: str = "auto") -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by torchrun; returns this process's place and device.

    Without torchrun: World() and pick_device's choice, nothing else happens."""
    if not launched_by_torchrun():
        return World(), pick_device(requested_device)
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                          f"{[os.environ[n] for n in TORCHRUN_VARIABLES]}; launch with torchrun") from None
    device = _rank_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return World(rank, world_size, local_rank), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """rank 0's `value` on every process (a run folder's name, a tokenizer's JSON): a choice made once."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs `argv` (the arguments after `miniclip`) as `nproc` processes on this
    machine, without the --nproc option that asked for it."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    # --standalone: a rendezvous on localhost with a free port, so two runs on one machine never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "miniclip_cli", *rest]


def launch(argv: list[str], nproc: int) -> int:
    """Run `miniclip ARGV` under torchrun as `nproc` processes and wait; returns torchrun's exit code."""
    return subprocess.call(torchrun_command(argv, nproc))
