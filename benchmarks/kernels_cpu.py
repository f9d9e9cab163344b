"""PPO kernels on CPU: log-prob gathering (given logits, and fused from hidden states) and GAE.

    .venv/bin/python benchmarks/kernels_cpu.py                 # everything (~10 min on 2 busy cores)
    .venv/bin/python benchmarks/kernels_cpu.py --only logits   # one group: logits | fused | gae
    .venv/bin/python benchmarks/kernels_cpu.py --repeats 5 --n 512   # quicker, smaller

Log-probs at SmolLM2-135M's sizes: N = 2048 tokens, V = 49152, H = 576, fp32 (BENCHMARKS.md: fp32 on
CPU), 2 threads. Variants, each in a fresh process, one after the other:
  given logits (N, V):   ours = rlhf_cli.kernels.token_logprobs (chunked torch reference, the CPU path)
                         naive = logits.log_softmax(-1).gather(-1, y)
                         compiled = torch.compile(naive)   (the one to beat on CPU, BENCHMARKS.md)
                         trl = trl.trainer.utils.selective_log_softmax, run in .bench-venv (trl 1.16.0)
                         (+ "_entropy" variants: log-probs and entropy together)
  from hidden (N, H) and lm_head (V, H): ours = fused_linear_logprobs; naive / compiled / trl apply the
                         same functions to F.linear(hidden, W): the (N, V) logits exist there.
  modes: fwd (no_grad, as when scoring old/ref log-probs) and fwdbwd (logp.sum().backward()).
  --threads 2 is the rule (BENCHMARKS.md); --threads 1 is recorded too: on a shared, oversubscribed
  2-core machine every multi-threaded op pays a barrier wait, which punishes chunked code.

Extra peak memory: a separate process per variant and mode runs with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_=64 KiB, MALLOC_TRIM_THRESHOLD_=0), so freed buffers go back to the OS and
the resident set tracks live memory; after one warm-up call (which also compiles) it resets the
kernel's high-water mark (/proc/self/clear_refs = 5) and reports VmHWM after one call minus the
resident set just before it. (tracemalloc cannot see torch's allocator and torch.cuda's counters do
not exist on CPU.) In fwdbwd the (N, V) gradient of the given logits (403 MB) is part of every
variant's extra memory; the fused variants produce only hidden/weight gradients.
Time: another fresh process with default malloc, 2 warm-up calls, median (min, max) of --repeats.

GAE at B = 64, T = 1024 (right-padded, random lengths): ours = rlhf_cli.kernels.gae (doubling scan)
vs TRL's Python loop over T (trl 1.12.0 experimental PPOTrainer; re-expressed here, it is plain torch)
and our own loop oracle (advantages.gae_loop). Results: benchmarks/results/kernels_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, OURS_PY, PEER_PY, RESULTS, bench_env, cpu_info, summarize, versions, write_json  # noqa: E402

OUT = RESULTS / "kernels_cpu.json"
LOGITS = ["ours", "ours_entropy", "naive", "naive_entropy", "compiled", "trl"]
FUSED = ["ours", "ours_entropy", "naive", "compiled", "trl"]
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# --- worker side (runs in .venv or .bench-venv) ---------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _make_fn(group: str, variant: str, n: int, v: int, h: int):
    """Inputs (made in place: no temporaries) and a zero-argument callable returning log-probs."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, v, (n,), generator=g)
    if group == "logits":
        x = torch.empty(n, v).normal_(0.0, 3.0, generator=g)
        inputs = [x]

        def logits():
            return x
    else:
        hid = torch.empty(n, h).normal_(generator=g)
        w = torch.empty(v, h).normal_(0.0, 3.0 / h**0.5, generator=g)
        inputs = [hid, w]

        def logits():
            return F.linear(hid, w)

    def naive():
        return logits().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

    if variant.startswith("ours"):
        from rlhf_cli.kernels import fused_linear_logprobs, token_logprobs

        ent = variant == "ours_entropy"
        if group == "logits":
            fn = lambda: token_logprobs(x, y, with_entropy=ent)  # noqa: E731
        else:
            fn = lambda: fused_linear_logprobs(hid, w, y, with_entropy=ent)  # noqa: E731
    elif variant == "naive":
        fn = naive
    elif variant == "naive_entropy":

        def fn():
            lp = logits().log_softmax(-1)
            return lp.gather(-1, y[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
    elif variant == "compiled":
        fn = torch.compile(naive)
    elif variant == "trl":
        from trl.trainer.utils import selective_log_softmax

        fn = lambda: selective_log_softmax(logits(), y)  # noqa: E731
    else:
        raise SystemExit(f"unknown variant {variant}")
    return fn, inputs


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn, inputs = _make_fn(args.group, args.variant, args.n, args.v, args.h)

    def call():
        if args.mode == "fwd":
            with torch.no_grad():
                out = fn()
        else:
            for t in inputs:
                t.requires_grad_(True)
                t.grad = None
            out = fn()
            lp = out[0] if isinstance(out, tuple) else out
            loss = lp.sum() + (out[1].sum() if isinstance(out, tuple) else 0.0)
            loss.backward()
        lp = out[0] if isinstance(out, tuple) else out
        return float(lp.detach().double().sum())

    res: dict = {"group": args.group, "variant": args.variant, "mode": args.mode, "loadavg": os.getloadavg()}
    t0 = time.perf_counter()
    res["checksum"] = call()  # warm-up (and compile)
    res["first_call_s"] = time.perf_counter() - t0
    if args.measure == "memory":
        for t in inputs:
            t.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib()
        call()
        res["extra_peak_mib"] = (_hwm_kib() - before) / 1024
        res["rss_before_mib"] = before / 1024
    else:
        call()
        times = []
        for _ in range(args.repeats):
            for t in inputs:
                t.grad = None
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        res["seconds"] = summarize(times)
        res["times"] = times
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res))


# --- driver ----------------------------------------------------------------------------------------------


def env(args: argparse.Namespace) -> dict[str, str]:
    t = str(args.threads)
    return {**bench_env(), "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}


def run(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def logprob_runs(args: argparse.Namespace, group: str, variants: list[str]) -> list[dict]:
    rows = []
    for mode in ("fwd", "fwdbwd"):
        for variant in variants:
            py = PEER_PY if variant == "trl" else OURS_PY
            if not py.exists():
                print(f"  skip {group}/{variant}: {py} missing", file=sys.stderr)
                continue
            base = [str(py), __file__, "--worker", "--group", group, "--variant", variant, "--mode", mode,
                    "--n", str(args.n), "--v", str(args.v), "--h", str(args.h), "--repeats", str(args.repeats),
                    "--threads", str(args.threads)]
            mem = run(base + ["--measure", "memory"], {**env(args), **MEM_ENV})
            tim = run(base + ["--measure", "time"], env(args))
            row = {**tim, "extra_peak_mib": mem["extra_peak_mib"], "checksum_mem_run": mem["checksum"]}
            rows.append(row)
            s = row["seconds"]
            print(f"  {group:6} {mode:6} {variant:13} extra {row['extra_peak_mib']:8.1f} MiB   "
                  f"median {s['median'] * 1e3:8.1f} ms  (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f})  "
                  f"load {row['loadavg'][0]:.1f}", file=sys.stderr)
    return rows


def gae_run(args: argparse.Namespace) -> dict:
    cmd = [str(OURS_PY), __file__, "--gae-worker", "--repeats", str(max(args.repeats, 15)), "--threads", str(args.threads)]
    return run(cmd, env(args))


def gae_worker(args: argparse.Namespace) -> None:
    import torch

    from rlhf_cli.kernels import gae
    from rlhf_cli.kernels.advantages import gae_loop

    torch.set_num_threads(args.threads)
    b, t, gamma, lam = 64, 1024, 1.0, 0.95
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]

    def trl_loop():
        # trl 1.12.0 trl/experimental/ppo/ppo_trainer.py: padding zeroed first, then the loop over T
        r = rewards.masked_fill(~mask, 0.0)
        v = values.masked_fill(~mask, 0.0)
        lastgaelam = 0
        advantages_reversed = []
        gen_length = r.shape[1]
        for i in reversed(range(gen_length)):
            nextvalues = v[:, i + 1] if i < gen_length - 1 else 0.0
            delta = r[:, i] + gamma * nextvalues - v[:, i]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        adv = torch.stack(advantages_reversed[::-1], axis=1)
        return adv, adv + v

    fns = {"ours": lambda: gae(rewards, values, mask, gamma, lam), "trl_loop": trl_loop,
           "ours_loop": lambda: gae_loop(rewards, values, mask, gamma, lam)}
    res: dict = {"B": b, "T": t, "loadavg": os.getloadavg()}
    ref = fns["ours_loop"]()[0]
    res["max_abs_diff_ours_vs_loop"] = float((fns["ours"]()[0] - ref).abs().max())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every variant alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name in fns:
        res[name] = summarize(times[name])
    res["speedup_vs_trl_loop"] = res["trl_loop"]["median"] / res["ours"]["median"]
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gae-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--group", default="logits")
    ap.add_argument("--variant", default="ours")
    ap.add_argument("--mode", default="fwd")
    ap.add_argument("--measure", default="time")
    ap.add_argument("--only", choices=["logits", "fused", "gae"], action="append")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--h", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (BENCHMARKS.md: 2; 1 shows the cost without barriers)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.gae_worker:
        return gae_worker(args)
    only = set(args.only or ["logits", "fused", "gae"])
    result = json.loads(args.out.read_text()) if args.out.exists() else {}  # keep the runs not redone this time
    result.update({"cpu": cpu_info(), "versions_ours": versions("torch", "triton"),
                   "versions_peer": {"trl": "1.16.0 (.bench-venv)" if PEER_PY.exists() else "absent"}})
    key = f"threads={args.threads}"
    runs = result.setdefault(key, {})
    runs["config"] = {"N": args.n, "V": args.v, "H": args.h, "dtype": "float32", "threads": args.threads, "repeats": args.repeats}
    if "logits" in only:
        runs["logits"] = logprob_runs(args, "logits", LOGITS)
    if "fused" in only:
        runs["fused"] = logprob_runs(args, "fused", FUSED)
    if "gae" in only:
        runs["gae"] = gae_run(args)
        gr = runs["gae"]
        print(f"  gae    B=64 T=1024  ours {gr['ours']['median'] * 1e3:.2f} ms   TRL loop {gr['trl_loop']['median'] * 1e3:.2f} ms"
              f"   -> {gr['speedup_vs_trl_loop']:.1f}x", file=sys.stderr)
    result["loadavg_end"] = os.getloadavg()
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
