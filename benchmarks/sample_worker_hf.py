"""The baseline for `rlhf sample`: a plain `model.generate` loop (transformers only, no rlhf_cli).

Started by sample_throughput.py. Reads a plan written by the driver: the rendered prompt token ids
of each batch and the seed `rlhf sample` uses for that batch, so with the same model, left
padding and sampling settings both sides draw the same tokens and do the same work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--result", required=True, type=Path)
    args = ap.parse_args()

    set_threads()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    plan = json.loads(args.plan.read_text())
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    greedy = plan["temperature"] == 0
    gen_cfg = GenerationConfig(
        max_new_tokens=plan["max_new_tokens"], do_sample=not greedy,
        temperature=None if greedy else plan["temperature"], top_p=None if greedy else 1.0,
        top_k=None if greedy else 0, num_return_sequences=plan["n"], eos_token_id=[eos], pad_token_id=pad,
    )
    batches = []
    for b in plan["batches"]:
        t0 = time.perf_counter()
        prompts = b["prompt_ids"]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(b["seed"])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
        gen = out[:, width:].tolist()
        token_ids = [g[: g.index(eos) + 1] if eos in g else g for g in gen]  # up to and including EOS
        texts = [tok.decode(t, skip_special_tokens=True) for t in token_ids]
        dt = time.perf_counter() - t0
        batches.append({"seconds": dt, "seed": b["seed"], "new_tokens": [len(t) for t in token_ids],
                        "token_ids": token_ids, "chars": sum(map(len, texts))})
    write_json(args.result, {
        "side": "hf-generate", "batches": batches, "wall_seconds_run": time.perf_counter() - t_start,
        "peak_rss_mib": peak_rss_mib(), "versions": versions("torch", "transformers", "tokenizers"),
    })


if __name__ == "__main__":
    main()
