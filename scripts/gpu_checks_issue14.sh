#!/usr/bin/env bash
# The GPU checks issue 14 still needs, as one call on a lent device (written without a GPU:
# untested there; read it before spending device time). Run from the repository root, with
# the device tool's `run`, e.g.
#   command: "bash scripts/gpu_checks_issue14.sh"   carry: [".gpu-cache"]
# where .gpu-cache is a copy of the checkpoint cache (git-ignored), so nothing retrains.
# Writes everything under $OUT (one tarball of the runs, logs beside it).
set -uo pipefail
out=${OUT:?run this through the device tool, which sets OUT}
export PYTHONPATH=$PWD COMPOUND_BENCH_CACHE=$PWD/.gpu-cache
mkdir -p .bin && printf '#!/usr/bin/env bash\nexec python -c "import sys; from bench.cli import main; sys.exit(main())" "$@"\n' > .bin/compound
chmod +x .bin/compound && export PATH=$PWD/.bin:$PATH
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# 1. the CUDA tests of the three transforms (outputs, bounds, 2:4 kernel, overlap)
timeout 120 python -m pytest -q tests/test_overlap.py tests/test_special_instructions.py \
  > "$out/tests.txt" 2>&1
# 2. 2:4 sparse against dense per linear at smolvlm-256m's shapes
timeout 90 compound sparse-gemm --preset smolvlm-256m --json > "$out/sparse-gemm.json" 2> "$out/sparse-gemm.err"
# 3. the suite on smolvlm-256m (cost-only, bfloat16) at batch 8/32/64, static engine
timeout 300 compound run --preset smolvlm-256m --device cuda --dtype bfloat16 --engine static \
  --batch-size 32,8,64 --transforms attn_ffn_overlap,sparse_gemm_24,approx_softmax,fused_qkv \
  --processes 4 --min-rounds 8 --results-dir "$out/runs" --run-id gpu-smolvlm-instructions \
  --no-progress > "$out/suite.txt" 2>&1
tar -C "$out" -czf "$out/runs.tar.gz" runs 2>/dev/null && rm -rf "$out/runs"
echo done > "$out/done"
