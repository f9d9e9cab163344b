"""Driving a judge over sample rows, shared by `rlhf pairwise` and `rlhf select`: score judges number
every completion, pair judges answer ordered asks (both orders, a seeded pair plan, answers in any
order); a prompt is finished, and handed to `finish(item, decisions, scores)`, once all of its
answers are in. Plus the resumable writer both commands stream through.

    drive.score_all(judge, items, tally, finish, max_pairs=None, seed=0)
    stopped = drive.ask_all(judge, items, tally, finish, max_pairs=None, seed=0, both_orders=None)
    writer = drive.PromptWriter("pairs.jsonl", append=False)   # rows, then the prompt id in pairs.jsonl.progress
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges import combine
from rlhf_cli.judges.base import Ask, PairJudge, ScoreJudge, Verdict
from rlhf_cli.judges.combine import Tally

Finish = Callable[..., None]  # finish(item, decisions, scores=None)


def score_all(judge: ScoreJudge, todo: list[Item], tally: Tally, finish: Finish, max_pairs: int | None, seed: int) -> None:
    """Score judges: one number per completion; a pair's winner is the higher score."""
    # a rule is instant: score everything first, so that a missing reference fails before any output
    chunk = max(1, len(todo)) if judge.kind == "rule" else 256
    for b in range(0, len(todo), chunk):
        part = todo[b : b + chunk]
        scores = check_scores(part, judge.score(part))
        tally.asks += sum(len(it.completions) for it in part)
        for it, s in zip(part, scores, strict=True):
            pairs = combine.plan_pairs(it.id, it.completions, max_pairs, seed)
            finish(it, [combine.score_decision(i, j, s[i], s[j]) for i, j in pairs], s)


def ask_all(judge: PairJudge, todo: list[Item], tally: Tally, finish: Finish, max_pairs: int | None, seed: int,
            both_orders: bool | None) -> str | None:
    """Pair judges: stream ordered asks, collect answers in whatever order they come, and finish a
    prompt as soon as all of its asks are answered. Returns why the judge stopped early, if it did."""
    both = both_orders if both_orders is not None else judge.kind in ("lm", "api")
    plans = {
        it.id: [((i, j), combine.ask_orders(it.id, i, j, both, seed)) for i, j in combine.plan_pairs(it.id, it.completions, max_pairs, seed)]
        for it in todo
    }
    pending = {it.id: sum(len(orders) for _, orders in plans[it.id]) for it in todo}
    answers: dict[tuple[Any, int, int], Verdict] = {}

    def asks() -> Iterator[Ask]:
        for it in todo:
            for _, orders in plans[it.id]:
                yield from (Ask(it, first, second) for first, second in orders)

    for it in todo:
        if not pending[it.id]:
            del pending[it.id]
            finish(it, [])  # one distinct completion: nothing to compare
    for ask, verdict in judge.judge(asks()):
        it, key = ask.item, (ask.item.id, ask.first, ask.second)
        if it.id not in pending or key in answers:
            continue  # answered twice: the first answer stands
        answers[key] = verdict
        tally.ask(verdict)
        pending[it.id] -= 1
        if pending[it.id] == 0:
            del pending[it.id]
            finish(it, [combine.combine_orders(i, j, [(o, answers.pop((it.id, *o))) for o in orders]) for (i, j), orders in plans[it.id]])
    if judge.stopped:
        return judge.stopped
    return "the judge ended before answering every pair" if pending else None


def check_references(items: list[Item], reference: str) -> None:
    """Rule judges score against each row's reference field: a row without one is an input error
    naming the first such row (and, when no row has one, the fields the rows do have)."""
    missing = [it for it in items if it.row.get(reference) is None]
    if not missing:
        return
    first = missing[0]
    if len(missing) < len(items):
        raise RlhfError(f"{first.where}: no reference field {reference!r}, so the judge cannot score this row "
                        f"({len(missing)} of {len(items)} rows lack it)", "give every row a reference, or drop the rows without one")
    seen = ", ".join(sorted(k for k in first.row if k not in combine.PER_COMPLETION))
    raise RlhfError(f"{first.where}: no reference field {reference!r}, and no other row has one either",
                    f"the rows have: {seen}; name the reference field with --reference FIELD")


def check_scores(part: list[Item], scores: list[list[float | None]]) -> list[list[float]]:
    """The scores, checked: a completion the judge could not score (a rule:FILE.py:FN that returned
    None) is an input error."""
    missing = next((it for it, s in zip(part, scores, strict=True) if any(x is None for x in s)), None)
    if missing is not None:
        raise RlhfError(f"{missing.where}: the judge could not score this row", "make the rule return a bool or a number for every row")
    return cast("list[list[float]]", scores)  # no None left




def progress_path(path: str) -> Path:
    return Path(f"{path}.progress")


def resume_state(path: str) -> set[str]:
    """Prompt ids finished in a resume file. `FILE.progress` lists them (prompts that gave no row
    too); rows of a prompt not listed there (a kill between its rows and its mark) are removed."""
    import orjson

    from rlhf_cli.data.jsonl import iter_jsonl, truncate_partial_last_line, write_jsonl_atomic

    p, prog = Path(path), progress_path(path)
    if not p.exists():
        prog.unlink(missing_ok=True)
        return set()
    truncate_partial_last_line(p)
    rows = [line.data for line in iter_jsonl(path)]
    if not prog.exists():
        return {_prompt_id(r) for r in rows}
    truncate_partial_last_line(prog)
    done = {str(orjson.loads(ln)) for ln in prog.read_bytes().splitlines() if ln.strip()}
    keep = [r for r in rows if _prompt_id(r) in done]
    if len(keep) < len(rows):
        write_jsonl_atomic(path, keep)
    return done


def _prompt_id(row: dict[str, Any]) -> str:
    rid = str(row.get("id"))
    return rid if "ranking" in row else rid.rpartition(":")[0]


class PromptWriter:
    """Writes each finished prompt's rows, then (to a file) marks the prompt in `FILE.progress`.

    Opened on the first prompt, so an input error found while scoring leaves no file behind.
    """

    def __init__(self, path: str, append: bool) -> None:
        self.path, self.append, self.rows = path, append, 0
        self._sink: Any = None
        self._progress: Any = None

    def _open(self) -> None:
        from rlhf_cli.data.jsonl import JsonlSink

        self._sink = JsonlSink(self.path, append=self.append)
        if self.path != "-":
            self._progress = progress_path(self.path).open("ab" if self.append else "wb")

    def write(self, prompt_id: Any, rows: list[dict[str, Any]]) -> None:
        import os

        from rlhf_cli.data.jsonl import dumps

        if self._sink is None:
            self._open()
        for row in rows:
            self._sink.write(row)
        self.rows += len(rows)
        self._sink.sync()
        if self._progress is not None:
            self._progress.write(dumps(prompt_id))
            self._progress.flush()
            os.fsync(self._progress.fileno())

    def close(self, create: bool) -> None:
        if self._sink is None and create:
            self._open()
        if self._sink is not None:
            self._sink.close()
        if self._progress is not None:
            self._progress.close()


def tell_stopped(stopped: str, finished: int, total: int, output: str) -> None:
    """Why the judge stopped early, what was written, and how to continue (stderr)."""
    from rlhf_cli.console import info, warn

    warn(f"the judge stopped early ({stopped}): {finished} of {total} prompts finished and written")
    if output != "-":
        info(f"continue: the same command with --output {output} --resume")
    else:
        info("the rows so far went to stdout; write to a file (--output FILE) so that --resume can continue")
