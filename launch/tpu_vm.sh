#!/usr/bin/env bash
# Train mta-jax on a Cloud TPU VM slice: create it, copy this repo to every worker, install,
# run `python -m mta_jax.main` on all workers at once, delete it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [-- extra mta_jax.main flags]

Commands:
  create    create the TPU VM slice
  setup     copy this repository to every worker and pip install it with jax[tpu]
  run       run `python -m mta_jax.main --config=... --workdir=...` on all workers
  up        create + setup + run
  logs      follow the training log of worker 0 (after `run --detach`)
  ssh       open a shell on worker 0
  delete    delete the TPU VM slice (asks first unless --yes)

Options (each also read from the environment variable in brackets):
  --name NAME        TPU VM name                          [TPU_NAME, default mta-jax]
  --zone ZONE        GCP zone                             [TPU_ZONE, default us-central2-b]
  --type TYPE        accelerator type, e.g. v4-8, v4-32, v5litepod-8, v6e-8
                                                          [TPU_TYPE, default v4-8]
  --version VER      TPU software version                 [TPU_VERSION, default by type:
                     v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                     v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --project PROJECT  GCP project                          [TPU_PROJECT, default: gcloud's]
  --spot             create a Spot (preemptible) slice    [TPU_SPOT=1]
  --config PATH      config file, relative to the repo    [CONFIG, default configs/demo.py,
                     which runs as shipped; configs/default.py needs data.train_path]
  --workdir DIR      run directory: gs://BUCKET/PATH, which every host of the slice reads
                     and writes (checkpoints, metrics, predictions); a local path suits a
                     single-host slice only            [WORKDIR, default ~/mta_runs/NAME]
  --python VER       Python for the workers' venv (~/mta-venv, made with uv)
                                                          [TPU_PYTHON, default 3.12]
  --detach           `run` keeps training after ssh exits (nohup; log in ~/mta-jax/train.log)
  --yes              `delete` without asking
  --dry-run          print the gcloud commands instead of running them
  -h, --help         this text

Every worker runs the same command, printed before it starts; mta_jax reads the slice
topology itself (MTA_JAX_DISTRIBUTED=1 -> jax.distributed.initialize()). The mesh defaults to
data=-1 (pure data parallelism); change it with e.g. `-- --config.mesh.fsdp=4`. The workers
reach gs:// with the VM's service account (no keys to copy).

Examples:
  launch/tpu_vm.sh up --type v4-8 --workdir gs://my-bucket/runs/demo
  TPU_TYPE=v5litepod-8 TPU_ZONE=us-west4-a launch/tpu_vm.sh run -- --config.train.batch_size=32
  launch/tpu_vm.sh delete --yes
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${TPU_NAME:-mta-jax}"
ZONE="${TPU_ZONE:-us-central2-b}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-}"
PYTHON_VERSION="${TPU_PYTHON:-3.12}"
PROJECT="${TPU_PROJECT:-}"
SPOT="${TPU_SPOT:-0}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-}"
DETACH=0
YES=0
DRY_RUN=0
REMOTE_DIR='~/mta-jax'
REMOTE_VENV='~/mta-venv'

[[ $# -gt 0 ]] || { usage; exit 2; }
case "$1" in
  -h|--help|help) usage; exit 0 ;;
  create|setup|run|up|logs|ssh|delete) COMMAND="$1"; shift ;;
  *) usage >&2; die "unknown command '$1'" ;;
esac

EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --python) PYTHON_VERSION="${2:?--python needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --yes|-y) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be lower-case letters, digits and dashes, starting with a letter"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
# The remote shell expands the default; a given workdir is passed through quoted.
if [[ -z "$WORKDIR" ]]; then
  WORKDIR_ARG="\$HOME/mta_runs/$NAME"
else
  WORKDIR_ARG="$(printf '%q' "$WORKDIR")"
fi

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

# Runs (or, with --dry-run, prints) one command.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

need_gcloud() {
  [[ "$DRY_RUN" == 1 ]] || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run 'gcloud auth login'"
}

on_all_workers() {  # on_all_workers 'remote bash command'
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

cmd_create() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` in bash 3.2 (macOS) too.
  run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  local tarball
  tarball="$(mktemp -d)/mta-jax.tar.gz"
  # The working tree without git history, virtual environments or caches.
  run_cmd tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude=venv --exclude=.venv \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:mta-jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  # uv gives every worker the same Python (the images' own python3 is too old for JAX).
  on_all_workers "set -e
command -v uv >/dev/null 2>&1 || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$PATH
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/mta-jax.tar.gz -C $REMOTE_DIR
[ -x $REMOTE_VENV/bin/python ] || uv venv --python $PYTHON_VERSION $REMOTE_VENV
uv pip install --python $REMOTE_VENV/bin/python -U 'jax[tpu]' -e $REMOTE_DIR
$REMOTE_VENV/bin/python -c 'import jax; print(\"process\", jax.process_index(), \"local devices\", jax.local_device_count())'"
}

cmd_run() {
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "tpu_vm.sh: note: workdir ${WORKDIR:-~/mta_runs/$NAME} is local to each worker; a slice" \
      "with several hosts needs a shared gs:// path for checkpoints" >&2
  fi
  local flags main
  flags="--config=$(printf '%q' "$CONFIG") --workdir=$WORKDIR_ARG"
  if [[ ${#EXTRA[@]} -gt 0 ]]; then
    flags+=" $(printf '%q ' "${EXTRA[@]}")"
  fi
  main="$REMOTE_VENV/bin/python -m mta_jax.main $flags"
  echo "tpu_vm.sh: on every worker of $NAME: cd $REMOTE_DIR && MTA_JAX_DISTRIBUTED=1 $main" >&2
  if [[ "$DETACH" == 1 ]]; then
    on_all_workers "cd $REMOTE_DIR && MTA_JAX_DISTRIBUTED=1 nohup $main > train.log 2>&1 < /dev/null &"
    echo "tpu_vm.sh: training in the background; follow it with: launch/tpu_vm.sh logs --name $NAME --zone $ZONE" >&2
  else
    on_all_workers "cd $REMOTE_DIR && MTA_JAX_DISTRIBUTED=1 $main"
  fi
}

cmd_logs() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
    --command="tail -n 100 -f $REMOTE_DIR/train.log"
}

cmd_ssh() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0
}

cmd_delete() {
  local quiet=()
  if [[ "$YES" == 1 ]]; then quiet=(--quiet); fi
  run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" ${quiet[@]+"${quiet[@]}"}
}

need_gcloud
case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  up) cmd_create; cmd_setup; cmd_run ;;
  logs) cmd_logs ;;
  ssh) cmd_ssh ;;
  delete) cmd_delete ;;
esac
