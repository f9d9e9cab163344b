"""The pairwise prompt that `lm:MODEL` and `api:MODEL` judges answer: one built-in default, or
`--template FILE`.

The built-in prompt follows the shape of LLMBar's "Vanilla" comparison prompt (Zeng et al. 2023,
"Evaluating Large Language Models at Evaluating Instruction Following", princeton-nlp/LLMBar
`LLMEvaluator/evaluators/prompts/comparison/`) and AlpacaEval's pairwise annotators: the
instruction, "Output (a)" and "Output (b)", and a request to name the better one. We ask for a
single letter so that the verdict is one token whose log-probability we can read (lm) or request
(api), instead of text to parse.

A template file is either
  * plain text: the user message, with the fields {instruction} {output_a} {output_b}; or
  * a `.json` file `{"system": "...", "user": "..."}` (system optional) for a system message too.
Fields are `str.format` fields; write literal braces as `{{` and `}}`. All three must appear.

    tpl = load_template(None)                   # the built-in one
    tpl.messages("2+2?", "4", "5")              # -> [{"role": "system", ...}, {"role": "user", ...}]
    tpl.hash                                    # "3f2a..." : in every row's judge provenance and cache key
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.errors import RlhfError

FIELDS = ("instruction", "output_a", "output_b")

SYSTEM = "You are a careful judge of answers written by AI assistants. You pick the output that follows the instruction better."

USER = """Which output follows the instruction better? Judge whether it does what the instruction asks, and how helpful, \
accurate and harmless it is. Do not let the length of the outputs or their order sway you.

# Instruction:
{instruction}

# Output (a):
{output_a}

# Output (b):
{output_b}

# Which is better, Output (a) or Output (b)? Answer with one letter only: a or b."""


@dataclass(frozen=True)
class PairTemplate:
    """A system message (or None) and a user message with the three fields."""

    system: str | None
    user: str
    source: str = "builtin"  # "builtin" or the file it came from

    @property
    def hash(self) -> str:
        """16 hex digits of sha256 over the template text: same text, same hash, wherever it lives."""
        canon = json.dumps({"system": self.system, "user": self.user}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def messages(self, instruction: str, output_a: str, output_b: str) -> list[dict[str, str]]:
        """Chat messages for one ordered ask (the outputs' own braces are never re-interpreted)."""
        values = {"instruction": instruction, "output_a": output_a, "output_b": output_b}
        msgs = [{"role": "system", "content": self.system.format(**values)}] if self.system else []
        return [*msgs, {"role": "user", "content": self.user.format(**values)}]


BUILTIN = PairTemplate(SYSTEM, USER)


def load_template(path: str | None) -> PairTemplate:
    """The built-in template (path None) or a validated template file."""
    if path is None:
        return BUILTIN
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RlhfError(f"{path}: cannot read the template ({e.__class__.__name__})", "give a UTF-8 text or .json file") from None
    system: str | None = None
    user = text
    if p.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RlhfError(f"{path}:{e.lineno}: not valid JSON: {e.msg}", 'a .json template is {"system": "...", "user": "..."}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("user"), str) or not isinstance(obj.get("system", ""), str):
            raise RlhfError(f'{path}: a .json template needs a "user" string (and optionally "system")',
                            'write {"system": "...", "user": "... {instruction} ... {output_a} ... {output_b} ..."}')
        extra = set(obj) - {"system", "user"}
        if extra:
            raise RlhfError(f"{path}: unknown key(s) {', '.join(sorted(extra))}", 'only "system" and "user" are read')
        system, user = obj.get("system") or None, obj["user"]
    seen: set[str] = set()
    for part in (system or "", user):
        seen |= _fields(part, path)
    missing = [f for f in FIELDS if f not in seen]
    if missing:
        raise RlhfError(f"{path}: the template never shows {', '.join('{' + f + '}' for f in missing)}",
                        "a pairwise template must show {instruction}, {output_a} and {output_b}")
    return PairTemplate(system, user, str(path))


def _fields(text: str, path: str) -> set[str]:
    """The field names in `text`; any field other than the three is an error naming the file."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise RlhfError(f"{path}: bad template: {e}", "write literal braces as {{ and }}") from None
    names = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in FIELDS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise RlhfError(f"{path}: unknown template field {shown}",
                            "use only {instruction}, {output_a}, {output_b}; write literal braces as {{ and }}")
        names.add(name)
    return names
