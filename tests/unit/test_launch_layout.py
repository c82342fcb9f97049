import shutil
import subprocess

import pytest

from trainer.distributed.launch import LaunchError, expand_hostlist, first_host, read_launch_env
from trainer.distributed.layout import LayoutError, ParallelLayout


def test_torchrun_env_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-004,9],cpu1", "SLURM_JOB_ID": "4242"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == \
        (5, 16, 1, "gpu003", "slurm")
    assert e.master_port == 20000 + 4242
    assert read_launch_env(dict(env, MASTER_PORT="999")).master_port == 999


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("a[07,09]", "a07"), ("x,y", "x"),
    ("rack1-n[0003-0010]", "rack1-n0003")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first
    assert first_host(nodelist, use_scontrol=False) == first


HOSTLISTS = {
    "node[1-2]-ib": ["node1-ib", "node2-ib"],
    "rack[1-2]-node[01-04]": [f"rack{r}-node0{n}" for r in (1, 2) for n in range(1, 5)],
    "a,b[3-4]": ["a", "b3", "b4"],
    "gpu[003-005,9],cpu1": ["gpu003", "gpu004", "gpu005", "gpu9", "cpu1"],
    "n[08-10]x,m": ["n08x", "n09x", "n10x", "m"],
}


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_expand_hostlist_suffixes_and_several_ranges(nodelist):
    assert expand_hostlist(nodelist) == HOSTLISTS[nodelist]
    assert first_host(nodelist, use_scontrol=False) == HOSTLISTS[nodelist][0]
    assert first_host(nodelist) == HOSTLISTS[nodelist][0]  # scontrol when it works, else the same


def _scontrol_hostnames(nodelist):
    if not shutil.which("scontrol"):
        return None
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else None


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_expand_hostlist_matches_scontrol(nodelist):
    ref = _scontrol_hostnames(nodelist)
    if ref is None:
        pytest.skip("scontrol absent or unconfigured (tests/slurm/cluster.sh sets one up)")
    assert expand_hostlist(nodelist) == ref


@pytest.mark.parametrize("bad", ["a[1-", "a[x]", "a,,b", "a[3-1]", "a]b["])
def test_expand_hostlist_rejects_bad_lists(bad):
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(bad)


def test_mpi_envs():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    e = read_launch_env(ompi)
    assert (e.rank, e.world_size, e.master_addr, e.launcher) == (2, 4, "127.0.0.1", "mpi")
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0"}
    e = read_launch_env(pmi)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr) == (1, 2, 1, "h0")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        read_launch_env(dict(ompi, OMPI_COMM_WORLD_LOCAL_SIZE="2"))


def test_single_and_bad_values():
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
    with pytest.raises(LaunchError, match="WORLD_SIZE='x'"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "x"})


def test_layout_validation_prints_every_degree():
    lay = ParallelLayout(8, tp=2, pp=2, ep=2)
    assert lay.dp == 2 and lay.describe() == "tp=2 pp=2 dp=2 ep=2"
    with pytest.raises(LayoutError) as e:
        ParallelLayout(6, tp=4, pp=1)
    assert "world=6 tp=4 pp=1 ep=1" in str(e.value)
    with pytest.raises(LayoutError, match="parallel.ep=3"):
        ParallelLayout(4, tp=1, pp=1, ep=3)
