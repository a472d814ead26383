#!/usr/bin/env bash
# Install what is missing, lint, then run every test: the unit tests and the
# integration tests (which start their own ActiveMQ broker and Prefect server
# on private ports). Extra arguments go to pytest (e.g. -m "not integration").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
