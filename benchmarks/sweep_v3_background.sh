#!/usr/bin/env bash
# Starts sweep v3 in the background at the lowest priority, from its own clone at the
# protocol's code commit, so that work in this checkout cannot change a running sweep.
# Cells land in this checkout's docs/results/v3/cells/ (commit them as they come), run
# folders in runs/sweep-v3/ (an interrupted cell resumes from there), the log in
# runs/sweep-v3.log. Usage: benchmarks/sweep_v3_background.sh [CLONE_DIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${1:-$repo/../sweep-v3}"
commit=04f932896ee5718d5a2b394d0e0bbe89e3ae8f67  # the commit of docs/results/v3/PROTOCOL.md, which every cell records
if [ ! -d "$clone/.git" ]; then
    git clone -q "$repo" "$clone"
fi
git -C "$clone" checkout -q "$commit"
ln -sfn "$repo/data" "$clone/data"
mkdir -p "$repo/runs"
cd "$clone"
# setsid gives the sweep an autogroup of its own, and the kernel shares the CPU between
# autogroups before it looks at nice: without the autogroup's own nice the sweep takes
# half the machine from the session.
setsid bash -c "echo 19 > /proc/self/autogroup 2>/dev/null || true
    export PYTHONPATH='$clone' OMP_NUM_THREADS=1; unset PYTHONDONTWRITEBYTECODE
    exec nice -n 19 '$repo/.venv/bin/python' benchmarks/sweep_v3.py --results '$repo/docs/results/v3' \
        --runs '$repo/runs/sweep-v3' run --jobs 2" >> "$repo/runs/sweep-v3.log" 2>&1 < /dev/null &
echo "sweep v3 started (process group $!); log: $repo/runs/sweep-v3.log"
