#!/usr/bin/env bash
# Expert iteration (rejection-sampling fine-tuning) on the demo's addition task, offline, a few minutes on 2 CPU cores:
#
#   0. a deliberately under-trained SFT checkpoint: builtin:tiny, a few hundred steps on the demonstrations
#   1. each round: rlhf sample K=4 answers to 3000 training prompts (T=1), rlhf select --judge rule:exact
#      --keep all-passing (every distinct right answer; prompts the model never gets right give nothing),
#      rlhf sft on those rows from the round's starting checkpoint
#   2. rlhf eval exact on held-out sums after every round: greedy accuracy, and best-of-4 with the same rule
#      as the judge (the share of sums the model can get right at all, which is what selection feeds on)
#
#   bash examples/expert_iteration.sh     # OUT=ei-out ROUNDS=2 STEPS=1500 PROMPTS=3000 KEEP=all-passing change the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ei-out}
RLHF=${RLHF:-rlhf}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-1500}  # SFT steps for the starting checkpoint: enough to answer in the right format, not enough to add well
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

rm -rf "$OUT"
python examples/arithmetic.py data "$OUT" --train 4000 --test 200 --rm 0 --ppo "${PROMPTS:-3000}"

echo "== round 0: rlhf sft builtin:tiny, $STEPS steps (under-trained on purpose)" >&2
$RLHF sft "$OUT/train.jsonl" --model builtin:tiny --out "$OUT/round0" \
    --lr 1e-3 --schedule wsd --warmup 30 --decay-frac 0.3 --batch-size 8 --max-len 64 --max-steps "$STEPS" --save-every 0

evaluate() {  # held-out greedy accuracy and best-of-4 (rule:exact as the judge) of checkpoint $1, one JSON line each
    $RLHF eval exact "$OUT/test.jsonl" -m "$1" --format chat --extract exact --max-new-tokens 6 -b 100 > "$1/eval_greedy.json"
    $RLHF eval exact "$OUT/test.jsonl" -m "$1" --format chat --extract exact --max-new-tokens 6 -b 100 \
        -n 4 --temperature 1 --select rule:exact > "$1/eval_best_of_4.json"
}
evaluate "$OUT/round0"

for r in $(seq 1 "$ROUNDS"); do
    prev="$OUT/round$((r - 1))"
    echo "== round $r: sample 4 answers per training prompt from $prev, keep the right ones, fine-tune" >&2
    $RLHF sample "$OUT/ppo_prompts.jsonl" -m "$prev" -n 4 --temperature 1 --max-new-tokens 6 -b 100 --seed "$r" > "$OUT/samples$r.jsonl"
    $RLHF select "$OUT/samples$r.jsonl" --judge rule:exact --reference answer --keep "${KEEP:-all-passing}" > "$OUT/selected$r.jsonl"
    $RLHF sft "$OUT/selected$r.jsonl" --model "$prev" --out "$OUT/round$r" \
        --lr 3e-4 --schedule cosine --warmup 10 --batch-size 8 --max-len 64 --epochs 1 --save-every 0
    evaluate "$OUT/round$r"
done

python - "$OUT" "$ROUNDS" <<'EOF'
import json, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
print(f"{'held-out exact match, 200 unseen sums':40} {'kept rows':>10} {'greedy':>8} {'1 sample T=1':>13} {'best of 4':>10}")
for r in range(rounds + 1):
    g = json.loads((out / f"round{r}" / "eval_greedy.json").read_text())["results"][0]
    b = json.loads((out / f"round{r}" / "eval_best_of_4.json").read_text())["results"][0]
    kept = sum(1 for _ in open(out / f"selected{r}.jsonl")) if r else "-"
    name = "round 0 (under-trained sft)" if r == 0 else f"round {r} (sample -> select -> sft)"
    print(f"{name:40} {kept:>10} {g['exact_match']:8.3f} {b['best_of_1']:13.3f} {b['best_of_4']:10.3f}")
EOF
