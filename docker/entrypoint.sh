#!/bin/sh
# Start a tplr node in the container.
#
#   NODE_TYPE=miner|validator   which node to run (default miner)
#   NPROC_PER_NODE=N|gpu        processes on this host: 1 runs python, more (or "gpu": one per
#                               visible GPU) runs torchrun --standalone
#
# Arguments that start with "-" are passed to the node (docker compose run miner --help);
# any other command runs as given (docker compose run miner tplr fetch ...; bash).
set -eu

app_dir="${TPLR_APP_DIR:-/app}"
node_type="${NODE_TYPE:-miner}"
nproc="${NPROC_PER_NODE:-1}"

fail() {
    echo "entrypoint: $1" >&2
    exit 2
}

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

case "$node_type" in
    miner | validator) ;;
    *) fail "NODE_TYPE must be 'miner' or 'validator', got '$node_type' (set it in .env)" ;;
esac

case "$nproc" in
    gpu) ;;
    '' | *[!0-9]* | 0*) fail "NPROC_PER_NODE must be a whole number >= 1 or 'gpu', got '$nproc'" ;;
esac

script="$app_dir/neurons/$node_type.py"
[ -f "$script" ] || fail "$script not found (TPLR_APP_DIR=$app_dir is not a tplr checkout)"

if [ "$nproc" = 1 ]; then
    echo "entrypoint: starting the $node_type: python $script $*" >&2
    exec python "$script" "$@"
fi
echo "entrypoint: starting the $node_type on $nproc processes: torchrun $script $*" >&2
exec torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" "$script" "$@"
