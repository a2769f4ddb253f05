#!/usr/bin/env bash
# Run the training app (repository root) against a deployed SuperLink and wait for it.
#   deploy/run_training.sh CONNECTION [flwr run flags, e.g. -c 'preset="tiny" run.rounds=2']
# Use absolute paths in run config (run.output_dir): relative ones resolve against the SuperLink
# process's working directory. Exits 1 unless the run ends finished:completed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/run_training.sh CONNECTION [flwr run flags]"
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
connection="$1"; shift
run_and_check "$REPO_DIR" "$connection" "$@" || exit 1
