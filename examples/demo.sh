#!/usr/bin/env bash
# The embedded-default main job (`make demo`): offline, a few minutes on 2 CPU cores.
#
#   1. generate an addition task with a checkable answer (held-out sums for testing)
#   2. sample from builtin:tiny before training       -> accuracy before
#   3. rlhf sft on the demonstrations                  -> demo-out/sft/ (an HF checkpoint)
#   4. sample from the fine-tuned checkpoint           -> accuracy after
#   5. sample K=4 candidates per prompt, label pairs with rlhf pairwise --judge rule:exact,
#      train a Bradley-Terry reward model (rlhf train-rm) -> held-out RM accuracy
#   6. rlhf ppo against that reward model, KL to the SFT policy -> demo-out/ppo/
#   7. held-out accuracy of SFT vs PPO (greedy and sampled) and the reward/KL curves (rlhf plot)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
RLHF=${RLHF:-rlhf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

rm -rf "$OUT/sft" "$OUT/sft-state" "$OUT/rm" "$OUT/rm-state" "$OUT/ppo" "$OUT/ppo-state"
python examples/arithmetic.py data "$OUT" --train 20000 --test 200

echo "== before: sampling builtin:tiny (random init)" >&2
$RLHF sample "$OUT/test.jsonl" --model builtin:tiny --temperature 0 --max-new-tokens 6 -b 100 > "$OUT/before_greedy.jsonl"

echo "== rlhf sft builtin:tiny on $OUT/train.jsonl" >&2
$RLHF sft "$OUT/train.jsonl" --model builtin:tiny --out "$OUT/sft" \
    --lr 1e-3 --schedule wsd --warmup 50 --decay-frac 0.3 --batch-size 8 --max-len 256 --epochs 2 \
    --eval-split 0.02 --eval-every 100 --save-every 200

echo "== after: sampling $OUT/sft" >&2
$RLHF sample "$OUT/test.jsonl" --model "$OUT/sft" --temperature 0 --max-new-tokens 6 -b 100 > "$OUT/sft_greedy.jsonl"

head -3 "$OUT/sft_greedy.jsonl" >&2
python examples/arithmetic.py score "$OUT/before_greedy.jsonl" "$OUT/sft_greedy.jsonl"

echo "== sample K=4 candidates per reward-model prompt (temperature 1.5, so some are wrong)" >&2
$RLHF sample "$OUT/rm_prompts.jsonl" --model "$OUT/sft" -n 4 --temperature 1.5 --max-new-tokens 6 -b 100 > "$OUT/samples.jsonl"
echo "== rlhf pairwise --judge rule:exact (correct beats wrong)" >&2
$RLHF pairwise "$OUT/samples.jsonl" --judge rule:exact --reference answer > "$OUT/prefs.jsonl"
echo "== rlhf train-rm on $(wc -l < "$OUT/prefs.jsonl") pairs" >&2
$RLHF train-rm "$OUT/prefs.jsonl" --model "$OUT/sft" --out "$OUT/rm" \
    --lr 1e-3 --schedule cosine --warmup 5 --batch-size 32 --epochs 2 --max-len 128 --eval-split 0.1 --eval-every 20 --save-every 0

# PPO samples at T=1.5, where the SFT policy is right only about half the time, so the reward has
# something to teach; a KL coefficient of 1.0 keeps it from exploiting the reward model's mistakes
# (at 0.05 this reward model is over-optimised: its reward doubles while accuracy falls).
echo "== rlhf ppo: $OUT/sft against $OUT/rm, KL to the SFT policy" >&2
$RLHF ppo "$OUT/ppo_prompts.jsonl" --policy "$OUT/sft" --reward "$OUT/rm" --out "$OUT/ppo" \
    -b 64 --minibatch-size 16 --max-new-tokens 6 --temperature 1.5 --lr 1e-4 --kl-coef 1.0 --save-every 20
for m in sft ppo; do
    $RLHF sample "$OUT/test.jsonl" --model "$OUT/$m" --temperature 1.5 --max-new-tokens 6 -b 100 > "$OUT/${m}_t15.jsonl"
done
$RLHF sample "$OUT/test.jsonl" --model "$OUT/ppo" --temperature 0 --max-new-tokens 6 -b 100 > "$OUT/ppo_greedy.jsonl"
$RLHF plot "$OUT/ppo/metrics.jsonl" -o "$OUT/ppo_curves.png" --smooth 5
python examples/arithmetic.py summary "$OUT"
echo "reward / KL / loss curves: $OUT/ppo_curves.png" >&2
