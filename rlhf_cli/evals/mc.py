"""`rlhf eval mc`: multiple choice by log-likelihood (MMLU style), scored as lm-evaluation-harness does.

Each question becomes one context and one continuation per choice; the choice whose continuation
has the highest summed log-prob is the model's answer. The prompts are lm-evaluation-harness's
(lm_eval/tasks/mmlu/default/_default_template_yaml and continuation/_continuation_template_yaml):

  letter (lm-eval `mmlu`, default):  "{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:" + " A" | " B" ...
  cloze (`mmlu_continuation`):       "Question: {question}\\nAnswer:" + " {choice text}"

after the description "The following are [multiple choice] questions (with answers) about {subject}.\\n\\n"
and k solved examples (the first k rows of the subject's dev split, lm-eval's `first_n` sampler),
each followed by "\\n\\n". acc = argmax of the log-likelihoods; acc_norm = argmax of log-likelihood /
the choice's length in characters (lm-eval's definition). Per-subject accuracy and the macro
average go in the summary; `acc` itself is over all questions (lm-eval's size-weighted group score).
`--format chat` renders the same turns as lm-eval's --apply_chat_template: the description as the
system turn, each example a user turn plus an assistant turn with its answer, and bare "A".."D"
(or choice texts) as continuations.

Inputs: an MMLU CSV directory or file (`<subject>_test.csv`; header question,choice0,...,answer
with an index or letter answer, or the original headerless layout), or JSONL rows
{"question", "choices": [...], "answer": index | letter, "subject"?} (rename with --field).

    rlhf eval mc mmlu/test/ --dev mmlu/dev/ -m sft/                       # 5-shot MMLU, letter scoring
    rlhf eval mc mmlu/test/ --dev mmlu/dev/ --subjects anatomy,virology -m base/ -m sft/ --plot mmlu.png
    rlhf eval mc quiz.jsonl --scoring cloze --field question=prompt -m sft/ --log-samples mc.jsonl

Speed: each context runs once, not once per choice, and a subject's shared few-shot prefix once per
subject (rlhf_cli/evals/loglik.py); `--no-shared-context` scores every (context, choice) as one full
sequence, as lm-evaluation-harness's HFLM does: the reference path.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import check, from_cli
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LogSamplesOpt, ModelsOpt, PlotOpt, mean_stderr, parse_fields, report
from rlhf_cli.evals.loglik import Request, loglik_naive, loglik_shared, max_length
from rlhf_cli.options import ConfigOpt, DeviceOpt, DtypeOpt, TrustOpt

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FIELDS = ("question", "choices", "answer", "subject")
SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation", "_train")


@dataclass(frozen=True)
class Question:
    id: Any
    subject: str  # "" when the data names none
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    where: str  # file:line, for error messages


@dataclass(frozen=True)
class McConfig:
    data: str
    models: tuple[str, ...] = ()
    dev: str | None = None
    shots: int | None = None  # None: 5 with --dev, else 0
    subjects: tuple[str, ...] = ()  # empty: all; "a,b" entries are split
    limit: int | None = None  # per subject, as lm-eval's --limit
    scoring: str = "letter"  # letter | cloze
    format: str = "raw"  # raw | chat
    fields: tuple[str, ...] = ()  # NAME=COLUMN, as --field
    batch_size: int = 8
    shared_context: bool = True
    log_samples: str | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False

    COMMAND: ClassVar[str] = "eval mc"
    FLAGS: ClassVar[dict[str, str]] = {"models": "--model", "fields": "--field"}
    LIMITS: ClassVar[dict[str, Any]] = {
        "shots": ">= 0", "limit": ">= 1", "scoring": ("letter", "cloze"), "format": ("raw", "chat"), "batch_size": ">= 1",
        "dtype": ("fp32", "bf16", "fp16"),
    }

    @property
    def n_shots(self) -> int:
        return self.shots if self.shots is not None else 5 if self.dev else 0

    @property
    def subject_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for item in self.subjects for s in item.split(",") if s.strip())


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="MMLU CSV directory or file (SUBJECT_test.csv files), or JSONL ('-' = stdin).", show_default=False)],
    models: ModelsOpt = None,  # type: ignore[assignment]
    dev: Annotated[str | None, typer.Option("--dev", help="Few-shot examples: MMLU dev folder or file (SUBJECT_dev.csv), or JSONL.")] = McConfig.dev,
    shots: Annotated[int | None, typer.Option("--shots", "-k", help="Examples per question, the first k dev rows of its subject [default: 5 with --dev, else 0].")] = McConfig.shots,
    subjects: Annotated[list[str] | None, typer.Option("--subjects", help="Only these subjects (repeatable, or comma-separated: anatomy,virology).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N questions of each subject (lm-eval's --limit).")] = McConfig.limit,
    scoring: Annotated[str, typer.Option("--scoring", help="letter: continuations ' A'..' D' (lm-eval mmlu). cloze: ' ' + choice text (mmlu_continuation).")] = McConfig.scoring,
    format: Annotated[str, typer.Option("--format", help="raw: plain text, as lm-eval scores log-likelihood tasks. chat: the chat template, shots as turns (lm-eval --apply_chat_template).")] = McConfig.format,
    fields: FieldOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per forward pass.")] = McConfig.batch_size,
    shared_context: Annotated[bool, typer.Option("--shared-context/--no-shared-context", help="Run each context once and reuse its KV cache (off: one full sequence per choice, the reference).")] = McConfig.shared_context,
    log_samples: LogSamplesOpt = McConfig.log_samples,
    plot: PlotOpt = McConfig.plot,
    device: DeviceOpt = McConfig.device,
    dtype: DtypeOpt = McConfig.dtype,
    trust_remote_code: TrustOpt = McConfig.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Multiple choice by log-likelihood (MMLU): acc and acc_norm per model, lm-evaluation-harness prompts.

    Prints one JSON summary line ({"kind": "mc", "results": [{"model", "n", "acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "acc_macro", "subjects": {...}}]}) and a table on stderr.

    Examples:

      rlhf eval mc mmlu/test/ --dev mmlu/dev/ -m sft/

      rlhf eval mc mmlu/test/ --dev mmlu/dev/ --subjects anatomy,virology -m base/ -m sft/ --plot mmlu.png

      rlhf eval mc quiz.jsonl --scoring cloze --field question=prompt -m sft/ --log-samples mc.jsonl
    """
    params = {**locals(), "models": tuple(models or ()), "subjects": tuple(subjects or ()), "fields": tuple(fields or ())}
    run(from_cli(McConfig, ctx, params, config))


# --- data ---------------------------------------------------------------------------------------------


def subject_of(path: Path) -> str:
    """`high_school_physics_test.csv` -> `high_school_physics` (the split suffix is dropped)."""
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def parse_answer(value: Any, n_choices: int, where: str) -> int:
    """An index (int or digits) or a letter A.. -> index; anything else or out of range is an error."""
    index = value
    if isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip() in LETTERS:
        index = LETTERS.index(value.strip())
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_choices:
        raise RlhfError(f"{where}: answer {value!r} is not a choice index 0..{n_choices - 1} or a letter A..{LETTERS[n_choices - 1]}",
                        "the answer is the index of the correct choice (0-based) or its letter")
    return index


def read_mmlu_csv(path: Path) -> list[Question]:
    """One MMLU CSV file: header question,choice0..N,answer (HF cais/mmlu export) or the headerless original."""
    subject, header = subject_of(path), None
    out: list[Question] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader, start = csv.reader(f), 1
        for rec in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted field may span lines
            if not any(c.strip() for c in rec):
                continue
            if header is None:
                names = [c.strip().lower() for c in rec]
                header = names if "question" in names and "answer" in names else []
                if header:
                    q_col, a_col = names.index("question"), names.index("answer")
                    c_cols = [i for i, n in enumerate(names) if n.startswith("choice") or n in ("a", "b", "c", "d")]
                    s_col = names.index("subject") if "subject" in names else None
                    continue
            if header:
                if len(rec) != len(header):
                    raise RlhfError(f"{where}: {len(rec)} columns, the header has {len(header)}", "quote fields that contain commas")
                q, choices, ans = rec[q_col], [rec[i] for i in c_cols], rec[a_col]
                subj = rec[s_col] if s_col is not None and rec[s_col] else subject
            else:  # hendrycks/test original: question, choices..., answer letter
                if len(rec) < 4:
                    raise RlhfError(f"{where}: {len(rec)} columns, expected question, at least two choices, answer",
                                    "MMLU CSV: question,choice0,choice1,choice2,choice3,answer")
                q, choices, ans, subj = rec[0], rec[1:-1], rec[-1], subject
            out.append(make_question(f"{subj}/{len(out)}", subj, q, choices, ans, where))
    if not out:
        raise RlhfError(f"{path}:1: no questions in the file", "MMLU CSV: question,choice0,choice1,choice2,choice3,answer")
    return out


def make_question(qid: Any, subject: Any, question: Any, choices: Any, answer: Any, where: str) -> Question:
    if not isinstance(question, str) or not question.strip():
        raise RlhfError(f"{where}: the question is missing or empty", "give the question text")
    if not isinstance(choices, list | tuple) or len(choices) < 2 or len(choices) > len(LETTERS):
        raise RlhfError(f"{where}: choices must be a list of 2 to 26 strings", 'e.g. "choices": ["4", "5", "6", "7"]')
    if not all(isinstance(c, str) and c for c in choices):
        raise RlhfError(f"{where}: every choice must be a non-empty string", 'e.g. "choices": ["4", "5", "6", "7"]')
    subject = subject if isinstance(subject, str) else ""
    return Question(qid, subject, question, tuple(choices), parse_answer(answer, len(choices), where), where)


def read_mc_jsonl(path: str, fields: dict[str, str]) -> list[Question]:
    from rlhf_cli.data.jsonl import read_jsonl

    col = {name: fields.get(name, name) for name in FIELDS}
    out = []
    for n, line in enumerate(read_jsonl(path)):
        d = line.data
        for name in ("question", "choices", "answer"):
            if col[name] not in d:
                raise RlhfError(f"{line.where}: no {col[name]!r} field", f"map your column with --field {name}=COLUMN")
        out.append(make_question(d.get("id", n), d.get(col["subject"], ""), d[col["question"]], d[col["choices"]],
                                 d[col["answer"]], line.where))
    return out


def load_questions(path: str, fields: dict[str, str], split: str = "test") -> list[Question]:
    """A directory of CSVs (`*_{split}.csv` if any, else `*.csv`), one CSV, or JSONL."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob(f"*_{split}.csv")) or sorted(p.glob("*.csv"))
        if not files:
            raise RlhfError(f"{path}: no .csv files in the directory", f"point at MMLU's {split}/ folder of <subject>_{split}.csv files")
        return [q for f in files for q in read_mmlu_csv(f)]
    if path.endswith(".csv"):
        if not p.is_file():
            raise RlhfError(f"{path}: no such file", "check the path")
        return read_mmlu_csv(p)
    return read_mc_jsonl(path, fields)


def select(questions: list[Question], subjects: tuple[str, ...], limit: int | None, data: str) -> list[Question]:
    """Keep the named subjects (all when none) and the first `limit` questions of each."""
    known = dict.fromkeys(q.subject for q in questions)
    missing = [s for s in subjects if s not in known]
    if missing:
        more = ", ..." if len(known) > 12 else ""
        raise RlhfError(f"{data}: no questions for subject(s) {', '.join(missing)}", f"subjects here: {', '.join(list(known)[:12])}{more}")
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        if (not subjects or q.subject in subjects) and seen.get(q.subject, 0) < (limit or len(questions)):
            seen[q.subject] = seen.get(q.subject, 0) + 1
            out.append(q)
    return out


# --- prompts (lm-eval's templates; see the module docstring) --------------------------------------------


def description(subject: str, scoring: str) -> str:
    if not subject:
        return ""
    what = "multiple choice questions" if scoring == "letter" else "questions"
    return f"The following are {what} (with answers) about {subject.replace('_', ' ')}.\n\n"


def doc_text(q: Question, scoring: str) -> str:
    if scoring == "letter":
        return "\n".join([q.question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)), "Answer:"])
    return f"Question: {q.question.strip()}\nAnswer:"


def choice_texts(q: Question, scoring: str) -> list[str]:
    return list(LETTERS[: len(q.choices)]) if scoring == "letter" else list(q.choices)


def build_prompt(q: Question, shots: list[Question], scoring: str) -> str:
    """description + ("{example} {answer}\\n\\n" per shot) + the question, as lm-eval's fewshot_context."""
    examples = "".join(f"{doc_text(s, scoring)} {choice_texts(s, scoring)[s.answer]}\n\n" for s in shots)
    return description(q.subject, scoring) + examples + doc_text(q, scoring)


def chat_context(tok: Any, q: Question, shots: list[Question], scoring: str) -> str:
    """lm-eval's --apply_chat_template (few-shot as multi-turn, its default): the description as the
    system turn, each example a user turn + an assistant turn holding its answer, then the question."""
    import jinja2

    desc = description(q.subject, scoring)
    msgs = [{"role": "system", "content": desc}] if desc else []
    for s in shots:
        msgs += [{"role": "user", "content": doc_text(s, scoring)}, {"role": "assistant", "content": choice_texts(s, scoring)[s.answer]}]
    msgs.append({"role": "user", "content": doc_text(q, scoring)})
    try:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:  # a template without a system role: lm-eval drops it and retries
        return tok.apply_chat_template(msgs[bool(desc):], tokenize=False, add_generation_prompt=True)


def encode_pair(tok: Any, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """lm-eval's HFLM._encode_pair: trailing context whitespace moves into the continuation; the
    continuation is tokens(context + continuation) after len(tokens(context)). Special tokens as the
    tokenizer adds them, unless the text already starts with BOS (lm-eval's tok_encode)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuations = context[:-n], [context[-n:] + c for c in continuations]
    bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    special = bos_id is None or not context.startswith(tok.decode([bos_id]))
    ids = tok([context, *(context + c for c in continuations)], add_special_tokens=special)["input_ids"]
    return ids[0], [whole[len(ids[0]):] for whole in ids[1:]]


def choose(lls: list[float], lengths: list[int]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of the log-likelihoods and of log-likelihood / length in characters
    (lm-eval's acc / acc_norm; the first index wins a tie, as np.argmax)."""
    norm = [ll / n for ll, n in zip(lls, lengths, strict=True)]
    return lls.index(max(lls)), norm.index(max(norm))


# --- the run -------------------------------------------------------------------------------------------


def load_data(cfg: McConfig) -> tuple[list[Question], dict[str, list[Question]]]:
    """All questions to score and the shots for each subject; every input error surfaces here."""
    check(cfg)
    k = cfg.n_shots
    if k and not cfg.dev:
        raise RlhfError(f"--shots {k} needs --dev, the file or folder the examples come from", "e.g. --dev mmlu/dev/")
    fields = parse_fields(list(cfg.fields), FIELDS)
    questions = select(load_questions(cfg.data, fields), cfg.subject_names, cfg.limit, cfg.data)
    shots: dict[str, list[Question]] = {}
    if k and cfg.dev:  # validated above: shots need dev
        pool: dict[str, list[Question]] = {}
        for q in load_questions(cfg.dev, fields, split="dev"):
            pool.setdefault(q.subject, []).append(q)
        for s in dict.fromkeys(q.subject for q in questions):
            have = pool.get(s, pool.get("", []))
            if len(have) < k:
                raise RlhfError(f"{cfg.dev}: {len(have)} dev examples for subject {s!r}, --shots wants {k}",
                                f"give a {s}_dev.csv with at least {k} rows, or lower --shots")
            shots[s] = have[:k]
    return questions, shots


def evaluate(cfg: McConfig, spec: Any, questions: list[Question], shots: dict[str, list[Question]]) -> EvalResult:
    """Score every question with one model; -> its EvalResult (metrics, per-subject extra, samples)."""
    from rlhf_cli import runtime
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(spec, cfg.trust_remote_code)
    delim = " " if cfg.format == "raw" else ""  # lm-eval drops the target delimiter under a chat template
    texts, requests = [], []
    for q in questions:
        ex = shots.get(q.subject, [])
        text = build_prompt(q, ex, cfg.scoring) if cfg.format == "raw" else chat_context(tok, q, ex, cfg.scoring)
        ctx, conts = encode_pair(tok, text, [delim + c for c in choice_texts(q, cfg.scoring)])
        texts.append(text)
        requests.append(Request(ctx, conts, q.subject))
    device = runtime.pick_device(cfg.device)
    model = load_model(spec, tok, cfg.dtype, cfg.trust_remote_code).to(device).eval()
    score = loglik_shared if cfg.shared_context else loglik_naive
    with progress_bar(True) as bar:
        task = bar.add_task(f"mc {spec.raw}", total=len(requests), stats="")
        lls = score(model, requests, cfg.batch_size, device, max_length(model, tok), lambda n: bar.update(task, advance=n))

    correct, correct_norm, samples = [], [], []
    for q, text, ll in zip(questions, texts, lls, strict=True):
        labels = choice_texts(q, cfg.scoring)
        pred, pred_norm = choose(ll, [len(c) for c in labels])
        correct.append(float(pred == q.answer))
        correct_norm.append(float(pred_norm == q.answer))
        samples.append({"id": q.id, "subject": q.subject, "input": text, "output": labels[pred], "extracted": pred,
                        "target": q.answer, "score": correct[-1], "acc_norm": correct_norm[-1], "pred_norm": pred_norm,
                        "choices": labels, "loglikelihoods": ll})
    acc, acc_se = mean_stderr(correct)
    acc_norm, acc_norm_se = mean_stderr(correct_norm)
    metrics = {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se}
    extra: dict[str, Any] = {"scoring": cfg.scoring, "shots": cfg.n_shots, "format": cfg.format}
    by_subject: dict[str, list[int]] = {}
    for k, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(k)
    if len(by_subject) > 1 or "" not in by_subject:
        extra["subjects"] = {s: {"n": len(ks), "acc": sum(correct[k] for k in ks) / len(ks),
                                 "acc_norm": sum(correct_norm[k] for k in ks) / len(ks)} for s, ks in by_subject.items()}
        extra["acc_macro"] = sum(v["acc"] for v in extra["subjects"].values()) / len(by_subject)
        extra["acc_norm_macro"] = sum(v["acc_norm"] for v in extra["subjects"].values()) / len(by_subject)
    return EvalResult("mc", spec.raw, metrics, len(questions), "acc" if cfg.scoring == "letter" else "acc_norm", samples, extra)


def run(cfg: McConfig) -> list[EvalResult]:
    from rlhf_cli.models.loading import parse_model_spec

    # 1. all input (data, shots, model specs) checked before any model loads
    questions, shots = load_data(cfg)
    specs = [parse_model_spec(m) for m in cfg.models]
    if not specs:
        raise RlhfError("no --model given", "e.g. -m sft/ (repeat for a comparison table)")
    # 2. each model in turn; 3. one summary line, table, sample log, plot
    results = [evaluate(cfg, spec, questions, shots) for spec in specs]
    report(results, cfg.data, cfg.log_samples, cfg.plot)
    return results
