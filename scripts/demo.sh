#!/usr/bin/env bash
# Install what is missing, then run a whole session on this machine: broker,
# Prefect server, runner, listener and simulated peers. Options go to
# `swf-panda-workers-demo`, the testbed's command (e.g. --runs 3 --shape seed --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/swf-panda-workers-demo "$@"
