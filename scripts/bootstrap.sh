#!/usr/bin/env bash
# Install what is missing on a fresh Debian machine (root, apt and pip
# reachable): Java + ActiveMQ Classic from Debian, a virtualenv .venv with the
# pinned packages, and a virtualenv .venv-peers with the real peers (iDDS's
# transceiver, idds-prompt's transformer) the tests and the demo run. Safe to
# run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/activemq/bin/activemq.jar ] || ! command -v java >/dev/null; then
  echo "bootstrap: installing ActiveMQ (Debian package activemq)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends activemq >/dev/null
fi

# The integration tests' Prefect server on PostgreSQL (SWF_TEST_PREFECT_DATABASE=
# postgresql): Debian's server binaries; the tests make their own cluster.
if [ "${SWF_TEST_PREFECT_DATABASE:-}" = postgresql ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "bootstrap: installing PostgreSQL (Debian package postgresql)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# Reinstall only when a dependency list changed (the product's or the testbed's).
stamp=.venv/.swf-installed
want=$(cat pyproject.toml testbed/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python packages into .venv" >&2
  # One pip call, so the `testbed` extra resolves to the checkout's testbed/
  # (the simulators, launchers and demo; never in the image), not a registry.
  # The product first: named second, pip 23 looks for the testbed's
  # requirement on swf-panda-workers in the registry and fails.
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,testbed]" -e ./testbed
  echo "$want" > "$stamp"
fi

# The real peers, apart: idds-server pins its own SQLAlchemy/Flask stack.
if [ ! -x .venv-peers/bin/python ]; then
  echo "bootstrap: creating .venv-peers" >&2
  "$PYTHON" -m venv .venv-peers
fi
peers_stamp=.venv-peers/.swf-installed
peers_want=$(sha256sum scripts/real-peers-requirements.txt | cut -d' ' -f1)
if [ "$(cat "$peers_stamp" 2>/dev/null)" != "$peers_want" ]; then
  echo "bootstrap: installing the real peers into .venv-peers" >&2
  .venv-peers/bin/pip install -q --disable-pip-version-check -r scripts/real-peers-requirements.txt
  echo "$peers_want" > "$peers_stamp"
fi
