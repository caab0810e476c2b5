#!/bin/bash
# Lease call 3, right after train.sh (the merged model is in /tmp/run): BABILong qa1 offline, 100 samples at
# 0k-128k, 25 at 1M, and the model with W_v = 0 (no memory) at 0k/4k/16k; each part stops T seconds after the start.
T0=$(date +%s); T=${T:-170}; OUT=${OUT:-/tmp/out}; EV=/tmp/eval; mkdir -p $EV $OUT
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/xdg ARMT_EVAL_CACHE=/tmp/xdg/armt-eval
ev() { local name=$1; shift; local left=$(( T - $(date +%s) + T0 - 15 )); [ $left -gt 10 ] || return
  timeout $left python3 -m eval.babilong --offline --tasks qa1 --batch-size 50 --output $EV/$name "$@" > $EV/$name.log 2>&1
  echo "$name rc $?"; grep -A12 "^accuracy" $EV/$name.log; }
ev armt --model /tmp/run --lengths 0k,1k,4k,16k,32k,128k --samples 100
python3 -c "
import torch; from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained('/tmp/run', trust_remote_code=True)
[l.value_proj.weight.data.zero_() for l in m.memory_layers]; m.save_pretrained('/tmp/ablate')
AutoTokenizer.from_pretrained('/tmp/run', trust_remote_code=True).save_pretrained('/tmp/ablate')"
ev no-memory --model /tmp/ablate --lengths 0k,4k,16k --samples 100
ev armt-1M --model /tmp/run --lengths 1M --samples 25
tar -C $EV --exclude=data -cf $OUT/eval.tar .
