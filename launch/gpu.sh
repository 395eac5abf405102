#!/usr/bin/env bash
# Train mta-jax on the GPUs of one host (data parallel over all of them); see --help for
# several hosts under SLURM.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [options] [-- extra mta_jax.main flags]

Runs `python -m mta_jax.main` once on this host over all its visible GPUs, with the mesh
data=-1 (every GPU a data-parallel replica; e.g. `-- --config.mesh.fsdp=2` to also split
parameters).

Options (each also read from the environment variable in brackets):
  --config PATH    config file                      [CONFIG, default configs/demo.py, which
                   runs as shipped; configs/default.py needs data.train_path]
  --workdir DIR    run directory (checkpoints, metrics): a local path or gs://BUCKET/PATH
                                                    [WORKDIR, default runs/<config name>]
  --gpus LIST      GPUs to use, e.g. 0,1,2,3        [CUDA_VISIBLE_DEVICES, default all]
  --python PATH    Python interpreter               [PYTHON, default python3]
  --install        first `pip install -U "jax[cuda12]"` and this repository (-e) into it
  --dry-run        print the environment and the command instead of running them
  -h, --help       this text

Environment it sets (yours win when already set):
  XLA_FLAGS                        --xla_gpu_enable_latency_hiding_scheduler=true (overlap
                                   collectives with compute), added to yours
  XLA_PYTHON_CLIENT_MEM_FRACTION   0.90 (JAX preallocates this share of each GPU)
  JAX_COMPILATION_CACHE_DIR        ~/.cache/mta_jax/xla (reuses compiled steps across runs)

Several hosts (SLURM): one task per node, each with all of its node's GPUs; mta_jax sees
SLURM_NTASKS > 1 and calls jax.distributed.initialize() (process 0 coordinates), and the
global batch is split over every GPU of every node. The workdir must be one all nodes reach:
a shared filesystem or a gs:// bucket. The command each node runs is printed first:
  srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
      launch/gpu.sh --workdir gs://my-bucket/runs/demo
Without SLURM, export JAX_COORDINATOR_ADDRESS=<host 0>:1234 JAX_NUM_PROCESSES=<hosts>
JAX_PROCESS_ID=<0..hosts-1> on each host and run this script on each.
EOF
}

die() { echo "gpu.sh: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-}"
PYTHON="${PYTHON:-python3}"
INSTALL=0
DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --gpus) export CUDA_VISIBLE_DEVICES="${2:?--gpus needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
if [[ -z "$WORKDIR" ]]; then
  name="$(basename "${CONFIG%%:*}")"
  WORKDIR="runs/${name%.py}"
fi

export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/mta_jax/xla}"

run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

cd "$REPO_ROOT"
if [[ "$INSTALL" == 1 ]]; then
  run_cmd "$PYTHON" -m pip install -U "jax[cuda12]" -e .
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo "XLA_FLAGS=$XLA_FLAGS"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  echo "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>}"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh: $(nvidia-smi -L | wc -l) GPU(s) on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>}" >&2
else
  echo "gpu.sh: warning: nvidia-smi not found; JAX may fall back to the CPU" >&2
fi

main=("$PYTHON" -m mta_jax.main --config="$CONFIG" --workdir="$WORKDIR" --config.mesh.data=-1
  ${EXTRA[@]+"${EXTRA[@]}"})
if [[ "$DRY_RUN" != 1 ]]; then
  echo "gpu.sh: on $(hostname): $(printf '%q ' "${main[@]}")" >&2
fi
run_cmd "${main[@]}"
