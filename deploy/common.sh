# Sourced by the deploy/ scripts: repository paths, Flower binaries, one-line errors.
# shellcheck shell=bash
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

die() { echo "error: $*" >&2; exit 2; }
need_file() { [[ -f "$1" ]] || die "$2: no file at $1"; }
need_value() { [[ -n "${2:-}" ]] || die "$1 needs a value"; }

# Flower's binaries: $HFZ_VENV/bin (default: the repository's .venv), else whatever is on PATH.
# The SuperLink and the SuperNode spawn `flower-superexec` BY NAME: that directory goes first.
HFZ_VENV="${HFZ_VENV:-$REPO_DIR/.venv}"
if [[ -x "$HFZ_VENV/bin/flwr" ]]; then
  export PATH="$HFZ_VENV/bin:$PATH"
fi
command -v flwr >/dev/null || die "flwr not found (set HFZ_VENV to the virtualenv holding flwr 1.42)"
# Runtime dependency installation would `uv sync` a CUDA torch per run: never.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# run_and_check APP_DIR CONNECTION [flwr run flags...]: submit the app, stream its log until it
# ends, exit non-zero unless its status is finished:completed (`flwr run` itself exits 0 for a
# failed run). Prints "run <id>: <status>" as the last line.
run_and_check() {
  local app="$1" connection="$2"; shift 2
  [[ -f "$app/pyproject.toml" ]] || die "no Flower app at $app (pyproject.toml missing)"
  local submitted run_id status
  submitted="$(cd "$app" && flwr run . "$connection" --format json "$@" 2>&1)" || true
  run_id="$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["run-id"])' \
    <<<"$submitted" 2>/dev/null)" || die "flwr run did not start a run: $(tail -n 3 <<<"$submitted")"
  echo "run $run_id submitted ($app -> $connection)"
  flwr log "$run_id" "$connection" --stream || true
  status="$(flwr ls "$connection" --run-id "$run_id" --format json 2>/dev/null | python3 -c \
    'import json,sys; r=json.load(sys.stdin)["runs"][0]; print(r["status"], r.get("status-details", ""))')" \
    || die "flwr ls could not read run $run_id"
  echo "run $run_id: $status"
  [[ "$status" == finished:completed* ]]
}
