# Environment of every CoT2Align Slurm job. Sourced by the sbatch script the launcher writes
# (launch.slurm.env_script) and by slurm/cot2align.sbatch, on the first node before the ranks
# start; srun passes the exported variables on to every rank. Edit the commented lines for
# your cluster. Only exports: safe to source twice, never exits the calling shell.

# --- modules (site-specific; uncomment what your cluster needs)
# module purge
# module load cuda/12.4 nccl/2.21 gcc/12

# --- Python: $COT2ALIGN_VENV, else <repo>/.venv when it exists (or: conda activate cot2align)
_cot2align_repo="${COT2ALIGN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
_cot2align_venv="${COT2ALIGN_VENV:-$_cot2align_repo/.venv}"
if [ -f "$_cot2align_venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$_cot2align_venv/bin/activate"
fi
case ":${PYTHONPATH:-}:" in
  *":$_cot2align_repo:"*) ;;
  *) export PYTHONPATH="$_cot2align_repo${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TOKENIZERS_PARALLELISM=false

# --- NCCL (GPU collectives) and gloo (CPU groups)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"  # INFO: topology, transports, hangs
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed collective ends the job instead of hanging it
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL bootstrap / socket traffic (e.g. ib0, eth0, ^lo,docker)
# export GLOO_SOCKET_IFNAME="$NCCL_SOCKET_IFNAME"
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use (e.g. mlx5_0,mlx5_1)
# export NCCL_IB_DISABLE=1               # Ethernet-only clusters
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA distance
# export NCCL_P2P_DISABLE=1              # only if intra-node peer-to-peer hangs (slow)
# export TORCH_DISTRIBUTED_DEBUG=DETAIL  # collective mismatch diagnostics (slow)

# --- rendezvous: the first node of the allocation. The launcher's submitit job derives the same
# address itself (and takes MASTER_PORT from here when set); slurm/cot2align.sbatch needs both.
# The node name must resolve on every node (a rank fails at once naming it when it does not);
# where it does not, give the address: it replaces the name in both jobs.
# export COT2ALIGN_MASTER_ADDR=10.0.0.1
if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -z "${MASTER_ADDR:-}" ] && command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export MASTER_ADDR
fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MASTER_PORT:-}" ]; then
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
fi

# --- W&B: runs are offline unless the config says otherwise (logging.wandb_mode); setting
# WANDB_MODE here would override the config for every run.
# export WANDB_MODE=online WANDB_API_KEY=...   # only where the compute nodes reach the W&B server
