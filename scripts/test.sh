#!/usr/bin/env bash
# Install what is missing, run the checks, then run every test: the unit tests
# and the integration tests (which start their own ActiveMQ broker and Prefect
# server on private ports). Extra arguments go to pytest (e.g. -m "not integration").
# The checks (the same as .pre-commit-config.yaml's) each fail the script:
# lint, formatting, types, the import rules (pyproject.toml's
# [tool.importlinter]) and declared dependencies (deptry).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/deptry .
(cd testbed && ../.venv/bin/deptry .)  # the testbed distribution declares its own
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
