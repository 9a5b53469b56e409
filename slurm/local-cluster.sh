#!/usr/bin/env bash
# A real N-node Slurm cluster on this one machine, to try the launcher without a cluster:
#
#   slurm/local-cluster.sh start [N]   # slurmctld + N slurmd ("node1".."nodeN"), munged; default N=4
#   slurm/local-cluster.sh status      # daemons and `sinfo`
#   slurm/local-cluster.sh stop        # stops every daemon it started (by their pid files)
#   eval "$(slurm/local-cluster.sh env)"   # export SLURM_CONF for sbatch / srun / squeue
#
# Needs root and Debian's `slurm-wlm` and `munge` packages (`apt-get install -y slurm-wlm munge`).
# Everything (config, munge key and socket, state, spool, pid files, logs) lives under one
# directory, $COT2ALIGN_SLURM_DIR (default /tmp/cot2align-slurm); the daemons listen on
# unprivileged ports from $COT2ALIGN_SLURM_PORT (default 16817: slurmctld, then one per node).
# Node names resolve through /etc/hosts (127.0.0.1; added when missing). No cgroups:
# proctrack/linuxproc and task/none. Each node declares $COT2ALIGN_SLURM_CPUS CPUs (default: this
# machine's cores / N, at least 1) and one partition "local" (OverSubscribe=FORCE) holds them all.
# cred_expire=20 (default 120): a requeued job waits that long before it starts again.
# `start` is idempotent: a running cluster of the same size is left alone; another size restarts it.
set -euo pipefail

DIR="${COT2ALIGN_SLURM_DIR:-/tmp/cot2align-slurm}"
PORT="${COT2ALIGN_SLURM_PORT:-16817}"
CPUS="${COT2ALIGN_SLURM_CPUS:-}"  # per node; default: this machine's cores shared by the N nodes
PARTITION="local"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"

die() { echo "local-cluster: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

nodes_configured() {  # N of the running config, 0 when none
  if [ -f "$DIR/nodes" ]; then cat "$DIR/nodes"; else echo 0; fi
}

need_packages() {
  local missing=()
  for cmd in slurmctld slurmd munged mungekey sbatch srun scontrol sinfo; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: install with 'apt-get install -y slurm-wlm munge' (as root)"
  [ "$(id -u)" -eq 0 ] || die "start needs root (the daemons run as SlurmUser=root)"
}

write_conf() {  # $1 = N
  local n="$1" mem
  [ -n "$CPUS" ] || CPUS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))
  mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
  cat > "$CONF" <<EOF
# Written by slurm/local-cluster.sh: $n nodes on this machine, everything under $DIR.
ClusterName=cot2align-local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=20
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=node[1-$n] NodeHostname=localhost CPUs=$CPUS RealMemory=$mem Port=$((PORT + 1))-$((PORT + n)) State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

ensure_hosts() {  # $1 = N: node1..nodeN -> 127.0.0.1
  local n="$1" missing=() i
  for i in $(seq 1 "$n"); do
    getent hosts "node$i" >/dev/null 2>&1 || missing+=("node$i")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "127.0.0.1 ${missing[*]}  # cot2align local Slurm cluster" >> /etc/hosts
    echo "added to /etc/hosts: 127.0.0.1 ${missing[*]}"
  fi
}

start_munge() {
  mkdir -p "$DIR/munge"
  chmod 700 "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chmod 600 "$DIR/munge/munge.key"
  alive "$DIR/munge/munged.pid" && return 0
  munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

wait_idle() {  # $1 = N: every node IDLE (or mixed/allocated) within 60 s
  local n="$1" up
  for _ in $(seq 1 120); do
    up=$(SLURM_CONF="$CONF" sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l || true)
    [ "$up" -ge "$n" ] && return 0
    sleep 0.5
  done
  SLURM_CONF="$CONF" sinfo -N >&2 || true
  die "only $up of $n nodes came up within 60 s; logs in $DIR/log/"
}

start() {
  local n="${1:-4}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "start N: N must be a positive number of nodes, got '$n'"
  need_packages
  if alive "$DIR/run/slurmctld.pid" && [ "$(nodes_configured)" = "$n" ]; then
    local i ok=1
    for i in $(seq 1 "$n"); do alive "$DIR/run/slurmd-node$i.pid" || ok=0; done
    if [ "$ok" = 1 ]; then
      echo "already running: $n nodes"
      print_env
      return 0
    fi
  fi
  stop quiet
  mkdir -p "$DIR"/{state,run,log,spool}
  ensure_hosts "$n"
  write_conf "$n"
  echo "$n" > "$DIR/nodes"
  start_munge
  SLURM_CONF="$CONF" slurmctld -c -f "$CONF"  # -c: a clean start (no jobs from an earlier cluster)
  local i
  for i in $(seq 1 "$n"); do
    mkdir -p "$DIR/spool/node$i"
    SLURM_CONF="$CONF" slurmd -N "node$i" -f "$CONF"
  done
  wait_idle "$n"
  echo "started: $n nodes (node1..node$n) in partition '$PARTITION', $CPUS CPUs each; state and logs in $DIR"
  print_env
}

stop() {
  local pidfile pid stopped=0
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
    rm -f "$pidfile"
  done
  rm -f "$DIR/nodes"
  [ "${1:-}" = quiet ] || echo "stopped $stopped daemon(s); state and logs stay in $DIR"
}

status() {
  local pidfile any=0
  for pidfile in "$DIR/munge/munged.pid" "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid; do
    [ -f "$pidfile" ] || continue
    any=1
    if alive "$pidfile"; then echo "running  $(basename "$pidfile" .pid) (pid $(cat "$pidfile"))"
    else echo "DEAD     $(basename "$pidfile" .pid) (stale pid file)"; fi
  done
  [ "$any" = 1 ] || { echo "not running (no pid files in $DIR)"; return 3; }
  alive "$DIR/run/slurmctld.pid" && SLURM_CONF="$CONF" sinfo -N -l || true
  print_env
}

print_env() {
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  start) start "${2:-4}" ;;
  stop) stop ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 start [N] | stop | status | env" >&2; exit 2 ;;
esac
