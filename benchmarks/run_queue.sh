#!/bin/bash
# Run benchmark commands one after another (2 cores: parallel runs double every timing).
#   bash benchmarks/run_queue.sh QUEUE_FILE
# Each line of QUEUE_FILE is "LOG_NAME<TAB>COMMAND" (run from the repository root, in .venv); a line is re-read
# when the previous command ends, so lines may be appended while the queue runs. Finished lines are recorded
# in QUEUE_FILE.done and skipped on a restart. Blank lines and lines starting with # are ignored. Commands hold
# the lock file $QUEUE_LOCK (default /tmp/metaad_bench.lock) while they run; a second queue of quality-only runs
# at 1 thread may take another lock (its timings are then those of a shared machine: say so).
cd "$(dirname "$0")/.." || exit 1
queue=$1
touch "$queue.done"
while true; do
  line=$(grep -v -e '^#' -e '^$' "$queue" | grep -v -x -F -f "$queue.done" | head -n 1)
  [ -z "$line" ] && break
  log=${line%%$'\t'*}; command=${line#*$'\t'}
  echo "$(date -u +%FT%TZ) start $log" >> "$queue.status"
  flock "${QUEUE_LOCK:-/tmp/metaad_bench.lock}" bash -c ". .venv/bin/activate && $command" >> "benchmarks/logs/$log.log" 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) end $log rc=$rc" >> "$queue.status"
  echo "$line" >> "$queue.done"
done
