#!/usr/bin/env bash
# Run the zero-shot app (zeroshot_app/) against a deployed SuperLink and wait for it.
#   deploy/run_zeroshot.sh CONNECTION [flwr run flags, e.g. -c 'run-name="tiny" output-dir="/abs/outputs"']
# It sends the frozen checkpoint to the nodes whose node config says held-out=true, nothing to
# the others but a role query. Exits 1 unless the run ends finished:completed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/run_zeroshot.sh CONNECTION [flwr run flags]"
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
connection="$1"; shift
run_and_check "$REPO_DIR/zeroshot_app" "$connection" "$@" || exit 1
