#!/usr/bin/env bash
# Create the project's virtual environment with everything the tests need.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"

# System tools the test-suite uses: nginx (download benchmark origin), promtool and a
# Prometheus server (config/rule checks, scrape test), docker-compose (compose validation).
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: please install ${need[*]} (Debian/Ubuntu: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch is pinned for tests to the CPU build; the package itself accepts a range.
"$venv/bin/python" -m pip install -q -c requirements/ci-constraints.txt torch
"$venv/bin/python" -m pip install -q -c requirements/ci-constraints.txt -c docker/requirements.lock -e ".[dev,gpt2,parquet]"
touch "$venv/.installed"
echo "setup: environment ready in $venv"
