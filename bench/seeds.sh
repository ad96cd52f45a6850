#!/usr/bin/env bash
# The seeded unseen-kinds study of docs/results.md: MoCo v2, CLIC and CLICv2 at 3 seeds, and each
# ablation at 2 seeds, as two queues sharing the two cores (OMP_NUM_THREADS=1 each, the thread
# count the numbers were measured at: another count gives other, equally valid, weights).
# Resumable: run it again after an interruption and finished (seed, method) pairs are not redone.
#   bash bench/seeds.sh [OUT]            (default runs/seeds; then: python bench/seed_table.py OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/seeds}
py=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$out"
run() {  # NAME SEEDS... -- real_data.py arguments
  local name=$1; shift; local seeds=()
  while [ "$1" != "--" ]; do seeds+=("$1"); shift; done; shift
  "$py" bench/real_data.py --params params/real-photos.yaml --out "$out/$name" --seeds "${seeds[@]}" "$@" \
    >> "$out/$name.log" 2>&1
}
main() { run main 0 1 2 --; }
ablations() {
  local v2=(--methods clicv2 --skip-baselines)
  run clicv2-maskonly 0 1 -- "${v2[@]}" --set pretrain.clicv2.clicv2.mem_weight=0
  run clicv2-nomem 0 1 -- "${v2[@]}" --set pretrain.clicv2.clicv2.mem=false
  run clic-online 0 1 -- --methods clic --skip-baselines --set pretrain.clic.rcm.pairing=key --set pretrain.clic.epochs=4
  run clicv2-noshift 0 1 -- "${v2[@]}" --set pretrain.clicv2.shift.enabled=false
  run clicv2-imageloss 0 1 -- "${v2[@]}" --set pretrain.clicv2.clicv2.loss=image
  run moco-bnsplit8 0 1 -- --methods moco --skip-baselines --set pretrain.moco.moco.bn_splits=8
}
main & a=$!
ablations & b=$!
wait $a; wait $b
echo "done: $out"
