"""DPO on real preferences: SmolLM2-135M-Instruct on HH-RLHF helpful-base, held-out accuracy, next to `train-rm`.

    .venv/bin/python benchmarks/dpo_hh.py                                  # ~25 min on 2 cores
    .venv/bin/python benchmarks/dpo_hh.py --train 16 --eval 8 --skip-rm     # smoke test (~2 min)

What it measures, on one split of the Anthropic HH-RLHF helpful-base *test* file (the only split in
../shared/data; shuffled with seed 0 as benchmarks/rm_train.py does, the first --eval pairs held
out, the next --train pairs trained on, `format=raw`, prompts cut from the left at --max-len):
  * before: the starting model's own preference, the share of held-out pairs whose chosen answer
    gets the higher summed log-prob (and the higher per-token mean log-prob) - what DPO starts from
    (its implicit reward is 0 for every answer at step 0);
  * `rlhf dpo` (sigmoid, beta --beta, --epochs over the training pairs, reference precomputed):
    held-out implicit-reward accuracy, beta * (log pi - log pi_ref)(chosen) > same (rejected), at
    every --eval-every steps and at the end;
  * `rlhf train-rm` on the same training pairs from the same model: held-out accuracy of the
    Bradley-Terry reward model (r(chosen) > r(rejected)).
Each accuracy comes with its 95% Wilson interval (n = held-out pairs). Both trainers run through
the CLI in their own process, 2 threads (BENCHMARKS.md). Raw numbers: benchmarks/results/dpo_hh.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, OURS_PY, RESULTS, bench_env, cpu_info, set_threads, versions, write_json  # noqa: E402
from rm_train import HH, load_hh  # noqa: E402


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def before(model_dir: Path, held: Path, max_len: int) -> dict:
    """The starting model's preference on the held-out pairs: summed and per-token mean log-prob."""
    import torch

    from rlhf_cli.commands.dpo import DpoConfig, load_rows
    from rlhf_cli.config import build
    from rlhf_cli.data import pref_data
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec
    from rlhf_cli.training import sequence_logprobs

    set_threads()
    spec = parse_model_spec(str(model_dir))
    tok = load_tokenizer(spec)
    model = load_model(spec, tok, "fp32").eval()
    rows, _ = load_rows(build(DpoConfig, data=str(held), model=str(model_dir), format="raw"))
    exs = pref_data.tokenize_prefs(tok, rows, "raw", max_len)
    summed = mean = 0
    with torch.no_grad():
        for i in range(0, len(exs), 8):
            b = pref_data.collate(exs[i : i + 8], tok.pad_token_id, packing=True)
            logp = sequence_logprobs(model, b["input_ids"], None, b["answer_mask"], b["position_ids"], b["seq_index"])
            c, r, n = b["better"], b["worse"], b["answer_lens"]
            summed += int((logp[c] > logp[r]).sum())
            mean += int((logp[c] / n[c] > logp[r] / n[r]).sum())
    return {"pairs": len(exs), "logp_sum_accuracy": summed / len(exs), "logp_sum_ci95": wilson(summed, len(exs)),
            "logp_mean_accuracy": mean / len(exs), "logp_mean_ci95": wilson(mean, len(exs))}


def cli(args: list[str], log: Path) -> float:
    """`rlhf ARGS` in its own process (2 threads); returns its wall seconds, exits with the log tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(OURS_PY), "-m", "rlhf_cli", *args], env=bench_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"rlhf {args[0]} failed (exit {proc.returncode}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return time.perf_counter() - t0


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=256, help="training pairs")
    ap.add_argument("--eval", type=int, default=200, help="held-out pairs")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per microbatch (x --grad-accum per step)")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6, help="DPO peak lr (linear decay, 10%% warmup)")
    ap.add_argument("--rm-lr", type=float, default=1e-5, help="train-rm peak lr (as benchmarks/rm_train.py)")
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--skip-rm", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "dpo_hh.json")
    args = ap.parse_args()

    from prepare_model import DEFAULT_OUT, prepare

    model_dir = prepare(DEFAULT_OUT)
    train, held = load_hh(args.eval, args.train)
    res: dict = {"benchmark": "dpo_hh", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "data": str(HH), "model": str(model_dir.relative_to(HERE.parent)),
                 "env": {"cpu": cpu_info(), "versions": versions("torch", "transformers", "rlhf-cli")}}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-dpo-hh-") as tmp_s:
        tmp = Path(tmp_s)
        for name, rows in (("train", train), ("held", held)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res["before"] = before(model_dir, tmp / "held.jsonl", args.max_len)
        print(f"before: summed log-prob prefers chosen on {res['before']['logp_sum_accuracy']:.3f} of "
              f"{res['before']['pairs']} held-out pairs", file=sys.stderr)
        common = [str(tmp / "train.jsonl"), "--model", str(model_dir), "--format", "raw", "--max-len", str(args.max_len),
                  "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--epochs", str(args.epochs),
                  "--eval-data", str(tmp / "held.jsonl"), "--eval-every", str(args.eval_every), "--schedule", "linear",
                  "--warmup", "0.1", "--seed", "0", "--device", "cpu", "--save-every", "0"]
        secs = cli(["dpo", *common, "--out", str(tmp / "dpo"), "--beta", str(args.beta), "--lr", str(args.lr),
                    "--precompute-ref"], RESULTS / "dpo_hh_dpo.log")
        rows = metrics(tmp / "dpo")
        n = res["before"]["pairs"]
        res["dpo"] = {"wall_seconds": secs, "steps": rows[-1]["step"],
                      "eval": [{k: r[k] for k in ("step", "eval_accuracy", "eval_margin", "eval_loss")} for r in rows if "eval_accuracy" in r],
                      "final_train": {k: rows[-1][k] for k in ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")}}
        acc = rows[-1]["eval_accuracy"]
        res["dpo"]["eval_accuracy"], res["dpo"]["eval_ci95"] = acc, wilson(acc * n, n)
        print(f"dpo: held-out implicit-reward accuracy {acc:.3f} after {rows[-1]['step']} steps ({secs:.0f} s)", file=sys.stderr)
        if not args.skip_rm:
            secs = cli(["train-rm", *common, "--out", str(tmp / "rm"), "--lr", str(args.rm_lr)], RESULTS / "dpo_hh_rm.log")
            rows = metrics(tmp / "rm")
            acc = rows[-1]["eval_accuracy"]
            res["train_rm"] = {"wall_seconds": secs, "steps": rows[-1]["step"], "eval_accuracy": acc, "eval_ci95": wilson(acc * n, n),
                               "eval": [{k: r[k] for k in ("step", "eval_accuracy")} for r in rows if "eval_accuracy" in r]}
            print(f"train-rm: held-out accuracy {acc:.3f} ({secs:.0f} s)", file=sys.stderr)
    write_json(args.out, res)
    report(res)


def report(res: dict) -> None:
    b, d = res["before"], res["dpo"]
    print(f"SmolLM2-135M-Instruct, HH-RLHF helpful-base: {res['settings']['train']} training pairs, {b['pairs']} held out")
    print(f"{'what':44s} {'held-out acc':>12s}  95% CI")
    print(f"{'start: summed log-prob prefers chosen':44s} {b['logp_sum_accuracy']:12.3f}  {b['logp_sum_ci95']}")
    print(f"{'start: mean log-prob prefers chosen':44s} {b['logp_mean_accuracy']:12.3f}  {b['logp_mean_ci95']}")
    for e in d["eval"][:-1]:
        print(f"{'dpo implicit reward, step ' + str(e['step']):44s} {e['eval_accuracy']:12.3f}")
    print(f"{'dpo implicit reward, end (step ' + str(d['steps']) + ')':44s} {d['eval_accuracy']:12.3f}  {d['eval_ci95']}")
    if "train_rm" in res:
        r = res["train_rm"]
        print(f"{'train-rm reward model, end (step ' + str(r['steps']) + ')':44s} {r['eval_accuracy']:12.3f}  {r['eval_ci95']}")


if __name__ == "__main__":
    main()
