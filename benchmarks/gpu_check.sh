#!/usr/bin/env bash
# The GPU check of the index build: run on a CUDA machine with dermris installed
# (pip install -e '.[test,lite0]'). Writes everything under OUT (default ./gpu-check).
#
#   bash benchmarks/gpu_check.sh [OUT] [IMAGES]
#
# 1. the CUDA tests (indexing in reduced precision, CUDA store vs CPU store, retriever on CUDA)
# 2. benchmarks/bench_index.py for the paper preset (5 x B6 at 384 px, Grams, R2U-Net) from
#    384-px and 1024-px JPEGs, with the float32 / bfloat16 / float16 comparison
# 3. the whole test suite with CUDA visible
set -uo pipefail
OUT=${1:-gpu-check}
IMAGES=${2:-1536}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch, timm, numpy, pyarrow, PIL, zarr, faiss
print("python", platform.python_version(), "torch", torch.__version__, "timm", timm.__version__,
      "numpy", numpy.__version__, "pyarrow", pyarrow.__version__, "pillow", PIL.__version__,
      "zarr", zarr.__version__, "faiss", faiss.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "cpus", __import__("os").cpu_count())
EOF

echo "== CUDA tests"
timeout "${CUDA_TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -rA -s tests/test_cuda.py \
    "tests/test_exactness.py::test_cuda_gives_the_cpu_results" > "$OUT/cuda-tests.txt" 2>&1
tail -25 "$OUT/cuda-tests.txt"

echo "== paper preset benchmark"
timeout "${BENCH_S:-300}" $PY benchmarks/bench_index.py --preset paper --device cuda --images "$IMAGES" \
    --batch-size "${BATCH:-64}" --input preset 1024 --compare-precision 256 --out "$OUT/index-cuda.json" \
    --workdir /tmp/dermris-bench > "$OUT/bench.txt" 2>&1
tail -45 "$OUT/bench.txt"

echo "== full test suite"
timeout "${SUITE_S:-300}" $PY -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" > "$OUT/suite.txt" 2>&1
tail -30 "$OUT/suite.txt"
