#!/usr/bin/env bash
# The documented command that trains the bundled model (v2). Resumable: rerun the same command and it continues from
# runs/v2/train_state.pt (weights, optimizer, tokens seen, data RNG). The learning-rate schedule is defined by
# --tokens, not by wall time, so any number of stopped-and-resumed sessions equal one uninterrupted run. Extra flags
# are appended: --time-limit-min N stops (and saves) this session after N minutes without moving the schedule;
# `kill PID` (SIGTERM) also saves after the current step. A checkpoint is written every 5 minutes anyway.
#
# Corpora: python scripts/prepare_corpus.py (data/web, whose val.txt.gz stays the reported held-out text) and
# python scripts/prepare_prose.py (data/prose: KJV, Austen, Moby-Dick, State of the Union; train only).
# Warm start (first session only; a resume ignores it): the v1 bundled model dgemma-web-2m, 5.68M tokens seen,
# commit 8d57c71, model.safetensors sha256 2bdd6c826b1ccd35b75fbddc7313bd7c1e01309a213515d509a19e743fcb0ecd; its
# tokenizer (byte-level BPE, 4096) is copied into the run. Once src/dgemma/bundled holds other weights, pass
# INIT_FROM=<a checkout of 8d57c71>/src/dgemma/bundled to reproduce from scratch.
# Budget: 44M new tokens (about 50M with v1's), about 1,650 tokens/s on one thread: 7.4 CPU-hours.
#
# Background on one core, a session of 2 hours (setsid: the run outlives the shell that started it):
#   mkdir -p runs/v2 && setsid nohup nice -n 10 scripts/train_bundled.sh --time-limit-min 120 \
#     >> runs/v2/train.log 2>&1 < /dev/null &
# While you edit the same checkout, run it from a snapshot instead (lazy imports of half-edited modules killed a run
# once): git worktree add /tmp/dg-train HEAD && ln -s "$PWD/runs" /tmp/dg-train/runs, then start
# /tmp/dg-train/scripts/train_bundled.sh with PYTHONPATH=/tmp/dg-train/src.
# runs/ is not in git: the state saved at the end of a session is committed as checkpoints/v2/train_state.pt, and a
# fresh clone resumes from it.
cd "$(dirname "$0")/.."
if [ ! -f runs/v2/train_state.pt ] && [ -f checkpoints/v2/train_state.pt ]; then
  mkdir -p runs/v2 && cp checkpoints/v2/train_state.pt runs/v2/
fi
DGEMMA=dgemma
[ -x .venv/bin/dgemma ] && DGEMMA=.venv/bin/dgemma
exec "$DGEMMA" train --out runs/v2 --corpus data/web,data/prose --init-from "${INIT_FROM:-src/dgemma/bundled}" \
  --vocab-size 4096 --hidden-size 128 --intermediate-size 256 --moe-intermediate-size 128 --num-layers 4 \
  --num-heads 4 --head-dim 32 --kv-heads 2 --global-head-dim 64 --global-kv-heads 1 \
  --tokens 44000000 --lr 2e-3 --warmup 200 --threads 1 --no-bf16 \
  --eval-every 300 --ckpt-every 100 --ckpt-every-min 5 "$@"
