#!/usr/bin/env bash
# The semantic cache's held-out figures through a real gateway (`make heldout`).
#
# The development set's domains are split into folds. For each fold, a model is fitted on the
# pairs of every other domain (its cut-off chosen on those domains too), and the gateway, with
# that model as `semantic.model`, replays the streams that hold the fold's domains; only the
# fold's requests are scored. No figure comes from a domain that took part in its model.
#
# usage: scripts/heldout-replay.sh SEMANTIC_DEV MODEL_DIR PYTHON
set -euo pipefail
dev=${1:?semantic dev file}
model_dir=${2:?embedding model dir}
python=${3:?python with numpy and scikit-learn}
out=target/semantic
pairs=$out/pairs.jsonl
mkdir -p "$out"

folds=(
  "media"
  "music,weather,restaurant"
  "Events,Flights,Buses,Banks,Calendar,Dentist"
  "Doctor,Homes,Hotels,Media,Movies,Music"
  "RentalCars,Restaurants,RideSharing,Salon,Travel,Weather"
)

cargo build --release --example semantic_pairs --example semantic_replay
if [ ! -f "$pairs" ] || [ "$pairs" -ot "$dev" ]; then
  extra=()
  [ -f eval/data/kwik_e_mart.jsonl ] && extra=(eval/data/kwik_e_mart.jsonl)
  target/release/examples/semantic_pairs "$pairs" "$model_dir" "$dev" "${extra[@]}"
fi
for i in "${!folds[@]}"; do
  fold=${folds[$i]}
  model=$PWD/$out/fold-$i.json
  "$python" scripts/fit_semantic_model.py "$pairs" --exclude "$fold" --model "$model" 2>/dev/null
  echo "== fold $i: $fold (model fitted without it)"
  EVAL_SEMANTIC="model = \"$model\"" EVAL_DOMAINS="$fold" \
    target/release/examples/semantic_replay "$dev" "$model_dir" | tee "$out/heldout-$i.md" | sed -n '/^| all /,$p'
done
