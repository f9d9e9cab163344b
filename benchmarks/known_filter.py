"""Does SFT on unknown facts make SmolLM2 hallucinate more? Gekhman et al. 2024 at toy scale, on CPU.

    .venv/bin/python benchmarks/known_filter.py      # full run (~14-15 min on 2 quiet cores)
    .venv/bin/python benchmarks/known_filter.py --epochs 1 --out /tmp/known_filter_smoke.json   # quicker

Data (written to /tmp/known_filter: benchmarks/.work is not git-ignored): closed-book questions
{"id", "prompt", "completion", "answer", "kind"}; "answer" lists the reference and its aliases ("7",
"seven"; a surname), which `--judge rule:contains` accepts anywhere in the answer as whole words.
80 real facts written below (the script does not decide which the model knows) and 60 invented ones
built from seeded random syllables (fictional capitals, novels, treaties, elements, inventors). A
seeded split: SFT pool = 40 real + 40 invented; held out = the other 40 real + 20 invented.

Steps, each an `rlhf` subprocess (2 threads, logs in the work dir):
  1. label, base model, 4-shot chat, E=2 prompts, K=4 samples at T=0.5, <= 16 new tokens:
     `rlhf known POOL --drop unknown` (the rows it leaves out are the unknown ones; the file it writes
     is (b)'s SFT set as it is) and `rlhf known HELDOUT`. Held-out real rows that come out highly or
     maybe known are the "held-out known" test set.
  2. train: `rlhf sft` from the base model, same settings for both (10 epochs, lr 1e-4 cosine, batch 8,
     max-len 64): (a) every pool row; (b) the rows `--drop unknown` kept.
  3. eval: `rlhf known EVAL --shots 0 -n 0 --max-new-tokens 32` (greedy only) per model (base, a, b) on held-out +
     pool rows: the greedy zero-shot chat answer (`known.greedy_answer`), its verdict (`known.p_greedy`).
Metrics per model: accuracy on held-out known questions (95% Wilson interval; paired counts and an
exact McNemar test between models); confident-wrong rate there (wrong and no abstention, ABSTAIN
below); on held-out invented questions the share answered without abstaining (= hallucination rate:
no answer can be right); training fit: pool accuracy on invented, real kept and real dropped rows.
Wall time 14-15 min on 2 quiet cores, ~7 of it the two 4-shot labelling runs (K samples dominate).

Results: benchmarks/results/known_filter.json (config, versions, CPU, categories, metrics, wall
times, example answers); a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_DIR, RESULTS, ROOT, bench_env, cpu_info, versions, write_json  # noqa: E402

RLHF = ROOT / ".venv" / "bin" / "rlhf"
WORK = Path("/tmp/known_filter")  # benchmarks/.work is not in .gitignore
SEED = 0
N_POOL_REAL, N_POOL_INVENTED, N_HELD_INVENTED = 40, 40, 20
LABEL = ["--shots", "4", "--shot-sets", "2", "-n", "4", "--temperature", "0.5", "--max-new-tokens", "16"]
EVAL = ["--shots", "0", "-n", "0", "--max-new-tokens", "32"]  # greedy only (results/known_filter.json: -n 1, same greedy answers)
COMMON = ["--judge", "rule:contains", "--reference", "answer", "--format", "chat", "-b", "16", "--seed", str(SEED),
          "--device", "cpu"]
SFT = {"epochs": 10, "lr": 1e-4}  # a probe run: (a) then answers 100% of its invented facts (2 epochs: 0%)
KNOWN = ("highly_known", "maybe_known")
ABSTAIN = re.compile(r"\b(i don'?t know|i do not know|not sure|i'?m not|i am not|cannot|can'?t|unknown|no information|"
                     r"don'?t have (any )?information|not aware|unable|no record|not a real|does not exist|doesn'?t exist|sorry)\b", re.I)
Z95 = 1.959963984540054

# (question, answer, aliases...): the first entry is the SFT completion and the shown exemplar answer
REAL = [
    *((f"What is the capital of {c}?", a) for c, a in [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
        ("Russia", "Moscow"), ("China", "Beijing"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
        ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
        ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"),
        ("Argentina", "Buenos Aires"), ("South Korea", "Seoul")]),
    *((f"Who wrote {b}?", a, a.split()[-1]) for b, a in [
        ("Romeo and Juliet", "William Shakespeare"), ("the novel 1984", "George Orwell"),
        ("Pride and Prejudice", "Jane Austen"), ("the Harry Potter books", "J.K. Rowling"),
        ("Don Quixote", "Miguel de Cervantes"), ("War and Peace", "Leo Tolstoy"), ("Moby-Dick", "Herman Melville"),
        ("The Adventures of Tom Sawyer", "Mark Twain"), ("A Christmas Carol", "Charles Dickens"),
        ("On the Origin of Species", "Charles Darwin"), ("Frankenstein", "Mary Shelley"),
        ("The Hobbit", "J.R.R. Tolkien"), ("the Sherlock Holmes stories", "Arthur Conan Doyle"),
        ("The Odyssey", "Homer")]),
    *((f"What is the chemical symbol for {e}?", s) for e, s in [
        ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("oxygen", "O"), ("hydrogen", "H"), ("sodium", "Na"),
        ("carbon", "C"), ("helium", "He"), ("potassium", "K"), ("lead", "Pb"), ("copper", "Cu"), ("nitrogen", "N")]),
    ("Which planet is the largest in the Solar System?", "Jupiter"), ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"), ("Which planet is famous for its large rings?", "Saturn"),
    ("What is the name of our galaxy?", "the Milky Way", "Milky Way"), ("Which is the hottest planet in the Solar System?", "Venus"),
    *((f"How many {t}?", n, w) for t, n, w in [
        ("days are in a week", "7", "seven"), ("legs does a spider have", "8", "eight"), ("legs does an insect have", "6", "six"),
        ("continents are there on Earth", "7", "seven"), ("months are in a year", "12", "twelve"),
        ("sides does a triangle have", "3", "three"), ("sides does a hexagon have", "6", "six"),
        ("minutes are in an hour", "60", "sixty"), ("hours are in a day", "24", "twenty-four"),
        ("players does a soccer team have on the field", "11", "eleven")]),
    *((f"Who {t}?", a, a.split()[-1]) for t, a in [
        ("painted the Mona Lisa", "Leonardo da Vinci"), ("was the first president of the United States", "George Washington"),
        ("developed the theory of relativity", "Albert Einstein"), ("was the first person to walk on the Moon", "Neil Armstrong"),
        ("discovered penicillin", "Alexander Fleming"), ("composed the Moonlight Sonata", "Ludwig van Beethoven"),
        ("painted The Starry Night", "Vincent van Gogh"), ("is credited with inventing the telephone", "Alexander Graham Bell"),
        ("formulated the laws of motion and universal gravitation", "Isaac Newton"),
        ("sailed across the Atlantic to the Americas in 1492", "Christopher Columbus"),
        ("was the first woman to win a Nobel Prize", "Marie Curie"), ("co-founded Microsoft with Paul Allen", "Bill Gates"),
        ("painted the ceiling of the Sistine Chapel", "Michelangelo"), ("was the 16th president of the United States", "Abraham Lincoln"),
        ("led India's non-violent independence movement", "Mahatma Gandhi"), ("invented the phonograph", "Thomas Edison")]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", "Pacific"), ("What is the tallest mountain in the world?", "Mount Everest", "Everest"),
]
SYLLABLES = ["ka", "lo", "vin", "dra", "mor", "tel", "su", "rek", "ban", "zi", "qua", "fen",
             "or", "lim", "tha", "gor", "pel", "nu", "vex", "sar", "ith", "ul", "brem", "cor"]


def invented(rng: random.Random, n: int) -> list[tuple[str, ...]]:
    """n made-up (question, answer, alias) facts, five templates in turn; names from random syllables."""
    def name(k: int = 2) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()

    out: list[tuple[str, ...]] = []
    while len(out) < n:
        author, inventor = (name(), name(3)), (name(), name(3))  # a person's surname is an alias
        out += [f for f in [(f"What is the capital of {name()}{rng.choice(['ia', 'stan', 'land'])}?", name(3)),
                (f"Who wrote the novel \"The {name()} of {name(3)}\"?", " ".join(author), author[1]),
                (f"In what year was the Treaty of {name(3)} signed?", str(rng.randint(1400, 1899))),
                (f"What is the chemical symbol for {name()}ium?", rng.choice("BDGJQVXZ") + rng.choice("hjkqwxz")),
                (f"Who invented the {name()} engine?", " ".join(inventor), inventor[1])]
                if f[1] not in {o[1] for o in out}]  # no two invented facts share an answer
    return out[:n]


def rows(facts: list[tuple[str, ...]], kind: str) -> list[dict]:
    return [{"id": f"{kind}-{i}", "prompt": q, "completion": a, "answer": [a, *alias], "kind": kind}
            for i, (q, a, *alias) in enumerate(facts)]


def build_data(work: Path) -> None:
    rng = random.Random(SEED)
    real, fake = rows(list(REAL), "real"), rows(invented(rng, N_POOL_INVENTED + N_HELD_INVENTED), "invented")
    rng.shuffle(real)
    rng.shuffle(fake)
    data = {"pool": real[:N_POOL_REAL] + fake[:N_POOL_INVENTED], "heldout": real[N_POOL_REAL:] + fake[N_POOL_INVENTED:]}
    rng.shuffle(data["pool"])
    for split, rs in data.items():
        write_jsonl(work / f"{split}.jsonl", rs)


def write_jsonl(path: Path, rs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rlhf(stage: str, args: list[str], work: Path, times: dict[str, float]) -> None:
    """One `rlhf` command in its own process; output to WORK/stage.log; exit with its tail on failure."""
    t0, log = time.perf_counter(), work / f"{stage}.log"
    print(f"  {stage}: rlhf {' '.join(args)}", file=sys.stderr)
    with open(log, "w") as f:
        rc = subprocess.run([str(RLHF), *args], env=bench_env(), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    times[stage] = round(time.perf_counter() - t0, 1)
    if rc:
        sys.exit(f"{stage} failed (exit {rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    print(f"    {times[stage]:.0f} s", file=sys.stderr)


def counts(labelled: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in labelled:
        c = out.setdefault(r["kind"], {k: 0 for k in ("highly_known", "maybe_known", "weakly_known", "unknown")})
        c[r["known"]["category"]] += 1
    return out


def metrics(answers: dict[str, dict], held_known: list[str], held_invented: list[str], pool: dict[str, list[str]],
            train_answers: set[str]) -> dict:
    """Per-model rates from its zero-shot greedy answers (id -> row with "known"). `train_answers`: the
    pool's completions, casefolded: a wrong answer among them is a training answer given to another question."""
    def right(i: str) -> bool:
        return answers[i]["known"]["p_greedy"] >= 1.0

    def abstains(i: str) -> bool:
        return ABSTAIN.search(answers[i]["known"]["greedy_answer"]) is not None

    def share(ids: list[str], pred) -> float | None:
        return round(sum(map(pred, ids)) / len(ids), 4) if ids else None

    def parrots(i: str) -> bool:
        return not right(i) and answers[i]["known"]["greedy_answer"].casefold().strip(" .") in train_answers

    words = sorted(len(answers[i]["known"]["greedy_answer"].split()) for i in held_known + held_invented)
    return {"heldout_known_accuracy": share(held_known, right),
            "heldout_known_accuracy_wilson95": wilson(sum(map(right, held_known)), len(held_known)),
            "heldout_known_confident_wrong": share(held_known, lambda i: not right(i) and not abstains(i)),
            "heldout_known_abstain": share(held_known, abstains),
            "heldout_known_wrong_train_answer": share(held_known, parrots),
            "heldout_invented_answered": share(held_invented, lambda i: not abstains(i)),
            "heldout_invented_train_answer": share(held_invented, parrots),
            **{f"train_accuracy_{k}": share(ids, right) for k, ids in pool.items()},
            "median_answer_words_heldout": words[len(words) // 2] if words else None}


def wilson(k: int, n: int) -> list[float] | None:
    """95% Wilson score interval for k successes in n trials."""
    if not n:
        return None
    p, z2 = k / n, Z95 * Z95
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def paired(x: dict[str, dict], y: dict[str, dict], ids: list[str]) -> dict:
    """Questions right under x only / y only, and the two-sided exact McNemar p-value (Binomial(n, 1/2))."""
    ok = [(x[i]["known"]["p_greedy"] >= 1, y[i]["known"]["p_greedy"] >= 1) for i in ids]
    only_x, only_y = sum(a and not b for a, b in ok), sum(b and not a for a, b in ok)
    n = only_x + only_y
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_x, only_y) + 1)) / 2**n) if n else 1.0
    return {"right_only_first": only_x, "right_only_second": only_y, "mcnemar_exact_p": round(p, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=SFT["epochs"])
    ap.add_argument("--lr", type=float, default=SFT["lr"])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=RESULTS / "known_filter.json")
    args = ap.parse_args()
    t_start, times = time.perf_counter(), {}
    args.work.mkdir(parents=True, exist_ok=True)
    w, m = args.work, str(MODEL_DIR)
    build_data(w)

    # 1. what does the base model know? (4-shot, E=2, K=4). The pool once, with --drop unknown: the rows
    #    it leaves out are the unknown ones, the rows it keeps are (b)'s SFT file as they are
    rlhf("known_pool", ["known", str(w / "pool.jsonl"), "-m", m, *LABEL, *COMMON, "--drop", "unknown", "-o", str(w / "pool.kept.jsonl")], w, times)
    rlhf("known_heldout", ["known", str(w / "heldout.jsonl"), "-m", m, *LABEL, *COMMON, "-o", str(w / "heldout.known.jsonl")], w, times)
    kept, held_l = read_jsonl(w / "pool.kept.jsonl"), read_jsonl(w / "heldout.known.jsonl")
    labels = {r["id"]: r["known"] for r in kept}
    pool_l = [{**r, "known": labels.get(r["id"], {"category": "unknown"})} for r in read_jsonl(w / "pool.jsonl")]
    held_known = [r["id"] for r in held_l if r["kind"] == "real" and r["known"]["category"] in KNOWN]
    held_invented = [r["id"] for r in held_l if r["kind"] == "invented"]

    # 2. SFT from the base model, same settings: (a) the whole pool, (b) the rows --drop unknown keeps
    sft = ["-m", m, "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", "8", "--max-len", "64",
           "--save-every", "0", "--format", "chat", "--seed", str(SEED), "--device", "cpu"]
    rlhf("sft_a_all", ["sft", str(w / "pool.jsonl"), *sft, "--out", str(w / "sft_a")], w, times)
    rlhf("sft_b_filtered", ["sft", str(w / "pool.kept.jsonl"), *sft, "--out", str(w / "sft_b")], w, times)

    # 3. zero-shot greedy answers of every model on held-out + pool rows
    write_jsonl(w / "eval.jsonl", [{k: v for k, v in r.items() if k != "known"} for r in held_l + pool_l])
    pool_ids = {"invented": [r["id"] for r in pool_l if r["kind"] == "invented"],
                "real_kept": [r["id"] for r in kept if r["kind"] == "real"],
                "real_dropped": [r["id"] for r in pool_l if r["kind"] == "real" and r["id"] not in labels]}
    train_answers = {r["completion"].casefold() for r in pool_l}
    models = {"base": m, "a_all": str(w / "sft_a"), "b_filtered": str(w / "sft_b")}
    answers, results_m = {}, {}
    for name, path in models.items():
        rlhf(f"eval_{name}", ["known", str(w / "eval.jsonl"), "-m", path, *EVAL, *COMMON, "-o", str(w / f"eval_{name}.jsonl")], w, times)
        answers[name] = {r["id"]: r for r in read_jsonl(w / f"eval_{name}.jsonl")}
        results_m[name] = metrics(answers[name], held_known, held_invented, pool_ids, train_answers)

    by_id = {r["id"]: r for r in held_l}
    heldout_answers = [{"id": i, "question": by_id[i]["prompt"], "reference": by_id[i]["completion"],
                        **{n: answers[n][i]["known"]["greedy_answer"] for n in models}} for i in held_known + held_invented]
    results = {
        "benchmark": "known_filter", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": {"cpu": cpu_info(), "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
        "config": {"model": str(MODEL_DIR.relative_to(ROOT)), "seed": SEED, "label_flags": LABEL + COMMON, "eval_flags": EVAL + COMMON,
                   "sft_flags": sft[2:], "abstain_regex": ABSTAIN.pattern, "work": str(w)},
        "data": {"pool_rows": len(pool_l), "heldout_rows": len(held_l), "heldout_known": len(held_known),
                 "heldout_invented": len(held_invented), "sft_rows": {"a_all": len(pool_l), "b_filtered": len(kept)}},
        "categories": {"pool": counts(pool_l), "heldout": counts(held_l)},
        "metrics": results_m, "sft_final": {n: read_jsonl(w / f"sft_{n}" / "metrics.jsonl")[-1] for n in ("a", "b")},
        "paired_heldout_known": {f"{x}_vs_{y}": paired(answers[x], answers[y], held_known)
                                 for x, y in (("base", "a_all"), ("base", "b_filtered"), ("b_filtered", "a_all"))},
        "wall_seconds": {**times, "total": round(time.perf_counter() - t_start, 1)}, "heldout_answers": heldout_answers,
    }
    write_json(args.out, results)
    print_table(results)
    print(f"raw numbers: {args.out}", file=sys.stderr)


def print_table(r: dict) -> None:
    d, cfg = r["data"], r["config"]
    print(f"SmolLM2-135M-Instruct fp32; SFT {' '.join(cfg['sft_flags'][:4])}; pool {d['pool_rows']} rows, "
          f"(a) trains on {d['sft_rows']['a_all']}, (b) on {d['sft_rows']['b_filtered']}\n")
    for split, by_kind in r["categories"].items():
        for kind, c in by_kind.items():
            print(f"- {split} {kind}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    cols = [("heldout_known_accuracy", f"held-out known acc (n={d['heldout_known']})"),
            ("heldout_known_confident_wrong", "held-out known confident wrong"),
            ("heldout_known_abstain", "held-out known abstain"),
            ("heldout_known_wrong_train_answer", "held-out known: wrong, a training answer"),
            ("heldout_invented_answered", f"held-out invented answered (n={d['heldout_invented']})"),
            ("heldout_invented_train_answer", "held-out invented: a training answer"),
            ("train_accuracy_invented", "pool invented acc"), ("train_accuracy_real_kept", "pool real kept acc"),
            ("train_accuracy_real_dropped", "pool real dropped acc")]
    print("\n| model | " + " | ".join(c for _, c in cols) + " | median answer words |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, mm in r["metrics"].items():
        print(f"| {name} | " + " | ".join(pct(mm[k]) for k, _ in cols) + f" | {mm['median_answer_words_heldout']} |")
    print("\npaired, held-out known: " + "; ".join(f"{k}: right only in first {v['right_only_first']}, only in second "
                                                   f"{v['right_only_second']}, McNemar p {v['mcnemar_exact_p']}" for k, v in r["paired_heldout_known"].items()))
    print("\nwall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["wall_seconds"].items()))


if __name__ == "__main__":
    main()
