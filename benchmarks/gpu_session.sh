#!/usr/bin/env bash
# GPU timings for BENCHMARKS.md, run on a lent GPU machine through the workplace's device tool.
#
#   bash benchmarks/gpu_session.sh a|b|c OUTDIR
#
# Stage a: the main job (predict on the bundled example), refinement of the stand-in frame
# (cold compilation cache, then warm), `amortize bench predict`, `bench train`, `bench refine`.
# Stage b: the held-out simulated scenes of the refinement issue (simulate, predict, refine,
# evaluate both).
# Stage c: the program store on the GPU: whole `amortize predict` and `amortize refine`
# processes, three of each (the first with an empty cache), with the store on and then off.
#
# That machine has no network, so it runs on its own JAX (the CUDA build) and, installed from
# wheels carried in `.whl/` (`pip download` them here), the versions of flax, optax,
# orbax-checkpoint, numpyro and tensorboardX this project is tested with. The stand-in frame
# comes from `python benchmarks/standin_frames.py .gpu`, carried in `.gpu/` (never committed:
# it is made from ../shared). Each step has its own time limit, so one slow step costs only
# itself; every output lands in OUTDIR as it is made.
set -uo pipefail
stage=${1:?stage a, b or c}
out=${2:?output directory}
mkdir -p "$out"
logs=/tmp/gpu-logs  # the device tool brings back at most 8 files: only bench lines and JSONs go to OUTDIR
mkdir -p "$logs"
cd "$(dirname "$0")/.."

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export AMORTIZE_CACHE_DIR=/tmp/amortize-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m amortize.cli "$@"\n' >/tmp/bin/amortize
chmod +x /tmp/bin/amortize
export PATH=/tmp/bin:$PATH

timed() {  # timed LIMIT_S NAME CMD...: run, log its output and wall time
    local limit=$1 name=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" >"$logs/$name.out" 2>&1
    local rc=$?
    echo "== $name: rc=$rc wall=$((SECONDS - t0)) s"
    tail -n 6 "$logs/$name.out"
    case $name in bench_*) cp "$logs/$name.out" "$out/" ;; esac
}

case $stage in
a)
    nvidia-smi -L
    python3 -c "import jax, jaxlib, flax, optax, numpyro, orbax.checkpoint as o; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'numpyro', numpyro.__version__, 'orbax', o.__version__); print(jax.devices())"
    nproc
    timed 120 predict_example amortize predict examples/simulated_512x384.png --out /tmp/ex --force --quiet
    timed 120 predict_example_warm amortize predict examples/simulated_512x384.png --out /tmp/ex --force --quiet
    for run in cold warm; do
        timed 180 "refine_standin_$run" amortize refine .gpu/proxy_full.png --out /tmp/standin \
            --device gpu --quiet --force
        cp /tmp/standin/proxy_full.json "$out/refine_standin_$run.json"
    done
    timed 150 bench_predict amortize bench predict
    timed 150 bench_train amortize bench train
    timed 200 bench_refine amortize bench refine
    ;;
b)
    timed 120 simulate amortize simulate --out /tmp/heldout5 --n 20 --size 512 384 --seed 20261121 \
        --min-separation 0.5 --force
    timed 120 predict_heldout amortize predict /tmp/heldout5 --out /tmp/h5p --force --quiet \
        --checkpoint checkpoints/simulated
    timed 400 refine_heldout amortize refine /tmp/heldout5 --out /tmp/h5r --device gpu --quiet \
        --force --checkpoint checkpoints/simulated
    timed 60 evaluate_predict amortize evaluate --pred /tmp/h5p --truth /tmp/heldout5 --rmin 2
    timed 60 evaluate_refine amortize evaluate --pred /tmp/h5r --truth /tmp/heldout5 --rmin 2
    python3 - "$out" <<'EOF'
import json, pathlib, statistics, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/h5r").glob("*.json"))]
keys = ("recon_rmse_before", "recon_rmse_after", "steps", "wall_s", "device")
table = [{k: r.get(k) for k in keys} for r in rows]
pathlib.Path(sys.argv[1], "refine_heldout.jsonl").write_text("".join(json.dumps(t) + "\n" for t in table))
walls = [t["wall_s"] for t in table]
print(f"{len(rows)} images; wall_s median {statistics.median(walls):.2f} min {min(walls):.2f} "
      f"max {max(walls):.2f} sum {sum(walls):.1f}; lower on "
      f"{sum(t['recon_rmse_after'] < t['recon_rmse_before'] for t in table)}")
EOF
    ;;
c)
    for store in 1 0; do
        export AMORTIZE_PROGRAM_STORE=$store AMORTIZE_CACHE_DIR=/tmp/amortize-cache-store$store
        for run in 1 2 3; do
            timed 120 "predict_store${store}_$run" amortize predict examples/simulated_512x384.png \
                --out /tmp/ex --force --quiet
            timed 180 "refine_store${store}_$run" amortize refine .gpu/proxy_full.png --out /tmp/standin \
                --device gpu --quiet --force
            python3 -c "import json; d = json.load(open('/tmp/standin/proxy_full.json')); \
print('refine JSON wall_s', d['wall_s'], 'steps', d['steps'], 'recon_rmse_after', d['recon_rmse_after'])"
        done
    done
    ;;
esac
