#!/usr/bin/env bash
# The whole deployment on one machine (127.0.0.1): certificates and node keys, a SuperLink with
# TLS and SuperNode authentication, N participant + M held-out SuperNodes (registered), one
# SuperNode with an unregistered key (must be refused), the training app, then the zero-shot app
# on its checkpoint. Stops only the processes it started (trap on exit).
#   deploy/loopback.sh [--work DIR] [--participants 3] [--heldout 1] [--rounds 1] [--preset tiny]
#                      [--keep-running] [-- extra training run-config, e.g. 'train.lr=0.1']
# --work DIR (default: a new temporary directory) receives certs/, keys/, logs/, outputs/ and
# supernodes.json (the SuperLink's node list after the runs), unregistered.txt (how the
# unregistered node ended). Exit 0 only if both runs are finished:completed and the unregistered
# node was refused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/loopback.sh [--work DIR] [--participants N] [--heldout M] [--rounds R] [--preset NAME] [--keep-running] [-- RUN_CONFIG]"
work="" participants=3 heldout=1 rounds=1 preset=tiny keep=false extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) need_value "$1" "${2:-}"; work="$2"; shift 2 ;;
    --participants) need_value "$1" "${2:-}"; participants="$2"; shift 2 ;;
    --heldout) need_value "$1" "${2:-}"; heldout="$2"; shift 2 ;;
    --rounds) need_value "$1" "${2:-}"; rounds="$2"; shift 2 ;;
    --preset) need_value "$1" "${2:-}"; preset="$2"; shift 2 ;;
    --keep-running) keep=true; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "loopback.sh: unknown argument '$1' ($usage)" ;;
  esac
done
for v in participants heldout rounds; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "loopback.sh: --$v needs an integer, got '${!v}'"
done
(( participants >= 1 )) || die "loopback.sh: --participants must be >= 1"
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
command -v ssh-keygen >/dev/null || die "ssh-keygen not found (apt-get install openssh-client)"

work="${work:-$(mktemp -d "${TMPDIR:-/tmp}/hfz-deploy-XXXXXX")}"
mkdir -p "$work/logs" "$work/outputs"
work="$(cd "$work" && pwd)"
total=$((participants + heldout))
export FLWR_HOME="$work/cli"   # the flwr CLI's connections: private to this deployment
conn=loopback

# --- processes we start: each in its own session (process group), stopped on exit -------------
pids=()
start_bg() {  # start_bg LOGFILE CMD...: run CMD in a new session, remember its PID
  local log="$1"; shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  pids+=("$!")
}
alive_in_groups() {  # true while a process (not a zombie) is left in one of these process groups
  ps -e -o pgid=,stat= | awk -v groups=" $* " \
    'index(groups, " " $1 " ") && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}
cleanup() {
  local rc=$?
  if [[ "$keep" == true && $rc -eq 0 ]]; then
    echo "still running (PIDs ${pids[*]}); stop with: kill -TERM -- -PID for each"
    return
  fi
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 100); do  # up to 20 s for a clean shutdown, then SIGKILL what is left
    alive_in_groups "${pids[@]}" || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. certificates and keys --------------------------------------------------------------------
"$DEPLOY_DIR/make_certs.sh" "$work/certs" localhost >/dev/null
names=()
for ((i = 0; i < total; i++)); do names+=("node-$i"); done
"$DEPLOY_DIR/make_node_keys.sh" "$work/keys" "${names[@]}" unregistered >/dev/null
echo "certificates in $work/certs, node keys in $work/keys"

# --- 2. SuperLink (TLS + SuperNode authentication) -----------------------------------------------
port="$(free_port)"
start_bg "$work/logs/superlink.log" env FLWR_HOME="$work/superlink/flwr-home" \
  "$DEPLOY_DIR/superlink.sh" --certs "$work/certs" \
  --host 127.0.0.1 --port "$port" --state-dir "$work/superlink"
python3 - "$port" "$work/certs/ca.crt" <<'PY' || die "SuperLink not healthy on 127.0.0.1:$port (log: $work/logs/superlink.log)"
import ssl, sys, time, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"https://127.0.0.1:{sys.argv[1]}/health", context=ctx, timeout=2).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.3)
sys.exit(1)
PY
echo "SuperLink (TLS, --enable-supernode-auth) on 127.0.0.1:$port"
"$DEPLOY_DIR/connect.sh" "$conn" "127.0.0.1:$port" "$work/certs/ca.crt" >/dev/null

# --- 3. register the nodes' public keys, start the SuperNodes ------------------------------------
pubs=()
for name in "${names[@]}"; do pubs+=("$work/keys/$name.pub"); done
"$DEPLOY_DIR/register_nodes.sh" "$conn" "${pubs[@]}"
for ((i = 0; i < total; i++)); do
  args=(--superlink "127.0.0.1:$port" --ca "$work/certs/ca.crt" --key "$work/keys/node-$i"
        --partition-id "$i" --num-partitions "$total" --name "node-$i"
        --port "$(free_port)" --home "$work/nodes/node-$i")
  (( i >= participants )) && args+=(--held-out)
  start_bg "$work/logs/node-$i.log" "$DEPLOY_DIR/supernode.sh" "${args[@]}"
done
echo "SuperNodes: partitions 0..$((participants - 1)) participate, $participants..$((total - 1)) held out"

# --- 4. a SuperNode with a key the SuperLink does not know: must be refused ----------------------
start_bg "$work/logs/unregistered.log" "$DEPLOY_DIR/supernode.sh" --superlink "127.0.0.1:$port" \
  --ca "$work/certs/ca.crt" --key "$work/keys/unregistered" --partition-id 0 \
  --num-partitions "$total" --port "$(free_port)" --home "$work/nodes/unregistered" \
  -- --max-retries 0
intruder="${pids[-1]}"

# --- 5. the training app, then the zero-shot app on its checkpoint -------------------------------
run_cfg="preset=\"$preset\" run.rounds=$rounds run.output_dir=\"$work/outputs\" train.torch_threads=1"
run_cfg="$run_cfg data.num_participants=$participants data.num_heldout=$heldout ${extra[*]:-}"
started=$SECONDS
if ! "$DEPLOY_DIR/run_training.sh" "$conn" --run-config "$run_cfg" 2>&1 | tee "$work/logs/training.log"; then
  die "the training run did not complete (logs in $work/logs)"
fi
echo "training: $((SECONDS - started)) s"
run_name="$(basename "$(ls -dt "$work/outputs"/*/ | grep -v zeroshot | head -n 1)")"
started=$SECONDS
if ! "$DEPLOY_DIR/run_zeroshot.sh" "$conn" --run-config \
    "run-name=\"$run_name\" output-dir=\"$work/outputs\" train.torch_threads=1" 2>&1 \
    | tee "$work/logs/zeroshot.log"; then
  die "the zero-shot run did not complete (logs in $work/logs)"
fi
echo "zero-shot: $((SECONDS - started)) s"

# --- 6. what the SuperLink knows, and how the unregistered node ended ----------------------------
flwr supernode ls "$conn" --format json > "$work/supernodes.json" 2>/dev/null || true
if alive_in_groups "$intruder"; then
  echo "running" > "$work/unregistered.txt"
  die "the SuperNode with an unregistered key is still running (log: $work/logs/unregistered.log)"
fi
wait "$intruder" && code=0 || code=$?
echo "exited $code" > "$work/unregistered.txt"
(( code != 0 )) || die "the SuperNode with an unregistered key exited 0 (log: $work/logs/unregistered.log)"
echo "unregistered SuperNode refused (exit $code): $(grep -m1 -iE 'fail|denied|refus|unauth' "$work/logs/unregistered.log" || echo see log)"
echo "outputs in $work/outputs; logs in $work/logs"
