#!/usr/bin/env bash
# Rehearse the GPU machine's one command here, on the CPU (docs/PERFORMANCE.md, "The GPU check").
#
# 1. A Python 3.12 venv (tmp/gpu-rehearsal-venv, kept between runs) with the GPU machine's versions
#    of what the check imports: torch 2.11.0 (PyPI's Linux wheel, the CUDA 13.0 build; without a GPU
#    it runs on the CPU), transformers 5.17, accelerate 1.15, huggingface_hub 1.33 and the rest, and
#    none of what the machine lacks (pydantic and its kin are removed if a dependency pulled them in).
# 2. The wheels of scripts/gpu_wheels.sh (.whl/), fetched if missing.
# 3. Only what would travel (tracked and untracked-not-ignored files, plus .whl) copied to a temp dir,
#    so nothing ignored here (.cache, .venv) can help.
# 4. The command exactly as docs/PERFORMANCE.md gives it, with `--size full` → `--size small` and its
#    /tmp/site → a temp dir; python3 is the venv's; $OUT a temp dir. Prints the wall time and the
#    phases' statuses; the JSON and log stay in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
VENV=${REHEARSAL_VENV:-$ROOT/tmp/gpu-rehearsal-venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.11.0 "setuptools<82" transformers==5.17.0 accelerate==1.15.0 \
        huggingface_hub==1.33.0 safetensors==0.8.0 tokenizers numpy pillow onnx onnxruntime opencv-python-headless \
        scipy peft scikit-image requests psutil python-dateutil
    "$VENV/bin/pip" uninstall -q -y pydantic pydantic_core annotated-types typing-inspection diffusers torchao \
        boto3 botocore insightface cachetools python-dotenv pydantic-settings 2>/dev/null || true
fi
[ -d .whl ] || scripts/gpu_wheels.sh
TREE=$(mktemp -d /tmp/gpu-rehearsal-tree.XXXXXX)
SITE=$(mktemp -d /tmp/gpu-rehearsal-site.XXXXXX)
OUT=${OUT:-$(mktemp -d /tmp/gpu-rehearsal-out.XXXXXX)}
export OUT
trap 'rm -rf "$TREE" "$SITE"' EXIT
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$TREE"
cp -r .whl "$TREE/.whl"
COMMAND=$(awk '/<!-- device-command -->/ {on = 1; next} on && /^```/ {if (++fence == 2) exit; next} on' docs/PERFORMANCE.md)
[ -n "$COMMAND" ] || { echo "no device command found in docs/PERFORMANCE.md" >&2; exit 1; }
echo "device command: ${#COMMAND} characters"
COMMAND=${COMMAND//--size full/--size small}
COMMAND=${COMMAND//\/tmp\/site/$SITE}
# The command's time limits are sized for the GPU machine's 16 idle cores; on a shared 2-core VM
# everything takes several times longer: REHEARSAL_TIME_SCALE multiplies `timeout` and `--budget-s`.
SCALE=${REHEARSAL_TIME_SCALE:-1}
for option in timeout --budget-s; do
    if [[ $COMMAND =~ $option\ ([0-9]+) ]]; then
        COMMAND=${COMMAND/"$option ${BASH_REMATCH[1]}"/"$option $(( BASH_REMATCH[1] * SCALE ))"}
    fi
done
echo "command as rehearsed: $COMMAND"
echo "OUT=$OUT"
cd "$TREE"
started=$(date +%s)
status=0
PATH="$VENV/bin:$PATH" bash -c "$COMMAND" || status=$?
echo "rehearsal wall time: $(( $(date +%s) - started )) s, exit status $status"
"$VENV/bin/python" - "$OUT/gpu_check.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for name, phase in data["phases"].items():
    print(f"  {name:14} {phase['status']:8} {phase.get('seconds', '')!s:>7}  {phase.get('reason') or phase.get('error') or ''}")
EOF
exit $status
