#!/usr/bin/env bash
# The embedded-default main job (`make demo`): the whole InstructGPT loop, offline, a few minutes on 2 CPU cores.
#
#   1. generate an addition task with a checkable answer (held-out sums for testing)
#   2. rlhf sft builtin:tiny on the demonstrations          -> demo-out/sft/ (an HF checkpoint)
#   3. rlhf sample K=4 candidates per prompt, label pairs with rlhf pairwise --judge rule:exact,
#      train a Bradley-Terry reward model (rlhf train-rm)   -> demo-out/rm/, held-out RM accuracy
#   4. rlhf ppo against that reward model, KL to the SFT policy -> demo-out/ppo/ + the curves (rlhf plot)
#   5. rlhf dpo on the same preference pairs, no reward model   -> demo-out/dpo/
#   6. rlhf grpo on the PPO prompts with the rule itself as the reward, K=4 per prompt -> demo-out/grpo/
#   7. rlhf eval exact: base vs SFT vs PPO vs DPO vs GRPO on the held-out sums, greedy and sampled at T=1.5,
#      and best-of-n: the reward model picks one of n SFT samples (n = 1, 2, 4, 8)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
RLHF=${RLHF:-rlhf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

rm -rf "$OUT/sft" "$OUT/sft-state" "$OUT/rm" "$OUT/rm-state" "$OUT/ppo" "$OUT/ppo-state" "$OUT/dpo" "$OUT/dpo-state" "$OUT/grpo" "$OUT/grpo-state"
python examples/arithmetic.py data "$OUT" --train 20000 --test 200

echo "== rlhf sft builtin:tiny on $OUT/train.jsonl" >&2
$RLHF sft "$OUT/train.jsonl" --model builtin:tiny --out "$OUT/sft" \
    --lr 1e-3 --schedule wsd --warmup 50 --decay-frac 0.3 --batch-size 8 --max-len 256 --epochs 2 \
    --eval-split 0.02 --eval-every 100 --save-every 200

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
$RLHF ppo "$OUT/ppo_prompts.jsonl" -m "$OUT/sft" --reward "$OUT/rm" --out "$OUT/ppo" \
    -b 64 --minibatch-size 16 --max-new-tokens 6 --temperature 1.5 --lr 1e-4 --kl-coef 1.0 --save-every 20
$RLHF plot "$OUT/ppo/metrics.jsonl" -o "$OUT/ppo_curves.png" --smooth 5

# The other route from the same pairs: DPO, no reward model. One epoch at lr 3e-5; more epochs fit
# these pairs harder and lose accuracy (3 epochs: greedy 91.5%; lr 1e-4 x 2: 85%).
echo "== rlhf dpo: $OUT/sft on the same $(wc -l < "$OUT/prefs.jsonl") pairs, no reward model" >&2
$RLHF dpo "$OUT/prefs.jsonl" -m "$OUT/sft" --out "$OUT/dpo" \
    --lr 3e-5 --beta 0.1 --batch-size 32 --epochs 1 --max-len 128 --eval-split 0.1 --save-every 0

# The verifiable-reward route: no reward model, no preference pairs; the rule scores 4 samples of each
# prompt at T=1.5 and each group is its own baseline. 64 prompts a step at lr 1e-4 (45 steps); with 16
# prompts a step or lr 3e-4 the updates are noisy enough to cost greedy accuracy (91.5%).
echo "== rlhf grpo: $OUT/sft on checkable sums, rule:exact, 4 samples per prompt" >&2
$RLHF grpo "$OUT/ppo_prompts.jsonl" -m "$OUT/sft" --judge rule:exact --reference answer --out "$OUT/grpo" \
    -b 64 -K 4 --max-new-tokens 6 --temperature 1.5 --lr 1e-4 --max-steps 45 --save-every 20

echo "== rlhf eval exact: held-out sums, greedy" >&2
$RLHF eval exact "$OUT/test.jsonl" -m builtin:tiny -m "$OUT/sft" -m "$OUT/ppo" -m "$OUT/dpo" -m "$OUT/grpo" --format chat --extract exact \
    --max-new-tokens 6 -b 100 --plot "$OUT/eval_greedy.png" > "$OUT/eval_greedy.json"
echo "== rlhf eval exact: held-out sums, 4 samples at T=1.5 (sample_accuracy: one sample; exact_match: majority)" >&2
$RLHF eval exact "$OUT/test.jsonl" -m "$OUT/sft" -m "$OUT/ppo" -m "$OUT/dpo" -m "$OUT/grpo" --format chat --extract exact \
    --max-new-tokens 6 -b 100 -n 4 --temperature 1.5 > "$OUT/eval_t15.json"
echo "== rlhf eval exact: best-of-n, 8 samples of the SFT policy at T=1.5, the reward model keeps one (n = 1, 2, 4, 8)" >&2
$RLHF eval exact "$OUT/test.jsonl" -m "$OUT/sft" --format chat --extract exact --max-new-tokens 6 -b 100 -n 8 --temperature 1.5 \
    --select rm:"$OUT/rm" --plot "$OUT/best_of_n.png" > "$OUT/eval_best_of_n.json"
python examples/arithmetic.py summary "$OUT"
echo "curves: $OUT/ppo_curves.png   eval: $OUT/eval_greedy.png   best-of-n: $OUT/best_of_n.png" >&2
