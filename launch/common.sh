#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run): errors, usage from the script's header comment, and
# printing commands so that they read well and paste back into a shell.

# The script that sourced this file.
LAUNCH_SCRIPT="${BASH_SOURCE[-1]}"

die() { echo "$(basename "$LAUNCH_SCRIPT"): $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$LAUNCH_SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# Shell-quotes each argument only where needed.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
show() { echo "+ $(quote "$@")"; }
