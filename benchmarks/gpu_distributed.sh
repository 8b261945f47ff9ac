#!/usr/bin/env bash
# Data-parallel quantization on one GPU (issue 18, docs/DISTRIBUTED.md).
#
#   bash benchmarks/gpu_distributed.sh        # from the repository root
#
# Expected to take 1-2 minutes on a GPU (not run on one yet); every step is stopped once
# 170 s have gone by. The dry run on the host (SQ_DEVICE=cpu, below) passed here in 347 s
# wall, 91 CPU s, on 2 cores shared with other jobs.
#
# Needs torch with CUDA, transformers, safetensors and the repository's src/ (put on
# PYTHONPATH here); no data root, no hub, no gguf / compressed-tensors / lm-eval: the model
# is a random Llama built from a transformers config, the calibration windows random ids.
#
# 1. plain:  the non-distributed run on cuda (no process group).
# 2. nccl1:  `torchrun --nproc-per-node 1`, NCCL group of one on the same GPU (every
#            all-reduce, broadcast and gather really runs): its folded weights must equal
#            the plain run's (same batches, same kernels) within float tolerance.
# 3. gloo2:  `torchrun --nproc-per-node 2`, two Gloo ranks sharing the GPU (NCCL refuses two
#            ranks on one device): must finish, hold 8 + 8 of the 16 windows and half the
#            activation caches each. Its weights are only reported: a batch split over two
#            ranks rounds differently, which the training amplifies (docs/DISTRIBUTED.md;
#            0.056 max abs on the host dry run), more so under CUDA's bf16 autocast.
# Prints one line "gpu_distributed: PASS ..." or "gpu_distributed: FAIL ..." and the time.
# SQ_DEVICE=cpu runs the same steps on the host (the group of one is then Gloo): a dry run
# of this script on a machine without a GPU.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
began=$(date +%s)

cat > "$WORK/driver.py" <<'EOF'
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from sliderquant import QuantConfig, quantize
from sliderquant.distributed import Collective, launch

DEVICE = os.environ.get("SQ_DEVICE", "cuda")
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"
CALIB = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
CONFIG = QuantConfig.from_dict(dict(
    wbits=2, abits=16, epochs=2, batch_size=4, nsamples=16, seqlen=128,
    inference_batch_size=4, lora_lr=5e-3, shallow=2, deep=2))


def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        rms_norm_eps=1e-6))
    with torch.no_grad():  # non-trivial norm gains, so folding mistakes would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m.float().eval()


def run(mode, out):
    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)
    if mode == "nccl1":
        device = launch(device)
    elif mode == "gloo2":
        dist.init_process_group("gloo")
    comm = Collective()
    print(f"{mode}: rank {comm.rank}/{comm.world_size} backend {comm.backend} on {device}",
          flush=True)
    result = quantize(model(), None, CONFIG, calib=CALIB, device=device, output_dir=out,
                      formats="fake", show_progress=False)
    if comm.is_main:
        print(f"{mode}: {json.dumps(result.report['ranks'])}", flush=True)
    if mode == "gloo2":
        dist.destroy_process_group()


def ranks(out):
    return json.loads((Path(out) / "sliderquant.json").read_text())["ranks"]


def diff(out, reference):
    a = load_file(str(Path(out) / "model.safetensors"))
    b = load_file(str(Path(reference) / "model.safetensors"))
    assert a.keys() == b.keys(), "different tensors"
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    rel = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item()
              for k in a if b[k].double().norm() > 0)
    return a, b, worst, rel


def check(plain, nccl1, gloo2):
    failures = []
    r = ranks(nccl1)
    if (r["world_size"], r["backend"], r["samples"]) != (1, BACKEND, [16]):
        failures.append(f"nccl1 record {r}")
    a, b, worst, rel = diff(nccl1, plain)
    print(f"nccl1 vs plain: max abs weight diff {worst:.3e}, max relative {rel:.3e}")
    for k in a:
        try:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            failures.append(f"nccl1 {k}: {str(e).splitlines()[0]}")
            break
    r, whole = ranks(gloo2), ranks(plain)["peak_cache_bytes"][0]
    if (r["world_size"], r["backend"], r["samples"]) != (2, "gloo", [8, 8]):
        failures.append(f"gloo2 record {r}")
    if r["peak_cache_bytes"] != [whole // 2, whole // 2]:
        failures.append(f"gloo2 caches {r['peak_cache_bytes']} are not half of {whole}")
    _, _, worst, rel = diff(gloo2, plain)
    print(f"gloo2 vs plain (split batches round differently, reported only): max abs weight diff {worst:.3e}, "
          f"max relative {rel:.3e}; caches per rank {r['peak_cache_bytes']} of {whole} bytes")
    for f in failures:
        print("FAILED:", f)
    return not failures


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.exit(0 if check(*sys.argv[2:5]) else 1)
    run(sys.argv[1], sys.argv[2])
EOF

status=ok
step() {  # name, command...: fails the check, and is stopped once 170 s have gone by
    local name=$1; shift
    local left=$(( 170 - ($(date +%s) - began) ))
    if [ "$left" -lt 5 ]; then status="out of time before $name"; return; fi
    if ! timeout "$left" "$@"; then status="$name failed or timed out"; fi
}
"$PY" -c "import os, torch, transformers; \
assert os.environ.get('SQ_DEVICE') == 'cpu' or torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
    || status="no CUDA torch"
[ "$status" = ok ] && step plain "$PY" "$WORK/driver.py" plain "$WORK/plain"
[ "$status" = ok ] && step nccl1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    "$WORK/driver.py" nccl1 "$WORK/nccl1"
[ "$status" = ok ] && step gloo2 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    "$WORK/driver.py" gloo2 "$WORK/gloo2"
[ "$status" = ok ] && step check "$PY" "$WORK/driver.py" check "$WORK/plain" "$WORK/nccl1" \
    "$WORK/gloo2"
took=$(( $(date +%s) - began ))
if [ "$status" = ok ]; then
    echo "gpu_distributed: PASS (NCCL group of one equals the plain run; 2 Gloo ranks hold half each) in ${took} s"
else
    echo "gpu_distributed: FAIL ($status) in ${took} s"
    exit 1
fi
