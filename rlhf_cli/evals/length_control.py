"""AlpacaEval 2's length-controlled win rate: a logistic GLM of the judge's preferences on the length
difference, read off with the length term set to zero (Dubois et al. 2024, "Length-Controlled
AlpacaEval"; alpaca_eval's src/alpaca_eval/metrics/glm_winrate.py). Pure numpy, no I/O.

    from rlhf_cli.evals.length_control import length_controlled
    lc = length_controlled(preferences, cand_len=[812, 95], ref_len=[640, 410])
    lc["lc_win_rate"], lc["lc_standard_error"], lc["weights"], lc["predicted"]

`rlhf eval winrate` calls it once per candidate set; `fit_logistic` is the Newton solver under it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

L2 = 1e-3  # the GLM's ridge penalty (on the summed log-loss): only matters when the data are separable


def fit_logistic(X: Any, y: Any, l2: float = L2, max_iter: int = 100) -> Any:
    """Logistic regression with soft labels y in [0, 1], no separate intercept (a column of ones is
    a feature), ridge `l2` on the summed log-loss: argmin_b sum_i [softplus(x_i b) - y_i x_i b] + l2/2 |b|^2.
    Newton's method with backtracking (the objective is strictly convex for l2 > 0). X (N, D), y (N,) -> b (D,)."""
    import numpy as np

    def loss(b: Any) -> float:
        z = X @ b
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * b @ b)

    b = np.zeros(X.shape[1])
    for _ in range(max_iter):
        q = 1.0 / (1.0 + np.exp(-(X @ b)))
        g = X.T @ (q - y) + l2 * b
        if np.max(np.abs(g)) < 1e-10:
            break
        h = (X * (q * (1 - q))[:, None]).T @ X + l2 * np.eye(len(b))
        step, t, f0 = np.linalg.solve(h, g), 1.0, loss(b)
        while loss(b - t * step) > f0 - 1e-4 * t * (g @ step) and t > 1e-12:
            t /= 2
        b = b - t * step
    return b


def length_controlled(preferences: Sequence[float | None], cand_len: Sequence[int], ref_len: Sequence[int],
                      difficulty: Sequence[float] | None = None, l2: float = L2) -> dict[str, Any]:
    """AlpacaEval 2's length-controlled win rate (Dubois et al. 2024; metrics/glm_winrate.py), for one
    candidate against the reference.

    The GLM: P(candidate better)_i = sigmoid(w_len tanh(delta_i / sd(delta)) [+ w_diff difficulty_i] + b),
    delta_i = len(reference_i) - len(candidate_i) in characters (AlpacaEval's len_1 - len_2, sd with
    ddof 1 over all rows), fitted to y = preference - 1 (soft labels, rows without a preference
    left out). LC = 100 mean_i sigmoid(w_diff difficulty_i + b): the same model with the length term
    set to 0, averaged over all rows. Its standard error is the delta method over a sandwich
    (heteroscedasticity-robust) covariance of the weights, which suits soft labels.

    Terms kept from AlpacaEval's `length_controlled_v1` formula
    `np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline - 1`: the length term; the
    model term (not_gamed_baseline is 1 on every row of a single model, so it is this intercept b);
    instruction difficulty only when given (it is fitted jointly across many models, which one
    model's rows cannot identify). Dropped: the regularisation towards the "gamed" verbose / concise
    baselines (their annotations are not public outside the HF hub), and the L1 penalty with a
    cross-validated C (here: a small fixed ridge `l2`, which only matters for separable data).
    """
    import numpy as np

    y = np.array([np.nan if p is None else (1.5 if p == 0 else p) - 1.0 for p in preferences], dtype=float)
    n = len(y)
    delta = np.asarray(ref_len, dtype=float) - np.asarray(cand_len, dtype=float)
    sd = float(delta.std(ddof=1)) if n > 1 else 0.0
    x_len = np.tanh(delta / sd) if sd > 0 else np.zeros(n)
    cols = [x_len, *([np.asarray(difficulty, dtype=float)] if difficulty is not None else []), np.ones(n)]
    X = np.stack(cols, 1)  # (N, D)
    X0 = X.copy()
    X0[:, 0] = 0.0  # the counterfactual: no length difference
    ok = ~np.isnan(y)
    names = ["length", *(["difficulty"] if difficulty is not None else []), "bias"]
    if not ok.any():
        return {"lc_win_rate": math.nan, "lc_standard_error": math.nan, "weights": None, "predicted": [None] * n}
    Xf, yf = X[ok], y[ok]
    b = fit_logistic(Xf, yf, l2)
    p0 = 1.0 / (1.0 + np.exp(-(X0 @ b)))  # (N,)
    # sandwich covariance H^-1 S H^-1, then the delta method through mean_i sigmoid(x0_i b)
    q = 1.0 / (1.0 + np.exp(-(Xf @ b)))
    h = (Xf * (q * (1 - q))[:, None]).T @ Xf + l2 * np.eye(len(b))
    r = (q - yf)[:, None] * Xf
    h_inv = np.linalg.inv(h)
    cov = h_inv @ (r.T @ r) @ h_inv
    grad = (p0 * (1 - p0)) @ X0 / n  # d LC / d b, (D,)
    se = float(np.sqrt(max(grad @ cov @ grad, 0.0))) if ok.sum() > 1 else math.nan
    return {"lc_win_rate": 100 * float(p0.mean()), "lc_standard_error": 100 * se,
            "weights": dict(zip(names, (float(v) for v in b), strict=True)), "predicted": [float(v) for v in p0]}
