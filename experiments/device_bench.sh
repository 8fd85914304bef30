#!/usr/bin/env bash
# One sitting on an accelerator, in one command (device time is short): the benchmark suite at paper sizes,
# a paper-size iteration with the paper's 4 seeds, the rollout at three chunk sizes, and the three stages
# at the smoke preset end to end. Every result lands in OUT_DIR; the last lines printed are a summary.
#
#   bash experiments/device_bench.sh OUT_DIR
#   QUICK=1 bash experiments/device_bench.sh OUT_DIR   # small sizes: checks the script itself on a CPU
#
# Run from the repository root with mb2po_jax importable (installed, or PYTHONPATH=.). The smoke run reads
# the default local dataset from $MB2PO_DATA_DIR if it is there (else it generates it first, ~1 min).
set -uo pipefail
out=${1:?usage: bash experiments/device_bench.sh OUT_DIR}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
bench='import sys; from benchmarks import run; run(sys.argv[1:])'  # mb2po-bench, installed or not (repo root)
step() { echo "[$(date +%T)] $*" | tee -a "$log"; }
if [ -n "${QUICK:-}" ]; then
  all_size=(--quick); mb2po_size=(--imagined_steps 50000 --updates_per_iteration 100)
  rollout_size=(--steps 50000); chunks=(1024 4096)
else
  all_size=(); mb2po_size=(); rollout_size=(); chunks=(16384 65536 200000)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  python3 -c 'import jax, flax, optax, sys; print("python", sys.version.split()[0], "jax", jax.__version__,
              "flax", flax.__version__, "optax", optax.__version__, jax.devices())'; } | tee -a "$log"

step "bench all ${all_size[*]}"
timeout 300 python3 -c "$bench" all "${all_size[@]}" --out "$out/bench_all.json" >/dev/null 2>>"$log" \
  || step "bench all failed: rc $?"
step "bench mb2po, 4 seeds"
timeout 100 python3 -c "$bench" mb2po --num_seeds 4 "${mb2po_size[@]}" >"$out/mb2po_4seeds.json" 2>>"$log" \
  || step "bench mb2po 4 seeds failed: rc $?"
step "bench rollout, chunk sizes"
for c in "${chunks[@]}"; do
  timeout 60 python3 -c "$bench" rollout --chunk_size "$c" "${rollout_size[@]}" >>"$out/rollout_chunks.jsonl" \
    2>>"$log" || step "bench rollout --chunk_size $c failed: rc $?"
done
step "three stages, smoke preset"
rm -rf /tmp/device_smoke3
timeout 200 python3 -m mb2po_jax.train --preset smoke --stages awac,dynamics,mb2po --workdir /tmp/device_smoke3 \
  >>"$log" 2>&1 || step "smoke run failed: rc $?"
cp /tmp/device_smoke3/results.json "$out/smoke3_results.json" 2>/dev/null
cp /tmp/device_smoke3/metrics.jsonl "$out/smoke3_metrics.jsonl" 2>/dev/null
step "done"

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
b = (load("bench_all.json") or {}).get("results", {})
for name, key in [("awac", "updates_per_s"), ("dynamics", "minibatch_updates_per_s"),
                  ("rollout", "imagined_steps_per_s"), ("mb2po", "seconds_per_iteration")]:
    r = b.get(name)
    if r:
        print(f"{name:9s} {key} {r[key]:.4g}  fraction {r['fraction_of_matmul_peak']:.3f}  "
              f"matmul {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s")
for r in b.get("seeds_scaling", []):
    print(f"awac {r['num_seeds']} seeds: {r['seed_updates_per_s']:.4g} seed-updates/s")
r = load("mb2po_4seeds.json")
if r:
    print(f"mb2po 4 seeds: {r['seconds_per_iteration']:.3f} s/iteration")
try:
    for line in open(os.path.join(out, "rollout_chunks.jsonl")):
        r = json.loads(line)
        print(f"rollout chunk {r.get('chunk_size')}: {r['imagined_steps_per_s']:.4g} steps/s "
              f"({r['seconds_per_iteration']:.3f} s per iteration of {r['imagined_steps']} steps)")
except OSError:
    pass
print("smoke run, final scores:", (load("smoke3_results.json") or {}).get("final"))
EOF
