"""Best-of-n at inference: `rlhf eval exact|code|winrate ... -n K --select JUDGE`.

Each question gets K samples; a score judge (`rm:PATH`, a `rule:`) scores every sample, and the
answer kept is the one it scores highest: AlpacaFarm's best-of-n, with whatever judge the user
trusts. The eval's own metric (exact match, tests passed, a win against the reference) is then
reported for the kept answer at n = 1, 2, 4, ..., K, so one set of K samples draws the whole curve:

    best_of_n = E[ metric of the judge's favourite among n samples drawn without replacement from the K ]
              = sum_r C(K-1-r, n-1) / C(K, n) * v_(r)

where v_(r) is the metric of the sample the judge ranks r-th (0 = top) of K: the r-th is the
favourite of an n-subset exactly when the subset holds it and n - 1 of the K - 1 - r below it.
Like pass@k's estimator (Chen et al. 2021) this is unbiased for n < K, and has less variance than
drawing one n-subset. Equal judge scores are broken uniformly at random, so a tied group shares its
probability and is credited with its mean metric. best_of_1 is the mean single-sample metric;
best_of_K is the metric of the judge's choice among all K.

    curve = best_of_curve([(judge_scores, metric_values), ...], n=8)   # {"best_of_1": .., "best_of_1_stderr": .., ...}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from rlhf_cli.errors import RlhfError

SelectOpt = Annotated[
    str | None,
    typer.Option("--select", help="With -n K: keep each question's answer that this score judge (rm:PATH, rule:...) scores highest; "
                 "reports the metric for best-of-1, 2, 4 ... K.", show_default=False),
]


def sizes(k: int) -> list[int]:
    """The n of the curve: powers of two up to K, and K itself."""
    out = [1]
    while out[-1] * 2 <= k:
        out.append(out[-1] * 2)
    return out if out[-1] == k else [*out, k]


def best_of(scores: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected metric of the judge's favourite among n of the K samples (module docstring)."""
    k = len(scores)
    if not 1 <= n <= k or len(values) != k:
        raise ValueError(f"best_of: n={n} with {k} scores and {len(values)} values")
    order = sorted(range(k), key=lambda j: -scores[j])
    total, r = 0.0, 0
    while r < k:  # walk the groups of equal score, best first
        end = r
        while end < k and scores[order[end]] == scores[order[r]]:
            end += 1
        p = sum(math.comb(k - 1 - q, n - 1) for q in range(r, end)) / math.comb(k, n)
        total += p * sum(values[order[q]] for q in range(r, end)) / (end - r)
        r = end
    return total


def kept_index(scores: Sequence[float]) -> int:
    """The sample the judge keeps among all K: the highest score, the first of equal ones."""
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def best_of_curve(per_question: Sequence[tuple[Sequence[float], Sequence[float]]], k: int) -> dict[str, float]:
    """{"best_of_N": mean over questions, "best_of_N_stderr": its standard error} for N in sizes(k)."""
    from rlhf_cli.evals.base import mean_stderr

    out: dict[str, float] = {}
    for n in sizes(k):
        mean, se = mean_stderr([best_of(s, v, n) for s, v in per_question])
        out[f"best_of_{n}"], out[f"best_of_{n}_stderr"] = mean, se
    return out


def select_judge(spec: str, device: str, dtype: str, batch_size: int, seed: int, trust_remote_code: bool,
                 reference_field: str = "answer") -> Any:
    """Build the --select judge: score judges only (a pair judge would need K(K-1) asks per question)."""
    from rlhf_cli.judges import build_judge
    from rlhf_cli.judges.base import JudgeOptions, ScoreJudge

    opts = JudgeOptions(reference_field=reference_field, device=device, dtype=dtype, batch_size=batch_size, seed=seed,
                        trust_remote_code=trust_remote_code)
    judge = build_judge(spec, opts)
    if not isinstance(judge, ScoreJudge):
        close = getattr(judge, "close", None)
        if close is not None:
            close()
        raise RlhfError(f"--select {spec}: a pair judge; best-of-n at eval time needs a score judge (rm:PATH, rule:...)",
                        "rank sample rows with a pair judge through `rlhf select --judge ...` instead")
    return judge


def score_samples(judge: Any, prompts: Sequence[str], samples: Sequence[Sequence[str]], rows: Sequence[dict[str, Any]],
                  chunk: int = 256) -> list[list[float]]:
    """The judge's score of every sample of every question (question i: `prompts[i]`, its K
    `samples[i]`, `rows[i]` the fields a rule judge may read, e.g. the reference answer)."""
    from rlhf_cli.data.records import Item

    items = [Item(i, p, tuple(s), {"prompt": p, **row}) for i, (p, s, row) in enumerate(zip(prompts, samples, rows, strict=True))]
    out: list[list[float]] = []
    for b in range(0, len(items), chunk):
        for it, got in zip(items[b : b + chunk], judge.score(items[b : b + chunk]), strict=True):
            if any(x is None for x in got):
                raise RlhfError(f"--select: the judge could not score question {it.id}'s samples", "a rule judge needs the reference field it names")
            out.append([float(x) for x in got])
    return out


def plot_curve(results: Sequence[Any], path: str, metric: str) -> None:
    """metric of the kept answer against n (log2 axis), one line per model; atomic PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from rlhf_cli.data.jsonl import atomic_file

    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    for r in results:
        ns = [int(k[len("best_of_"):]) for k in r.metrics if k.startswith("best_of_") and not k.endswith("_stderr")]
        if ns:
            ys = [r.metrics[f"best_of_{n}"] for n in ns]
            es = [r.metrics.get(f"best_of_{n}_stderr", 0.0) for n in ns]
            ax.errorbar(ns, ys, yerr=[e if math.isfinite(e) else 0.0 for e in es], marker="o", capsize=3, label=r.model)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (samples the judge chooses from)")
    ax.set_ylabel(f"{metric} of the kept answer")
    ax.set_title(f"best-of-n, rlhf eval {results[0].kind}" if results else "best-of-n")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_file(path) as f:
        f.write(buf.getvalue())


def add_best_of(result: Any, judge: Any, prompts: Sequence[str], samples: Sequence[Sequence[str]], rows: Sequence[dict[str, Any]],
                values: Sequence[Sequence[float]]) -> list[list[float]]:
    """Score every sample with the --select judge and put the best-of-n curve into an EvalResult
    (its headline becomes best_of_K, K the fewest samples any question has); returns the scores."""
    scores = score_samples(judge, prompts, samples, rows)
    k = min(len(s) for s in samples)
    result.metrics.update(best_of_curve(list(zip(scores, values, strict=True)), k))
    result.primary = f"best_of_{k}"
    result.extra["select"] = judge.describe()
    return scores
