#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's slurmctld + slurmd 22.05) for tests/slurm.
#
#   tests/slurm/cluster.sh start DIR   write DIR/slurm.conf, start both daemons, wait until the
#                                      node is idle; prints `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm/cluster.sh stop DIR    stop the daemons started from DIR
#
# Settings that work on a root-only CI machine without munge or systemd (../shared/DESIGN.md):
# auth/none + cred/none, both daemons as root, linuxproc process tracking, no task plugin.
# The node is declared with this machine's CPUs (`slurmd -C`) and 2 fake GPUs are not
# declared: the smoke job is CPU-only. The packages come from apt-packages.txt (make setup).
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")
conf="$dir/slurm.conf"

stop() {
  for d in slurmd slurmctld; do
    if [ -f "$dir/$d.pid" ]; then
      kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
    fi
  done
  for _ in $(seq 50); do
    alive=0
    for d in slurmd slurmctld; do
      [ -f "$dir/$d.pid" ] && kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null && alive=1
    done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  rm -f "$dir"/*.pid
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "cluster.sh: unknown command $cmd (start|stop)" >&2; exit 2; }

for bin in slurmctld slurmd sinfo; do
  command -v $bin >/dev/null || { echo "cluster.sh: $bin not found (apt-get install slurmctld slurmd slurm-client libpmix2)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root (the daemons run as SlurmUser=root)" >&2; exit 2; }

stop
rm -rf "$dir/state" "$dir/spool"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
host=$(hostname -s)
node=$(slurmd -C | head -n1)      # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
# Ports from the directory name's hash, so two clusters on one machine do not collide.
base=$(( 17000 + $(cksum <<<"$dir" | cut -d' ' -f1) % 20000 ))

cat >"$conf" <<EOF
ClusterName=upclip-ci
SlurmctldHost=$host
SlurmctldPort=$base
SlurmdPort=$((base + 1))
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$conf"
slurmctld -f "$conf" -i          # -i: ignore state left by an earlier cluster in this dir
slurmd -f "$conf"
for _ in $(seq 150); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  if [ "$state" = idle ]; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.2
done
echo "cluster.sh: node $host did not become idle in 30 s (state: ${state:-none}); logs in $dir/log" >&2
tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
