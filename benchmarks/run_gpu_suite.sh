#!/usr/bin/env bash
# Run the GPU suite on a GPU machine that has no network, from the repository root:
#     bash benchmarks/run_gpu_suite.sh OUT_DIR [gpu_suite.py options]
# Installs the wheels of `make gpu-wheels` (carried in .whl/) offline into a private folder, then
# runs benchmarks/gpu_suite.py. Without .whl/ the parts that need those packages report them missing.
set -uo pipefail
out="${1:?usage: bash benchmarks/run_gpu_suite.sh OUT_DIR [gpu_suite.py options]}"
shift
site="${DLM_GPU_SITE:-/tmp/dlm_gpu_site}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed: run make gpu-wheels again"; exit 2; }
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "note: no .whl/ folder: run 'make gpu-wheels' on a CPU machine and carry .whl; the fit part will report what is missing"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_suite.py --out "$out" "$@"
