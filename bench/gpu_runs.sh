#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md asks for, in groups that each fit one 10-minute call of a
# lent GPU machine (the device tool: `run`, 30 minutes of device time per session).
#
#   here, once:        bash bench/gpu_runs.sh --download-wheels   # fills .whl/ (git-ignored)
#   on the GPU, e.g.:  run(command="bash bench/gpu_runs.sh attention transformer", carry=[".whl"])
#
# Each group writes $OUT/<group>.txt (or ./gpu_runs/ without $OUT); record the printed figures
# with device, versions and date in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks (its package list: /work/.library/device/KINDS.md); pure-Python wheels.
WHEELS=(diffusers==0.42.1 flax==0.12.12 ml_collections==1.1.0 ftfy==6.3.1 wcwidth==0.9.4)
GROUPS_ALL=(attention transformer vae generate convert)

if [[ "${1:-}" == "--download-wheels" ]]; then
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${WHEELS[@]}"
fi
if [[ $# -eq 0 ]]; then
    echo "usage: bash bench/gpu_runs.sh --download-wheels | GROUP... (${GROUPS_ALL[*]})" >&2
    exit 2
fi

OUT="${OUT:-gpu_runs}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1

run_group() {
    case "$1" in
        attention) python3 bench/attention.py ;;
        transformer) python3 bench/transformer.py --config helios_14b --latent-size 9,48,80 --dtype bfloat16 \
                         --attention xla,cudnn,pallas_gpu,auto --torch-baseline ;;
        vae) python3 bench/vae.py --config wan2.1 --resolution 384x640 --dtype bfloat16 --torch-baseline &&
             python3 bench/vae.py --config wan2.1 --resolution 384x640 --dtype float32 --torch-baseline ;;
        generate) python3 bench/generate.py --config helios_14b --vae wan2.1 --text umt5_xxl --variant distilled \
                      --height 384 --width 640 --num-frames 240 --dtype bfloat16 --torch-baseline ;;
        convert) python3 bench/convert.py ;;
        *) echo "gpu_runs: unknown group $1 (one of ${GROUPS_ALL[*]})" >&2; return 2 ;;
    esac
}

status=0
for group in "$@"; do
    {
        echo "== $group  $(date -u +%FT%TZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
        python3 -c 'import jax, flax, torch; print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, jax.devices())'
        run_group "$group"
    } 2>&1 | tee "$OUT/$group.txt"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
exit $status
