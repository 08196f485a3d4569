#!/usr/bin/env bash
# The documented command that trains the bundled model (resumable: rerun it; extra flags are appended).
# Prepare the corpus first: python scripts/prepare_corpus.py
cd "$(dirname "$0")/.."
exec dgemma train --out runs/small --vocab-size 4096 --hidden-size 128 --intermediate-size 256 \
  --moe-intermediate-size 128 --num-layers 4 --num-heads 4 --head-dim 32 --kv-heads 2 --global-head-dim 64 \
  --global-kv-heads 1 --steps 100000 --time-limit-min 80 --eval-every 150 --ckpt-every 50 "$@"
