#!/usr/bin/env bash
# Local Prefect for real: `flows/local.sh up` starts a server on 127.0.0.1 with its state in
# $PREFECT_HOME (default .prefect/ in the project), creates the `gpu` process pool and the `gpu`
# concurrency limit, deploys prefect.yaml and starts a worker, and writes $PREFECT_HOME/env.sh
# (`source .prefect/env.sh`: every `prefect` command then talks to this server, not to an empty
# ephemeral one); `flows/local.sh down` stops the server and the worker by their process ids.
# PREFECT_PORT (default 4200) picks the port; CLIC_GPU_SLOTS (default 1) the size of the `gpu` limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=$(pwd)
BIN=${CLIC_BIN:-$PROJECT/.venv/bin}
export PREFECT_HOME=${PREFECT_HOME:-$PROJECT/.prefect}
PORT=${PREFECT_PORT:-4200}
GPUS=${CLIC_GPU_SLOTS:-1}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false
export CLIC_PROJECT_DIR=$PROJECT PATH=$BIN:$PATH
mkdir -p "$PREFECT_HOME"

stop() {  # stop the process whose id is in file $1, then its children
  local f=$1
  if [ -f "$f" ]; then
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  fi
}

case "${1:-}" in
  up)
    if [ -f "$PREFECT_HOME/server.pid" ] && kill -0 "$(cat "$PREFECT_HOME/server.pid")" 2>/dev/null; then
      echo "server already running (pid $(cat "$PREFECT_HOME/server.pid"))"
    else
      # leases of the `gpu` slots on disk ($PREFECT_HOME/concurrency_leases), not in the server's memory:
      # Prefect's default keeps them in memory, so a server restarted while a cell held a slot lost the
      # lease, never freed the slot, and every later run waited for it forever; on disk, a dead holder's
      # lease expires (60 s, flows/pipeline.py) and the server's repossessor frees its slot
      PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem \
        setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
      echo $! >"$PREFECT_HOME/server.pid"
      for i in $(seq 240); do
        curl -sf "http://127.0.0.1:$PORT/api/health" >/dev/null && break
        kill -0 "$(cat "$PREFECT_HOME/server.pid")" 2>/dev/null || { cat "$PREFECT_HOME/server.log"; exit 1; }
        sleep 0.5
      done
      curl -sf "http://127.0.0.1:$PORT/api/health" >/dev/null || { echo "server did not start"; exit 1; }
    fi
    # their advice ("start a worker", "run prefect gcl inspect") is moot here: the worker starts below
    if ! "$BIN/prefect" work-pool inspect gpu >/dev/null 2>&1; then
      "$BIN/prefect" work-pool create gpu --type process >"$PREFECT_HOME/pool.log" 2>&1 \
        || { cat "$PREFECT_HOME/pool.log"; exit 1; }
      echo "created work pool gpu (process)"
    fi
    if ! "$BIN/prefect" global-concurrency-limit inspect gpu >/dev/null 2>&1; then
      "$BIN/prefect" global-concurrency-limit create gpu --limit "$GPUS" >"$PREFECT_HOME/limit.log" 2>&1 \
        || { cat "$PREFECT_HOME/limit.log"; exit 1; }
      echo "created concurrency limit gpu ($GPUS slot(s))"
    fi
    if ! "$BIN/prefect" --no-prompt deploy --all >"$PREFECT_HOME/deploy.log" 2>&1; then
      cat "$PREFECT_HOME/deploy.log"; exit 1
    fi
    grep -o "Deployment '[^']*' successfully created" "$PREFECT_HOME/deploy.log" | sed 's/^/deployed: /' || true
    if [ -f "$PREFECT_HOME/worker.pid" ] && kill -0 "$(cat "$PREFECT_HOME/worker.pid")" 2>/dev/null; then
      echo "worker already running (pid $(cat "$PREFECT_HOME/worker.pid"), pool gpu)"
    else
      setsid "$BIN/prefect" worker start --pool gpu --name "gpu-$(hostname)" >"$PREFECT_HOME/worker.log" 2>&1 &
      echo $! >"$PREFECT_HOME/worker.pid"
      echo "worker started (pid $!, pool gpu, log $PREFECT_HOME/worker.log)"
    fi
    echo "export PREFECT_API_URL=$PREFECT_API_URL" >"$PREFECT_HOME/env.sh"
    echo "Prefect UI and API: http://127.0.0.1:$PORT (state in $PREFECT_HOME)"
    echo "point your shell's prefect commands at it (else they talk to an empty ephemeral server):"
    echo "  export PREFECT_API_URL=$PREFECT_API_URL      # or: source $PREFECT_HOME/env.sh"
    echo "run:  prefect deployment run pretrain/clicv2 --param overrides='{\"epochs\": 1}'"
    ;;
  down)
    stop "$PREFECT_HOME/worker.pid"
    stop "$PREFECT_HOME/server.pid"
    echo "stopped"
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
