#!/bin/bash
# Perplexity cost of W8A8 on tiny random Qwen3-MoE (the oracle fixture's float model) vs a dense tiny Qwen3 of the same size
set -e
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-python}
W=/tmp/moe_ppl; rm -rf $W; mkdir -p $W
M=tests/fixtures/qwen3_moe_tiny/float
$PY -c "
from pdmix.synth import make_random_model
make_random_model('$W/dense', 'qwen3', dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16), vocab_size=300, seed=19)"
for name in moe dense; do
  src=$M; [ $name = dense ] && src=$W/dense
  $PY -m pdmix quant --model_path $src --save_path $W/$name-w8a8 --quiet
  $PY -m pdmix eval --model_path $W/$name-w8a8 --data ${DATA:-../shared/data/wikitext-2/valid.txt} --ctx 256 --max_windows 20 --data_range 0.25:1 --compare $src --agreement_prompts 8 --agreement_tokens 32 --json --output $W/$name.json > /dev/null
done
$PY -c "
import json
for n in ('moe','dense'):
    r=json.load(open('$W/'+n+'.json')); print(n, json.dumps({k:v for k,v in r.items() if k not in ('command',)} , default=str)[:1500])
"
