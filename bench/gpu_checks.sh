#!/usr/bin/env bash
# Every check owed to a CUDA machine, in one run (a GPU is lent for minutes at a time: run this once, whole).
#
#   bash bench/gpu_checks.sh [OUT_DIR]          # from the repo root, on the GPU machine
#
# Where the machine lacks this project's environment (no registry there), carry what it lacks:
#   .whl/       wheels installed to /tmp/site first (pydantic, transformers at our pinned version, ...)
#   .devshim/   branchmerge/<pkg> links to this checkout's folders (the editable install's mapping) and
#               tiny_llama/ (the tests' tiny model, built here: the SmolLM2 wheel it needs is not carried)
# Output: OUT_DIR/{machine.txt, tests.txt, merge_kernels.txt, linear_ce_*.txt}.
set -u
out=${1:-${OUT:-gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -d .devshim ]; then
  export PYTHONPATH=$PWD/.devshim:$PWD:${PYTHONPATH:-} BRANCHMERGE_TINY_MODEL=$PWD/.devshim/tiny_llama
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers, lightning; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'lightning', lightning.__version__)"; } 2>&1 | tee "$out/machine.txt"

# 1. The CUDA cases: Triton merge kernels (fp32/bf16, drop_rescale), the fused linear cross-entropy, flash-attn
#    varlen packing (skips without flash_attn), FSDP against one process, and SFT's shared-prefix path, gradient
#    checkpointing and group_losses on the GPU (train_sft picks CUDA when it is there).
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_linear_ce.py \
  tests/test_packing.py tests/test_ddp.py tests/test_sft_options.py -m "gpu or not slow" \
  -k "cuda or flash or fsdp or shared_prefix or gradient_checkpointing or group_losses" -s 2>&1 \
  | tee "$out/tests.txt" | tail -40

# 2. Timings against the peer in the same run (bench/RESULTS.md)
timeout 120 python3 bench/merge_kernels.py --dtype bfloat16 2>&1 | tee "$out/merge_kernels.txt"
timeout 120 python3 bench/merge_kernels.py --dtype float32 2>&1 | tee -a "$out/merge_kernels.txt"
timeout 120 python3 bench/linear_ce.py --dtype bfloat16 2>&1 | tee "$out/linear_ce_bf16.txt"
timeout 120 python3 bench/linear_ce.py --dtype float32 --tokens 8192 2>&1 | tee "$out/linear_ce_fp32.txt"
