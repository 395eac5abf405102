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
  --version VER      TPU software version                 [TPU_VERSION, default tpu-ubuntu2204-base]
  --project PROJECT  GCP project                          [TPU_PROJECT, default: gcloud's]
  --spot             create a Spot (preemptible) slice    [TPU_SPOT=1]
  --config PATH      config file, relative to the repo    [CONFIG, default configs/default.py]
  --workdir DIR      run directory; a gs:// bucket path when the slice has several hosts
                                                          [WORKDIR, default ~/mta_runs/NAME]
  --detach           `run` keeps training after ssh exits (nohup; log in ~/mta-jax/train.log)
  --yes              `delete` without asking
  --dry-run          print the gcloud commands instead of running them
  -h, --help         this text

Every worker runs the same command; mta_jax reads the slice topology itself
(MTA_JAX_DISTRIBUTED=1 -> jax.distributed.initialize()). The mesh defaults to data=-1
(pure data parallelism); change it with e.g. `-- --config.mesh.fsdp=4`.

Examples:
  launch/tpu_vm.sh up --type v4-8 --config configs/default.py --workdir gs://my-bucket/runs/mta
  TPU_TYPE=v5litepod-8 TPU_ZONE=us-west4-a launch/tpu_vm.sh run -- --config.train.batch_size=32
  launch/tpu_vm.sh delete --yes
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${TPU_NAME:-mta-jax}"
ZONE="${TPU_ZONE:-us-central2-b}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${TPU_PROJECT:-}"
SPOT="${TPU_SPOT:-0}"
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-}"
DETACH=0
YES=0
DRY_RUN=0
REMOTE_DIR='~/mta-jax'

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
WORKDIR="${WORKDIR:-\$HOME/mta_runs/${NAME}}"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

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
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" "${spot[@]}"
}

cmd_setup() {
  local tarball
  tarball="$(mktemp -d)/mta-jax.tar.gz"
  # The working tree without git history, virtual environments or caches.
  run_cmd tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude=venv --exclude=.venv \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:~/mta-jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  on_all_workers "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/mta-jax.tar.gz -C $REMOTE_DIR \
&& python3 -m pip install -q -U pip && python3 -m pip install -q -U 'jax[tpu]' -e $REMOTE_DIR \
&& python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

cmd_run() {
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "tpu_vm.sh: note: --workdir $WORKDIR is local to each worker; a slice with several hosts" \
      "needs a shared gs:// path for checkpoints" >&2
  fi
  local flags main
  flags="--config=$(printf '%q' "$CONFIG") --workdir=$WORKDIR"
  if [[ ${#EXTRA[@]} -gt 0 ]]; then
    flags+=" $(printf '%q ' "${EXTRA[@]}")"
  fi
  main="cd $REMOTE_DIR && MTA_JAX_DISTRIBUTED=1 python3 -m mta_jax.main $flags"
  if [[ "$DETACH" == 1 ]]; then
    on_all_workers "$main > $REMOTE_DIR/train.log 2>&1 < /dev/null &"
    echo "tpu_vm.sh: training in the background; follow it with: launch/tpu_vm.sh logs --name $NAME --zone $ZONE" >&2
  else
    on_all_workers "$main"
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
  [[ "$YES" == 1 ]] && quiet=(--quiet)
  run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" "${quiet[@]}"
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
