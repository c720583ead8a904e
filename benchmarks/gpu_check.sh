#!/usr/bin/env bash
# GPU check: a ~1.1B-parameter Llama built from a config (no weights), LoRA training in bf16 at seq 1024
# for 50 timed steps, through fedtune's loop, TRL's SFTTrainer (where trl is installed) and HF Trainer + peft, on one
# GPU.
#   bash benchmarks/gpu_check.sh            (writes gpu_check.json into $OUT or the current folder)
# Where pydantic is missing, wheels in .whl/ are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
python3 benchmarks/train_throughput.py --preset llama-tiny --steps 5 --warmup 2
python3 benchmarks/train_throughput.py --preset llama-1b --seq-len 1024 --batch-size 8 --steps 50 --warmup 5 \
  --save "${OUT:-.}/gpu_check.json"
