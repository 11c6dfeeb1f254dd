#!/usr/bin/env bash
# The main command: set up (system packages, .venv), then run `tele demo`. Arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tele demo "$@"
