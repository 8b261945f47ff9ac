#!/usr/bin/env bash
# The model-family tests on a lent GPU machine (issue 15): tests/test_families.py with
# SLIDERQUANT_TEST_DEVICE=cuda (FP view, fold == student, rotation, expert counts, resume,
# the MoE window-memory check that only runs on CUDA), then tests/test_cuda.py.
#
# Run from the repository root:  bash benchmarks/gpu_families.sh
# Needs torch with CUDA, transformers 5, safetensors, pyyaml, tqdm, tokenizers and pytest;
# tests that need gguf or compressed-tensors skip (or stop before their optional part) when
# those are absent. Writes the pytest log and the environment to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sliderquant-gpu-families}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SLIDERQUANT_TEST_DEVICE=cuda
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the bit-identical resume test
python - <<'EOF' | tee "$out/environment.txt"
import importlib, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("transformers", transformers.__version__)
for name in ("gguf", "compressed_tensors", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError:
        print(name, "absent")
EOF
python -m pytest -q -rs -p no:cacheprovider tests/test_families.py tests/test_cuda.py \
    --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
exit "${PIPESTATUS[0]}"
