"""Who am I? Rank, world size and rendezvous address from whichever launcher started us.

Supported: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), SLURM srun
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), Open MPI
(``OMPI_COMM_WORLD_*``), MPICH / Intel MPI (``PMI_RANK``/``PMI_SIZE``), PMIx (``PMIX_RANK``), or a
plain single process. Under MPI the rendezvous address comes from ``MASTER_ADDR`` or, without it,
from rank 0 over mpi4py. torchrun wins when several are present (torchrun inside an sbatch script).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from typing import Mapping


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single

    def describe(self) -> str:
        return (f"{self.launcher}: rank {self.rank}/{self.world_size} local {self.local_rank} "
                f"master {self.master_addr}:{self.master_port}")


DEFAULT_PORT = 29500


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM hostlist, in Slurm's order, without calling ``scontrol``.

    Brackets hold comma lists of numbers and ranges (zero padding kept: ``[08-10]``), text may
    follow a bracket (``node[1-2]-ib``), several bracket groups form a cartesian product with the
    first group outermost (``rack[1-2]-node[01-02]``), and top-level commas separate hosts
    (``a,b[3-4]``).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        parts: list[list[str]] = []
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            if m.group(0) == "":
                continue
            parts.append([m.group(1)])
            if m.group(2) is not None:
                parts.append(_expand_bracket(m.group(2), nodelist))
        combos = [""]
        for choices in parts:
            combos = [c + x for c in combos for x in choices]
        hosts.extend(combos)
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
    items.append(cur)
    if any(not i.strip() for i in items):
        raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: empty host")
    return [i.strip() for i in items]


def _expand_bracket(body: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for piece in body.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", piece)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: bad range [{body}]")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host of a SLURM hostlist: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Asks ``scontrol show hostnames`` when it is on PATH and succeeds (Slurm's own parser), else
    expands the list with :func:`expand_hostlist`.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is empty")
    if use_scontrol and shutil.which("scontrol"):
        try:
            r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=10)
            lines = r.stdout.split()
            if r.returncode == 0 and lines:
                return lines[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_hostlist(nodelist)[0]


def _port(env: Mapping[str, str], fallback: int) -> int:
    return _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else fallback


def read_launch_env(env: Mapping[str, str] | None = None,
                    use_mpi: bool | None = None) -> LaunchEnv:
    """This process's launch. Under MPI without ``MASTER_ADDR``, rank 0 picks the rendezvous
    (its host name and a free port) and broadcasts it with mpi4py (``use_mpi``; the default
    is to do so only for the real ``os.environ``, so tests can pass a dict)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything exporting the torch vars)
        return LaunchEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                         _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         env.get("MASTER_ADDR", "127.0.0.1"), _port(env, DEFAULT_PORT), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _int(env, "SLURM_JOB_ID") if env.get("SLURM_JOB_ID") else 0
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "")
                                                    or env.get("SLURM_NODELIST", ""))
        return LaunchEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                         _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                         addr, _port(env, 20000 + job % 20000), "slurm")
    for rank_var, size_var, local_vars in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
            ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")),
            ("PMIX_RANK", "PMIX_SIZE", ("PMIX_LOCAL_RANK",))):
        if rank_var in env and size_var in env:
            local = next((_int(env, v) for v in local_vars if v in env), 0)
            size = _int(env, size_var)
            launch = LaunchEnv(_int(env, rank_var), size, local, env.get("MASTER_ADDR", ""),
                               _port(env, DEFAULT_PORT), "mpi")
            if launch.master_addr:
                return launch
            if use_mpi if use_mpi is not None else env is os.environ:
                return mpi_rendezvous(launch)
            local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS")
            if local_size is not None and int(local_size) == size:
                return replace(launch, master_addr="127.0.0.1")  # every rank on this node
            raise LaunchError(_MPI_HINT)
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     _port(env, _free_port()), "single")


_MPI_HINT = ("MPI launch across nodes needs MASTER_ADDR (or mpi4py, which picks it): "
             "mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=<port> ...")


def mpi_rendezvous(launch: LaunchEnv) -> LaunchEnv:
    """Fill in ``master_addr``/``master_port`` over MPI: rank 0 broadcasts its host name and a
    port that is free there. Ranks and sizes are checked against MPI's own."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"{_MPI_HINT} (mpi4py: {e})") from None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (launch.rank, launch.world_size):
        raise LaunchError(f"MPI says rank {comm.Get_rank()}/{comm.Get_size()}, the environment "
                          f"says {launch.rank}/{launch.world_size}")
    import socket

    addr, port = comm.bcast((socket.gethostname(), _free_port()) if launch.rank == 0 else None,
                            root=0)
    return replace(launch, master_addr=addr, master_port=port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))  # free on every interface: other hosts connect to it
        return s.getsockname()[1]


def init_distributed(launch: LaunchEnv, backend: str | None = None, timeout_s: float = 600.0):
    """Create the default process group (gloo on CPU, nccl on GPU) from ``launch``."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    # megatron-core and DeepSpeed read these too.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank))
    if launch.launcher != "torchrun":
        os.environ.update(MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    # Under torchrun, env:// reuses the agent's store (works with --master_port=0 too).
    init_method = ("env://" if launch.launcher == "torchrun"
                   else f"tcp://{launch.master_addr}:{launch.master_port}")
    dist.init_process_group(
        backend=backend, init_method=init_method,
        rank=launch.rank, world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=timeout_s))
