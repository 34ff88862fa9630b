#!/usr/bin/env bash
# The main job end to end on the real default model (SmolLM2-135M-Instruct), on CPU:
# set up, fetch and convert the model, quantize it with the seed's msModelSlim command, validate
# the checkpoint, and ask it the seed's question through the paged-attention runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/smollm2-w8a8-mix}
MODEL=$(pdmix fetch smollm2)
pdmix quant --model_path "$MODEL" --save_path "$OUT" --device cpu --model_type Qwen3-14B --quant_type w8a8 \
    --trust_remote_code True --overwrite
pdmix inspect "$OUT"
python -m pdmix.run_pa --model_path "$OUT" --is_chat_model --max_output_length 40
# Speed, float vs PD-mix, same prompt and settings (steady state: run_pa warms up before timing).
for m in "$MODEL" "$OUT"; do
    python -m pdmix.run_pa --model_path "$m" --is_chat_model --max_output_length 128 --ignore_eos 2>/dev/null |
        sed -n "s|^pdmix run: |$( [ "$m" = "$OUT" ] && echo 'PD-mix W8A8' || echo 'float bf16 ' ): |p"
done
