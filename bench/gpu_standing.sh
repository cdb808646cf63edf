#!/usr/bin/env bash
# The standing GPU measurements, prepared for a lent GPU machine, most important first; each part side by side with
# torchvision in the same process tree, on the same GPU.
#
#   bash bench/gpu_standing.sh [PART ...]      # default: every part, in this order
#
#   preflight  nvidia-smi, versions, and whether this jaxlib knows conret-train's CPU XLA flag
#   detect     bench/detect_vs_torchvision.py: conret_jax.detect, bf16, 640^2, batch 16 (goal >= 1,000 img/s)
#   step640    bench/step_vs_torchvision.py: RetinaNet, ConRetinaNet, torchvision train steps, bf16, 640^2,
#              batch 16: MFU (goal 35%) and ConRetinaNet / RetinaNet (goal <= 1.03)
#   paper      the same at the COCO recipe's scale (short side 800, long side 1333): MFU (goal 40%)
#   ssd300     bench/ssd_step_vs_torchvision.py: SSD, ConSSD, torchvision ssd300_vgg16, bf16, batch 32
#   ssd512     the same at 512 (no torchvision SSD512 exists): SSD512 img/s and ConSSD / SSD (goal <= 1.05)
#
# Each part runs under its own time limit (the seconds below; PART_TIMEOUT_S sets one for all; on an H100 an R50-FPN
# step compiled in about a minute on 2026-11-25, and step640 and paper compile two) and appends its last output line
# (one JSON object) to $OUT/results.jsonl, its whole output to $OUT/log.txt, so a part that fails or is cut off loses
# only itself. $OUT defaults to ./gpu_standing_out.
# JAX's compilation cache goes to /tmp/jax_cache, so a rerun on the same (warm) machine skips the compiles.
#
# The GPU image has jax, flax, optax, orbax, absl, torch and torchvision but no ml_collections: carry its wheel.
# Once, in the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl ml_collections==1.1.0
# then two device calls on the same machine (it stays warm 30 s after a call), carry [".whl"], timeout_s 600 each:
#   bash bench/gpu_standing.sh preflight detect step640     (limits 60 + 150 + 270 s)
#   bash bench/gpu_standing.sh paper ssd300 ssd512          (limits 270 + 160 + 160 s)
# Whatever a call's limit cuts off is in results.jsonl as rc 124 with no result: name it again in a later call.
# Record what comes back in bench/RESULTS.md with the device, the versions (preflight) and the date.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_standing_out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# conret-train's flags only concern XLA:CPU, and a jaxlib that no longer knows one aborts: preflight checks it.
export CONRET_XLA_DEFAULTS=0
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=${PART_TIMEOUT_S:-$2}
  shift 2
  echo "=== $name: $* (limit $limit s, $(date -u +%H:%M:%S) UTC)" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/part.log" 2>&1
  local rc=$?
  cat "$OUT/part.log" >> "$OUT/log.txt"
  local last
  last=$(grep '^{' "$OUT/part.log" | tail -n 1)
  python3 - "$name" "$rc" "$((SECONDS - start))" "$last" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
name, rc, seconds, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
  result = json.loads(last) if last else None
except ValueError:
  result = None
print(json.dumps({'part': name, 'rc': rc, 'seconds': seconds, 'result': result}))
EOF
  echo "=== $name: rc $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  grep -v '^{' "$OUT/part.log" | tail -n 12
  rm -f "$OUT/part.log"
}

preflight() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import json, os, subprocess, sys
import jax, flax, optax, torch, torchvision
probe = 'import jax; jax.devices("cpu")'
env = dict(os.environ, XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=')
knows_flag = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True).returncode == 0
print(json.dumps({
  'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__, 'torch': torch.__version__,
  'torchvision': torchvision.__version__, 'devices': [str(d) for d in jax.devices()],
  'device_kind': jax.devices()[0].device_kind, 'jaxlib_knows_ynn_fusion_flag': knows_flag,
}))
EOF
}

export -f preflight

ALL=(preflight detect step640 paper ssd300 ssd512)
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${ALL[@]}")
for p in "${PARTS[@]}"; do  # every name checked before anything runs
  [[ " ${ALL[*]} " == *" $p "* ]] || { echo "unknown part $p: expected some of ${ALL[*]}" >&2; exit 2; }
done
TIMED=(--dtype=bfloat16 --pairs=3 --steps=5)
for p in "${PARTS[@]}"; do
  case $p in
    preflight) part preflight 60 bash -c preflight ;;
    detect) part detect 150 python3 bench/detect_vs_torchvision.py --size=640 --batch=16 --dtype=bfloat16 --steps=20 ;;
    step640) part step640 270 python3 bench/step_vs_torchvision.py --size=640 --batch=16 "${TIMED[@]}" ;;
    paper) part paper 270 python3 bench/step_vs_torchvision.py --paper_scale --batch=16 "${TIMED[@]}" ;;
    ssd300) part ssd300 160 python3 bench/ssd_step_vs_torchvision.py --size=300 --batch=32 "${TIMED[@]}" ;;
    ssd512) part ssd512 160 python3 bench/ssd_step_vs_torchvision.py --size=512 --batch=32 "${TIMED[@]}" ;;
  esac
done
