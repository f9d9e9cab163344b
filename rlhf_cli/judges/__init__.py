"""Judges for `rlhf pairwise`: `rule:...`, `rm:PATH`, `lm:MODEL`, `api:MODEL`, `human`.

Each judge lives in its own module, imported only when asked for, so `rlhf --help` stays fast and
a rule judge never imports torch. See `base.py` for the interface.
"""

from __future__ import annotations

from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions, PairJudge, ScoreJudge, Verdict

__all__ = ["Ask", "JudgeOptions", "PairJudge", "ScoreJudge", "Verdict", "build_judge", "JUDGE_SPECS"]

JUDGE_SPECS = "rule:exact|rule:contains|rule:last-number|rule:gsm8k|rule:regex:PATTERN|rule:FILE.py:FN, rm:PATH, lm:MODEL, api:MODEL or human"


def build_judge(spec: str, opts: JudgeOptions) -> ScoreJudge | PairJudge:
    """Parse a `--judge` value and construct the judge (cheap validation first, models last)."""
    kind, _, arg = spec.partition(":")
    if kind == "rule":
        from rlhf_cli.judges.rule import RuleJudge

        return RuleJudge(arg, opts)
    if kind == "rm" and arg:
        from rlhf_cli.judges.rm import RewardModelJudge

        return RewardModelJudge(arg, opts)
    if kind == "lm" and arg:
        from rlhf_cli.judges.lm import LocalLMJudge

        return LocalLMJudge(arg, opts)
    if kind == "api" and arg:
        from rlhf_cli.judges.api import ApiJudge

        return ApiJudge(arg, opts)
    if kind == "human" and not arg:
        from rlhf_cli.judges.human import HumanJudge

        return HumanJudge(opts)
    raise RlhfError(f"--judge {spec!r} is not a judge", f"use one of: {JUDGE_SPECS}")
