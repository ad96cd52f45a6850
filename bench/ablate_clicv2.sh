#!/usr/bin/env bash
# CLICv2 ablations on the unseen-kinds protocol at a reduced budget: the full model and one variant
# per part (shifted patchify, patch-wise loss, MEM), each pretrained on the same corpus subset.
#   bash bench/ablate_clicv2.sh [max_images] [epochs] [out_prefix]
# Defaults: 1800 images x 2 epochs into runs/ablate-<name> (the numbers in docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
max_images=${1:-1800}; epochs=${2:-2}; prefix=${3:-runs/ablate}
py=${PY:-.venv/bin/python}
for ab in "shift.enabled=true:full" "shift.enabled=false:noshift" "clicv2.loss=image:imageloss" "clicv2.mem=false:nomem"; do
  set_="${ab%%:*}"; name="${ab##*:}"
  "$py" bench/real_data.py --params params/real-photos.yaml --out "$prefix-$name" \
    --methods clicv2 --skip-baselines --set "pretrain.clicv2.$set_" \
    --set "pretrain.clicv2.max_images=$max_images" --set "pretrain.clicv2.epochs=$epochs" \
    > "$prefix-$name.log" 2>&1
  echo "$name: $(python3 -c "import json,sys; print(json.load(open('$prefix-$name/table.json'))['clicv2']['all'])")"
done
