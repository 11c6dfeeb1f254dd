#!/usr/bin/env bash
# The test command: set up (system packages, .venv), then lint, type-check and run the suite.
# Extra arguments go to pytest. A run that collects no test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff check"; ruff check src tests bench scripts
echo "== ruff format --check"; ruff format --check src tests bench scripts
echo "== mypy --strict src/"; mypy --strict src/
# The images the sandbox serves (tele's, echo, ...): built once into the image cache the tests
# share, so that no test waits for a first build (mmdebstrap + pip, about a minute).
echo "== tele image build --sandbox"
tele image build --sandbox >/dev/null || echo "test.sh: images not built; tests that need them build them"
echo "== pytest"
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
