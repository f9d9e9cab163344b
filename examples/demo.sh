#!/usr/bin/env bash
# The embedded-default main job (`make demo`): offline, a few minutes on 2 CPU cores.
#
#   1. generate an addition task with a checkable answer (held-out sums for testing)
#   2. sample from builtin:tiny before training       -> accuracy before
#   3. rlhf sft on the demonstrations                  -> demo-out/sft/ (an HF checkpoint)
#   4. sample from the fine-tuned checkpoint           -> accuracy after
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
RLHF=${RLHF:-rlhf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

rm -rf "$OUT/sft" "$OUT/sft-state"
python examples/arithmetic.py data "$OUT" --train 20000 --test 200

echo "== before: sampling builtin:tiny (random init)" >&2
$RLHF sample "$OUT/test.jsonl" --model builtin:tiny --temperature 0 --max-new-tokens 6 -b 100 > "$OUT/before.jsonl"

echo "== rlhf sft builtin:tiny on $OUT/train.jsonl" >&2
$RLHF sft "$OUT/train.jsonl" --model builtin:tiny --out "$OUT/sft" \
    --lr 1e-3 --schedule wsd --warmup 50 --decay-frac 0.3 --batch-size 8 --max-len 256 --epochs 2 \
    --eval-split 0.02 --eval-every 100 --save-every 200

echo "== after: sampling $OUT/sft" >&2
$RLHF sample "$OUT/test.jsonl" --model "$OUT/sft" --temperature 0 --max-new-tokens 6 -b 100 > "$OUT/after.jsonl"

head -3 "$OUT/after.jsonl" >&2
python examples/arithmetic.py score "$OUT/before.jsonl" "$OUT/after.jsonl"
