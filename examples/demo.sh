#!/usr/bin/env bash
# The embedded-default main job (`make demo`): offline, a few minutes on 2 CPU cores.
#
#   1. generate an addition task with a checkable answer (held-out sums for testing)
#   2. sample from builtin:tiny before training       -> accuracy before
#   3. rlhf sft on the demonstrations                  -> demo-out/sft/ (an HF checkpoint)
#   4. sample from the fine-tuned checkpoint           -> accuracy after
#   5. sample K=4 candidates per prompt, label pairs with rlhf pairwise --judge rule:exact,
#      train a Bradley-Terry reward model (rlhf train-rm) -> held-out RM accuracy
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
RLHF=${RLHF:-rlhf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

rm -rf "$OUT/sft" "$OUT/sft-state" "$OUT/rm" "$OUT/rm-state"
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

echo "== sample K=4 candidates per reward-model prompt (temperature 1.5, so some are wrong)" >&2
$RLHF sample "$OUT/rm_prompts.jsonl" --model "$OUT/sft" -n 4 --temperature 1.5 --max-new-tokens 6 -b 100 > "$OUT/samples.jsonl"
echo "== rlhf pairwise --judge rule:exact (correct beats wrong)" >&2
$RLHF pairwise "$OUT/samples.jsonl" --judge rule:exact --reference answer > "$OUT/prefs.jsonl"
echo "== rlhf train-rm on $(wc -l < "$OUT/prefs.jsonl") pairs" >&2
$RLHF train-rm "$OUT/prefs.jsonl" --model "$OUT/sft" --out "$OUT/rm" \
    --lr 1e-3 --schedule cosine --warmup 5 --batch-size 32 --epochs 2 --max-len 128 --eval-split 0.1 --eval-every 20 --save-every 0
python - "$OUT/rm/rlhf.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print(f"reward model: held-out pairwise accuracy {m['eval_accuracy']:.1%} (training set {m['train_accuracy']:.1%})")
PY
