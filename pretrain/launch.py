"""Who am I in the job? Rank discovery for every way this trainer is launched.

``init_distributed`` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). When a process is started by something other than torchrun, ``setup_launch_env``
derives them first, from the first launcher found in this order:

- torchrun (or a user) already set RANK and WORLD_SIZE: used as they are.
- Open MPI's ``mpirun``: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK.
- MPICH / Intel MPI (hydra): PMI_RANK / PMI_SIZE, local rank from MPI_LOCALRANKID.
- A Slurm job step (``srun``): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Only inside a step
  (SLURM_STEP_ID set): the batch shell itself carries SLURM_PROCID=0 and SLURM_NTASKS too.

MPI launchers come before Slurm because ``mpirun`` inside an allocation starts its ranks under
one srun task per node, so they inherit that task's SLURM_* values.

The rendezvous address: MASTER_ADDR/MASTER_PORT when both are exported. Otherwise, under Slurm,
the first host of the step's node list and a port derived from the job and step ids (the same
on every rank without any communication); under MPI, rank 0 picks its host name and a free port
and broadcasts them with mpi4py (then finalizes MPI: it is only used for this handshake).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from models.configtree import ConfigError


class LaunchError(ConfigError):
    """The launch environment is incomplete or inconsistent (reported like a config error:
    one ``error: ...`` line)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str


# Below Linux's ephemeral range (32768+), so a derived port rarely meets an outgoing connection's.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r} is not an integer") from None


def _master(environ: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = environ.get("MASTER_ADDR") or None
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    return addr, port


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (``gpu-[007-009,012],login1`` -> ``gpu-007``):
    the first comma-separated entry outside brackets, each bracket replaced by its first value
    (zero padding kept), as ``scontrol show hostnames`` would list it first."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry or depth < 0:
        raise LaunchError(f"cannot parse Slurm node list {nodelist!r}")
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)
    if "[" in host or "]" in host or not host:
        raise LaunchError(f"cannot parse Slurm node list {nodelist!r}")
    return host


def slurm_port(environ: Mapping[str, str]) -> int:
    """A port every rank of one job step derives alike; two steps of a job, or two jobs sharing
    a node, get different ones (export MASTER_PORT to choose it instead)."""
    job = _int(environ, "SLURM_JOB_ID")
    step = _int(environ, "SLURM_STEP_ID") if environ.get("SLURM_STEP_ID", "").isdigit() else 0
    return SLURM_PORT_BASE + (job * 7 + step) % SLURM_PORT_SPAN


def detect(environ: Mapping[str, str] = os.environ) -> LaunchEnv | None:
    """The launcher's view of this process, without side effects; None for a lone process."""
    master_addr, master_port = _master(environ)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
        return LaunchEnv(_int(environ, "RANK"), _int(environ, "WORLD_SIZE"), local, master_addr, master_port,
                         "torchrun")
    if "OMPI_COMM_WORLD_RANK" in environ and "OMPI_COMM_WORLD_SIZE" in environ:
        local = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in environ else 0
        return LaunchEnv(_int(environ, "OMPI_COMM_WORLD_RANK"), _int(environ, "OMPI_COMM_WORLD_SIZE"), local,
                         master_addr, master_port, "openmpi")
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        local = _int(environ, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in environ else 0
        return LaunchEnv(_int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE"), local, master_addr, master_port, "pmi")
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if master_addr is None:
            if not nodelist:
                raise LaunchError("inside a Slurm step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST; "
                                  "export MASTER_ADDR")
            master_addr = first_host(nodelist)
        if master_port is None:
            master_port = slurm_port(environ)
        return LaunchEnv(_int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS"),
                         _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
                         master_addr, master_port, "slurm")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_rendezvous(launch: LaunchEnv) -> LaunchEnv:
    """Rank 0's (MASTER_ADDR, MASTER_PORT) broadcast to every rank over MPI."""
    try:
        import mpi4py

        mpi4py.rc.threads = False
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            f"launched by {launch.launcher} (rank {launch.rank} of {launch.world_size}) without MASTER_ADDR and "
            "MASTER_PORT: pip install mpi4py (rank 0 then broadcasts them), or export both and pass them to "
            "every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)"
        ) from None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (launch.rank, launch.world_size):
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says "
                          f"{launch.rank} of {launch.world_size}")
    proposal = None
    if launch.rank == 0:
        proposal = (launch.master_addr or socket.getfqdn(), launch.master_port or free_port())
    addr, port = comm.bcast(proposal, root=0)
    MPI.Finalize()
    return LaunchEnv(launch.rank, launch.world_size, launch.local_rank, addr, port, launch.launcher)


def export(launch: LaunchEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write the torchrun-style variables that ``init_process_group(init_method="env://")`` reads."""
    environ["RANK"] = str(launch.rank)
    environ["WORLD_SIZE"] = str(launch.world_size)
    environ["LOCAL_RANK"] = str(launch.local_rank)
    if launch.master_addr is not None:
        environ["MASTER_ADDR"] = launch.master_addr
    if launch.master_port is not None:
        environ["MASTER_PORT"] = str(launch.master_port)


def setup_launch_env(environ: MutableMapping[str, str] = os.environ) -> LaunchEnv | None:
    """Detect the launcher and export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    launch = detect(environ)
    if launch is None:
        return None
    if not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise LaunchError(f"{launch.launcher}: rank {launch.rank} / local rank {launch.local_rank} "
                          f"out of range for world size {launch.world_size}")
    needs_handshake = launch.world_size > 1 and (launch.master_addr is None or launch.master_port is None)
    if launch.launcher in ("openmpi", "pmi") and needs_handshake:
        launch = mpi_rendezvous(launch)
    elif needs_handshake:
        raise LaunchError(f"{launch.launcher}: RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not")
    export(launch, environ)
    return launch
