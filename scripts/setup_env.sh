#!/usr/bin/env bash
# Create the project's virtual environment.
#
#   scripts/setup_env.sh [VENV_DIR]                     Python only: enough for `make demo`
#   scripts/setup_env.sh --with-test-tools [VENV_DIR]   also nginx, promtool/prometheus and
#                                                       docker-compose, which the tests use
#   scripts/setup_env.sh --test-tools-only              only the system tools (make test)
#   scripts/setup_env.sh --dry-run ...                  print what would be done
#
# torch: the CPU build. When https://download.pytorch.org/whl/cpu answers (a 5 s probe), torch
# comes from there (a ~200 MB wheel instead of ~2.7 GB of CUDA wheels); otherwise from the
# indexes pip is configured with (a local wheel house or mirror that offers the CPU build).
# TPLR_TORCH_INDEX_URL overrides the probe.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=0 venv_wanted=1 dry=0 venv=".venv"
for arg in "$@"; do
  case "$arg" in
    --with-test-tools) tools=1 ;;
    --test-tools-only) tools=1 venv_wanted=0 ;;
    --dry-run) dry=1 ;;
    -*) echo "setup: unknown option $arg" >&2; exit 2 ;;
    *) venv="$arg" ;;
  esac
done

run() {
  if [ "$dry" = 1 ]; then echo "would run: $*"; else "$@"; fi
}

install_test_tools() {
  # nginx (download benchmark origin), promtool and a Prometheus server (rule tests, live
  # scrape test), docker-compose (compose validation). Not needed by `make demo`.
  local need=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the test tools ${need[*]} with apt-get"
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "setup: the tests need ${need[*]} (Debian/Ubuntu: sudo apt-get install ${need[*]})" >&2
    [ "$dry" = 1 ] || exit 1
  fi
}

torch_index() {
  if [ -n "${TPLR_TORCH_INDEX_URL:-}" ]; then
    echo "$TPLR_TORCH_INDEX_URL"
  elif python3 - <<'EOF' 2>/dev/null
import urllib.request
urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=5).close()
EOF
  then
    echo "https://download.pytorch.org/whl/cpu"
  fi
}

[ "$tools" = 1 ] && install_test_tools
[ "$venv_wanted" = 1 ] || exit 0

pip="$venv/bin/python -m pip"
run python3 -m venv "$venv"
run $pip install -q --upgrade pip
index="$(torch_index)"
constraints=(-c requirements/ci-constraints.txt -c docker/requirements.lock)
if [ -n "$index" ]; then
  echo "setup: torch (CPU build) from $index"
  run $pip install -q "${constraints[@]}" --index-url "$index" \
    --extra-index-url https://pypi.org/simple torch
else
  echo "setup: torch from the configured package indexes (download.pytorch.org/whl/cpu unreachable)"
  run $pip install -q "${constraints[@]}" torch
fi
run $pip install -q "${constraints[@]}" -e ".[dev,gpt2,gpu,parquet]"
run touch "$venv/.installed"
echo "setup: environment ready in $venv"
