#!/usr/bin/env bash
# The test suite: sets up the environment, then runs pytest (extra arguments go to pytest).
#   bash scripts/test.sh                # all tests
#   bash scripts/test.sh -k quant -x    # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=${QPLUGIN_VENV:-.venv}
exec "$venv/bin/python" -m pytest tests "$@"
