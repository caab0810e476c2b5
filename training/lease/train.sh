#!/bin/bash
# Lease call 2 (carry .lease/c2), after stash.sh: SmolLM2 + ARMT on qa1, one segment then the memory curriculum, for
# T seconds in all (default 570); the adapter (LoRA + memory, about 56 MB in fp32) comes back in 15 MB pieces:
# cat adapter.tar.* | tar x -C CKPT, then python -m training.export CKPT --output DIR. Measured on an H200 at
# batch 32: 0.36 / 1.04 / 3.99 s per step at 1 / 4 / 16 segments, 135 GiB at 16 (hence batch 24). S: steps per stage (5 stages of mean 1, 1.5, 2.5, 4.5, 8.5 segments).
T0=$(date +%s); T=${T:-570}; S=${S:-60}; BATCH=${BATCH:-24}; OUT=${OUT:-/tmp/out}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/xdg TOKENIZERS_PARALLELISM=false
export ARMT_EVAL_CACHE=/tmp/xdg/armt-eval
mkdir -p $OUT /tmp/xdg/armt-hf && cp -r .lease/c2/armt-eval /tmp/xdg/
cat /tmp/stash/gguf.part00 .lease/c2/gguf.part01 > /tmp/xdg/armt-hf/SmolLM2-135M-Instruct.Q4_1.gguf
python3 train.py --init-from smollm2 --lora-r 16 --bf16 --normalize-features --layers-with-memory 1-29 --segment-size 256 \
  --curriculum 1,2,4,8,16 --stage-steps $S --max-steps $((5 * S)) --batch-size $BATCH --learning-rate 5e-4 \
  --warmup-steps 20 --eval-steps 0 --save-steps 50 --save-total-limit 1 --logging-steps 10 --disable-tqdm true \
  --dataloader-workers 8 --report-to none --output-dir /tmp/run \
  --time-limit $(python3 -c "print(($T - $(date +%s) + $T0 - 90) / 60)") > $OUT/train.log 2>&1
echo "train rc $?"; grep -E "'loss'|time-limit|not finite|diverged" $OUT/train.log | tail -40
C=$(ls -d /tmp/run/checkpoint-* | sort -t- -k2 -n | tail -1)
cp /tmp/run/train_args.json $C/ && tar -C $C --exclude=optimizer.pt -cf /tmp/adapter.tar . && split -b 15M -d /tmp/adapter.tar $OUT/adapter.tar.
