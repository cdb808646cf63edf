#!/usr/bin/env bash
# Train conret_jax on a Cloud TPU VM slice (single host or pod): create or reuse the TPU VM, install the
# project on every worker, run the same conret-train command on all workers, optionally delete the slice.
#
# usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=v5p-32 --config=configs/FILE.py[:args] \
#          --workdir=gs://BUCKET/DIR [--project=P] [--version=RUNTIME] [--repo=PATH|GIT_URL] [--ref=BRANCH] \
#          [--spot] [--skip-install] [--teardown] [--dry-run] [-- EXTRA conret-train ARGS...]
#
#   --repo          local checkout (default: this one; copied to the workers) or a git URL (cloned there).
#                   --config is a path inside that repo, as conret-train runs from the repo root on the workers.
#   --version       TPU VM runtime; default from the accelerator generation (v4, v5e, v5p, v6e).
#   --spot          create the slice as a Spot VM (cheaper, preemptible).
#   --skip-install  reuse what is installed on the workers (rerun after a crash).
#   --teardown      delete the TPU VM after training, whatever its outcome.
#   --dry-run       print every command ("+ ..." per line) and run nothing.
# Every worker joins one JAX run (conret_jax.distributed detects the pod). --workdir must be gs:// so that all
# workers write one checkpoint; a rerun of the same command resumes from its latest checkpoint, and a preempted
# or terminated Spot slice is deleted and created again first.
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="" VERSION="" PROJECT="" REF="" CONFIG="" WORKDIR=""
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0 TEARDOWN=0 SPOT=0 SKIP_INSTALL=0
TRAIN_ARGS=()
# shellcheck disable=SC2088  # the tilde is meant for the workers' shell, not this one
REMOTE_DIR='~/conret_jax'

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run() { show "$@"; if ((DRY_RUN)); then return 0; fi; "$@"; }

while (($# > 0)); do
  arg="$1"; shift
  case "$arg" in
    --) TRAIN_ARGS+=("$@"); break ;;
    --dry-run) DRY_RUN=1; continue ;;
    --teardown) TEARDOWN=1; continue ;;
    --spot) SPOT=1; continue ;;
    --skip-install) SKIP_INSTALL=1; continue ;;
    -h|--help) usage; exit 0 ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*) (($# > 0)) || die "$arg needs a value"; key="$arg"; value="$1"; shift ;;
    *) die "unexpected argument '$arg' (conret-train arguments go after --)" ;;
  esac
  case "$key" in
    --name) NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --accelerator-type) ACCELERATOR="$value" ;;
    --version) VERSION="$value" ;;
    --project) PROJECT="$value" ;;
    --repo) REPO="$value" ;;
    --ref) REF="$value" ;;
    --config) CONFIG="$value" ;;
    --workdir) WORKDIR="$value" ;;
    *) die "unknown flag $key (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path that every worker shares (got '$WORKDIR')"
if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION="" ;;
  esac
fi

GCLOUD_AT=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_AT+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

create() {
  if [[ -z "$ACCELERATOR" ]] && ((DRY_RUN)); then
    echo "# no --accelerator-type: $NAME must already exist"
    return 0
  fi
  [[ -n "$ACCELERATOR" ]] || die "TPU VM $NAME does not exist: --accelerator-type is needed to create it"
  [[ -n "$VERSION" ]] || die "no default runtime for '$ACCELERATOR': pass --version"
  local extra=()
  ((SPOT == 0)) || extra+=(--spot)
  run "${TPU[@]}" create "$NAME" "${GCLOUD_AT[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
}

# 1. Describe or create the slice (a preempted/terminated one cannot restart: delete and create it again).
if ((DRY_RUN)); then
  show "${TPU[@]}" describe "$NAME" "${GCLOUD_AT[@]}" --format='value(state)'
  echo "# only if describe finds no TPU VM (or a PREEMPTED/TERMINATED one, which is deleted first):"
  create
else
  show "${TPU[@]}" describe "$NAME" "${GCLOUD_AT[@]}" --format='value(state)'
  if state="$("${TPU[@]}" describe "$NAME" "${GCLOUD_AT[@]}" --format='value(state)' 2>/dev/null)"; then
    echo "TPU VM $NAME is $state"
    case "$state" in
      PREEMPTED|TERMINATED) run "${TPU[@]}" delete "$NAME" "${GCLOUD_AT[@]}" --quiet; create ;;
      STOPPED) run "${TPU[@]}" start "$NAME" "${GCLOUD_AT[@]}" ;;
    esac
  else
    create
  fi
fi

SSH_ALL=("${TPU[@]}" ssh "$NAME" "${GCLOUD_AT[@]}" --worker=all)

# 2. Install the project on every worker: the source tree stays in $REMOTE_DIR because configs/ live there.
if ((SKIP_INSTALL == 0)); then
  install_cmd="cd && python3 -m pip install -q --upgrade pip && python3 -m pip install -e ./conret_jax'[tpu]'"
  if [[ "$REPO" =~ ^(git\+|https?://|ssh://|git@) ]]; then
    url="${REPO#git+}"
    clone=(git clone --depth=1)
    [[ -z "$REF" ]] || clone+=(--branch="$REF")
    run "${SSH_ALL[@]}" --command="rm -rf $REMOTE_DIR && $(quote "${clone[@]}" "$url") $REMOTE_DIR && $install_cmd"
  else
    [[ -d "$REPO" || $DRY_RUN -eq 1 ]] || die "--repo $REPO is neither a directory nor a git URL"
    tarball="${TMPDIR:-/tmp}/conret_jax_src_${NAME}.tgz"
    run tar -C "$REPO" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=venv --exclude=.venv -czf "$tarball" .
    run "${TPU[@]}" scp "$tarball" "$NAME:conret_jax_src.tgz" "${GCLOUD_AT[@]}" --worker=all
    unpack="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf conret_jax_src.tgz -C $REMOTE_DIR"
    run "${SSH_ALL[@]}" --command="$unpack && $install_cmd"
  fi
fi

# 3. Train: the same command on all workers; gcloud streams every worker's output here.
train=(conret-train --config="$CONFIG" --workdir="$WORKDIR" "${TRAIN_ARGS[@]}")
rc=0
# pip installs for the user on TPU VMs, so conret-train lands in ~/.local/bin (expanded on the workers).
# shellcheck disable=SC2016
user_path='export PATH="$HOME/.local/bin:$PATH"'
run "${SSH_ALL[@]}" --command="cd $REMOTE_DIR && $user_path && $(quote "${train[@]}")" || rc=$?

# 4. Teardown, also after a failed run (the checkpoints are in the bucket).
if ((TEARDOWN)); then
  run "${TPU[@]}" delete "$NAME" "${GCLOUD_AT[@]}" --quiet
fi
exit "$rc"
