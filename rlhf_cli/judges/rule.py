"""`rule` judges: verifiable correctness against a reference field (the seed's "RL-style feedback").

Each completion scores 1.0 (correct) or 0.0 (wrong) against the row's reference field
(`--reference answer`), or None when the row has none (`pairwise` turns that into an error that
names the row). No model, no torch: a rule judge is instant, deterministic and free.

    rule:exact            normalised exact match (case, surrounding space/quotes, a final period)
    rule:contains         the normalised reference occurs in the normalised completion as whole
                          words ("Paris" in "The capital is Paris."; "4" not in "42", "4.5" or
                          "1,400"): for short factual answers inside a sentence (`rlhf known`)
    rule:last-number      the completion's last number == the reference's last number
                          ("1,234" == "1234", "5.0" == "5", "-3" != "3")
    rule:gsm8k            the reference's `#### N` vs the completion's `#### N`, else its last number
    rule:regex:PATTERN    PATTERN's first group (or whole match) in the completion vs the same in the
                          reference, or vs the whole reference when PATTERN does not match it
    rule:FILE.py:FN       your function FN(completion, row) -> bool | float | None

A list-valued reference accepts any of its entries.

    rlhf pairwise samples.jsonl --judge rule:gsm8k --reference answer > pairs.jsonl
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import JudgeOptions

RULES = "exact, contains, last-number, gsm8k, regex:PATTERN or FILE.py:FN"

# A number: optional sign (not when glued to a preceding word/digit, so "3-5" is 3 and 5),
# thousands groups "1,234,567" or plain digits, optional decimals. "$18.00" -> 18.00.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+\u2212]?\.\d+")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")


def normalise(text: str) -> str:
    """Compare answers, not formatting: NFKC, case-folded, whitespace collapsed, surrounding
    quotes/space and one final sentence period stripped. Kept light on purpose: SQuAD's
    normaliser drops all punctuation, which would make "3.5" equal "35"."""
    t = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    t = t.strip(" \"'`")
    if t.endswith(".") and not _NUMBER.fullmatch(t):
        t = t[:-1].rstrip()
    return t


def parse_number(text: str) -> Decimal | None:
    """'1,234' -> 1234, '5.0' -> 5.0 (== 5), '\u22123' -> -3; None if `text` is not one number."""
    t = text.strip().replace(",", "").replace("\u2212", "-").lstrip("+")
    try:
        return Decimal(t)
    except InvalidOperation:
        return None


def last_number(text: str) -> Decimal | None:
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def gsm8k_number(text: str) -> Decimal | None:
    """GSM8K's final answer line `#### 72` if there is one, else the last number in the text."""
    m = _GSM8K_ANSWER.findall(text)
    if m:
        n = last_number(m[-1])
        if n is not None:
            return n
    return last_number(text)


def contains_answer(completion: str, reference: str) -> bool:
    """`reference` (normalised) occurs in `completion` (normalised) with no word character on either
    side, and no digit across a decimal point or thousands comma, so "4" is not found in "42",
    "4.5" or "1,400". An empty reference is never found (it would be in every completion)."""
    want = normalise(reference)
    if not want:
        return False
    got = normalise(completion)
    return re.search(rf"(?<!\w)(?<!\d[.,]){re.escape(want)}(?![.,]?\d)(?!\w)", got) is not None


def same_answer(a: str, b: str) -> bool:
    """Numerically equal if both read as numbers, else equal after `normalise`."""
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return na == nb
    return normalise(a) == normalise(b)


class RuleJudge:
    """A ScoreJudge: 1.0 correct, 0.0 wrong, None where the row has no reference."""

    kind = "rule"

    def __init__(self, arg: str, opts: JudgeOptions) -> None:
        self.arg = arg
        self.reference = opts.reference_field
        self._file_sha: str | None = None
        self._check: Callable[[str, Any], bool | None]
        self._fn: Callable[..., Any] | None = None
        if arg == "exact":
            self._check = lambda c, ref: same_answer(c, ref) if isinstance(ref, str) else _eq_num(parse_number(c), ref)
        elif arg == "contains":
            self._check = lambda c, ref: not isinstance(ref, bool) and contains_answer(c, str(ref))
        elif arg == "last-number":
            self._check = lambda c, ref: _eq_num(last_number(c), ref, last_number)
        elif arg == "gsm8k":
            self._check = lambda c, ref: _eq_num(gsm8k_number(c), ref, gsm8k_number)
        elif arg.startswith("regex:"):
            self._check = self._regex_rule(arg[len("regex:"):])
        elif ".py:" in arg:
            self._fn = self._load_function(arg)
        else:
            raise RlhfError(f"--judge rule:{arg}: unknown rule", f"rules: {RULES}")

    # ------------------------------------------------------------------ construction

    def _regex_rule(self, pattern: str) -> Callable[[str, Any], bool | None]:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise RlhfError(f"--judge rule:regex:{pattern}: bad regular expression ({e})") from None

        def extract(text: str) -> str | None:
            m = rx.search(text)
            if m is None:
                return None
            return m.group(1) if rx.groups else m.group(0)

        def check(completion: str, ref: Any) -> bool:
            got = extract(completion)
            if got is None:
                return False
            ref = str(ref)
            want = extract(ref)
            return same_answer(got, want if want is not None else ref)

        return check

    def _load_function(self, arg: str) -> Callable[..., Any]:
        path_s, _, fn_name = arg.rpartition(":")
        path = Path(path_s)
        if not path.is_file():
            raise RlhfError(f"--judge rule:{arg}: {path_s}: no such file", "give rule:path/to/file.py:function")
        self._file_sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(f"rlhf_rule_{self._file_sha}", path)
        if spec is None or spec.loader is None:
            raise RlhfError(f"{path_s}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error there is theirs to fix
            raise RlhfError(f"{path_s}: failed to import ({type(e).__name__}: {e})") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RlhfError(f"{path_s}: no function {fn_name!r}", f"functions there: {', '.join(names) or 'none'}")
        return fn

    # ------------------------------------------------------------------ the ScoreJudge interface

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "rule", "name": f"rule:{self.arg}"}
        if self._fn is None:
            d["reference"] = self.reference
        else:
            d["file_sha256"] = self._file_sha
        return d

    def score(self, items: list[Item]) -> list[list[float | None]]:
        return [[self._score_one(c, it) for c in it.completions] for it in items]

    def close(self) -> None:
        pass

    def _score_one(self, completion: str, item: Item) -> float | None:
        if self._fn is not None:
            return self._call_user(completion, item)
        ref = item.row.get(self.reference)
        if ref is None:
            return None
        refs = ref if isinstance(ref, list) else [ref]
        return 1.0 if any(self._check(completion, r) for r in refs) else 0.0

    def _call_user(self, completion: str, item: Item) -> float | None:
        assert self._fn is not None
        path = self.arg.rpartition(":")[0]
        try:
            out = self._fn(completion, item.row)
        except Exception as e:
            raise RlhfError(f"{path}: {self.arg.rpartition(':')[2]}() raised {type(e).__name__}: {e} on {item.where}") from None
        if out is None:
            return None
        if isinstance(out, (bool, int, float)):
            return float(out)
        raise RlhfError(f"{path}: {self.arg.rpartition(':')[2]}() returned {type(out).__name__} on {item.where}", "return a bool or a float")


def _eq_num(got: Decimal | None, ref: Any, extract: Callable[[str], Decimal | None] = parse_number) -> bool:
    """Compare an extracted number with a reference that is a JSON number or text holding one."""
    if got is None:
        return False
    if isinstance(ref, bool):
        return False
    want = Decimal(str(ref)) if isinstance(ref, (int, float)) else extract(str(ref))
    return want is not None and got == want
