#!/usr/bin/env bash
# Multi-node training on any cluster, with the process layout given explicitly (no Slurm/MPI/TPU detection).
#
# Either run this host's process (do the same on every node, each with its own --process_id):
#   launch/multinode_example.sh --coordinator=node0:12355 --num_processes=2 --process_id=0 \
#       --config=configs/FILE.py --workdir=/shared/run [--dry-run] [-- EXTRA conret-train ARGS...]
# or start one process per host over ssh from one machine (the first host is the coordinator):
#   launch/multinode_example.sh --hosts=node0,node1 [--port=12355] [--remote_dir=DIR] \
#       --config=configs/FILE.py --workdir=/shared/run [--dry-run] [-- EXTRA ARGS...]
#
# conret-train gets --coordinator_address, --num_processes, --process_id. Every process must see the same
# --workdir (a shared file system or gs://) and the same data. --remote_dir is where the project checkout is on
# the hosts (default: this checkout's path). With --hosts, the first failing process makes the script stop the
# other ssh sessions and exit non-zero. --dry-run prints each command ("+ ..." per line) and runs nothing.
set -euo pipefail

COORDINATOR="" NUM_PROCESSES="" PROCESS_ID="" HOSTS="" PORT=12355 CONFIG="" WORKDIR=""
REMOTE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
TRAIN_ARGS=()

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

while (($# > 0)); do
  arg="$1"; shift
  case "$arg" in
    --) TRAIN_ARGS+=("$@"); break ;;
    --dry-run) DRY_RUN=1; continue ;;
    -h|--help) usage; exit 0 ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*) (($# > 0)) || die "$arg needs a value"; key="$arg"; value="$1"; shift ;;
    *) die "unexpected argument '$arg' (conret-train arguments go after --)" ;;
  esac
  case "$key" in
    --coordinator) COORDINATOR="$value" ;;
    --num_processes) NUM_PROCESSES="$value" ;;
    --process_id) PROCESS_ID="$value" ;;
    --hosts) HOSTS="$value" ;;
    --port) PORT="$value" ;;
    --remote_dir) REMOTE_DIR="$value" ;;
    --config) CONFIG="$value" ;;
    --workdir) WORKDIR="$value" ;;
    *) die "unknown flag $key (see --help)" ;;
  esac
done
[[ -n "$CONFIG" && -n "$WORKDIR" ]] || die "--config and --workdir are required"

# The conret-train command of process $1 of $2, coordinated by $3.
train_cmd() {
  TRAIN=(conret-train --config="$CONFIG" --workdir="$WORKDIR" --coordinator_address="$3" --num_processes="$2"
         --process_id="$1" "${TRAIN_ARGS[@]}")
}

if [[ -z "$HOSTS" ]]; then
  [[ -n "$COORDINATOR" && -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] ||
    die "give --coordinator, --num_processes and --process_id (or --hosts)"
  train_cmd "$PROCESS_ID" "$NUM_PROCESSES" "$COORDINATOR"
  show "${TRAIN[@]}"
  ((DRY_RUN)) || exec "${TRAIN[@]}"
  exit 0
fi

# Runs "$@" (an ssh command) with its output prefixed by "[$1] "; a TERM/INT stops the ssh client, and with it
# (-tt: the remote command has a terminal, which hangs up) the remote process. The trap is set before the client
# starts, so a TERM that comes while it starts still stops it.
run_prefixed() {
  local label="$1"; shift
  local child='' stop=0
  trap 'stop=1; if [[ -n "$child" ]]; then kill "$child" 2>/dev/null || true; fi' INT TERM
  "$@" > >(sed -u "s/^/[$label] /") 2>&1 &
  child=$!
  if ((stop)); then kill "$child" 2>/dev/null || true; fi
  wait "$child"
}

IFS=, read -r -a HOST_LIST <<< "$HOSTS"
n=${#HOST_LIST[@]}
COORDINATOR="${COORDINATOR:-${HOST_LIST[0]}:$PORT}"
pids=()
for i in "${!HOST_LIST[@]}"; do
  train_cmd "$i" "$n" "$COORDINATOR"
  ssh_cmd=(ssh -tt "${HOST_LIST[$i]}" "cd $(quote "$REMOTE_DIR") && $(quote "${TRAIN[@]}")")
  show "${ssh_cmd[@]}"
  if ((DRY_RUN == 0)); then
    run_prefixed "${HOST_LIST[$i]}" "${ssh_cmd[@]}" &
    pids+=("$!")
  fi
done
((DRY_RUN == 0)) || exit 0

# Wait for all (wait -n needs bash >= 5.1); the first failure stops the rest.
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
rc=0
while ((${#pids[@]} > 0)); do
  status=0
  wait -n "${pids[@]}" || status=$?
  if ((status != 0 && rc == 0)); then
    rc=$status
    echo "multinode_example.sh: a process failed ($status): stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
  fi
  alive=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
  done
  pids=("${alive[@]}")
done
exit "$rc"
