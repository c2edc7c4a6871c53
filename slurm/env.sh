# shellcheck shell=bash
# Environment of every megatron_ts Slurm job: sourced by slurm/train.sbatch and
# slurm/preprocess.sbatch on the first node; srun passes it on to every task. Edit it for your
# cluster (docs/slurm.md). A variable already set when you run sbatch wins over the value here,
# so one job can change a knob with `VAR=value sbatch ...`.

# --- Python environment -------------------------------------------------------------------------
# A virtualenv to activate in the job (empty: use the environment sbatch was called from).
: "${TS_VENV:=}"
if [[ -n $TS_VENV ]]; then
    # shellcheck disable=SC1091
    source "$TS_VENV/bin/activate"
fi
# module load cuda/12.4 nccl   # cluster modules, if your site uses them

# --- Network ------------------------------------------------------------------------------------
# The interface the ranks talk over. Leave empty to let NCCL/gloo pick; set it when a node's host
# name resolves to 127.0.x.x or when the first interface is not the cluster network: one
# interface name such as "ib0" or "eth0" (gloo takes no exclusion lists like NCCL's "^docker").
: "${TS_NET_IFNAME:=}"
if [[ -n $TS_NET_IFNAME ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$TS_NET_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$TS_NET_IFNAME}
fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_IB_HCA=mlx5          # InfiniBand adapters to use (cluster specific)
# export NCCL_IB_DISABLE=1         # no InfiniBand: TCP sockets only
# A rank whose collective fails tears the job down instead of hanging until the timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# --- Caches -------------------------------------------------------------------------------------
# DeepSpeed compiles some ops on first use into TORCH_EXTENSIONS_DIR (default ~/.cache/...), and
# Triton its kernels into TRITON_CACHE_DIR. The defaults in the home directory are built once and
# reused by every job; point them at node-local disk only if the shared file system misbehaves
# under concurrent writers (each node then compiles again, for minutes, in every new /tmp).
# export TORCH_EXTENSIONS_DIR=/tmp/$USER/torch_extensions
# export TRITON_CACHE_DIR=/tmp/$USER/triton
# Hugging Face downloads (tokenizers, VQ weights) on the shared file system, fetched once.
# export HF_HOME=/shared/cache/huggingface

# --- Processes ----------------------------------------------------------------------------------
# One thread per CPU that Slurm gave the task (--cpus-per-task).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
