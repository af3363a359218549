"""A small procedural language with learnable structure, and the demo_* task data drawn from it.

Pure Python and deterministic: every line comes from `random.Random(seed)`, so the same seed gives the
same bytes on any machine. Five kinds of line, one per line of a document:

    arith   "12 + 7 = 19", "31 - 8 = 23"                  addition / subtraction facts (0..40)
    count   "count up from 7 : 7 8 9 10 11"                counting up or down, five numbers
    agree   "now the cats near the dog are hungry"         be-verb agreement with the head noun
                                                           (not the attractor) and the tense word
    fact    "the color of bako is red", "bako lives in lima"  a fixed world of 24 people (same in every split)
    copy    "copy k t p z : k t p z"                       in-context copy of 3-6 random letters

The world (who has which color and city) is fixed by WORLD_SEED, not by the split seed: the held-out
split asks about the same world with freshly sampled lines. Training text uses TRAIN_SEED; the task
files use HELDOUT_SEED. The language is finite, so held-out arithmetic or fact questions also occur in
training text (that is what makes them learnable); copy prompts are new letter strings.

    python -m evaluations.demo.corpus            # rewrite evaluations/tasks/demo/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORLD_SEED = 20240501
TRAIN_SEED = 1
HELDOUT_SEED = 2
TASK_DIR = Path(__file__).resolve().parents[1] / "tasks" / "demo"

MAX_NUMBER = 40  # arithmetic operands and results stay within 0..MAX_NUMBER (counting: 0..59)
COUNT_LEN = 5
NAMES = (
    "bako",
    "miru",
    "tesa",
    "loki",
    "zuna",
    "pemo",
    "dira",
    "kofi",
    "nalu",
    "vesi",
    "rubo",
    "safi",
    "gomu",
    "hiko",
    "jana",
    "welo",
    "yuri",
    "foma",
    "cesa",
    "tibo",
    "mako",
    "runa",
    "lesi",
    "doka",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
CITIES = ("oslo", "lima", "rome", "cairo", "delhi", "tokyo", "paris", "quito")
NOUNS = (
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("child", "children"),
    ("mouse", "mice"),
    ("man", "men"),
    ("box", "boxes"),
)
PREPS = ("near", "behind", "with", "under")
ADJS = ("happy", "tired", "small", "quiet", "hungry", "old")
BE = {("now", False): "is", ("now", True): "are", ("yesterday", False): "was", ("yesterday", True): "were"}
BE_FORMS = ("is", "are", "was", "were")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
KINDS = ("arith", "count", "agree", "fact", "copy")
KIND_WEIGHTS = (3, 2, 2, 2, 1)


def world() -> dict[str, dict[str, str]]:
    """name -> {"color", "city"}: the fixed facts every split talks about."""
    rng = random.Random(WORLD_SEED)
    return {name: {"color": rng.choice(COLORS), "city": rng.choice(CITIES)} for name in NAMES}


WORLD = world()


# --- one line of each kind: (prompt, answer) pairs; the line is prompt + " " + answer -------------------


def arith(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a = rng.randint(0, MAX_NUMBER // 2)
        b = rng.randint(0, MAX_NUMBER // 2)
        return f"{a} + {b} =", str(a + b)
    a = rng.randint(0, MAX_NUMBER)
    b = rng.randint(0, a)
    return f"{a} - {b} =", str(a - b)


def count(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        start = rng.randint(0, 59 - COUNT_LEN + 1)
        seq = range(start, start + COUNT_LEN)
        return f"count up from {start} :", " ".join(map(str, seq))
    start = rng.randint(COUNT_LEN - 1, 59)
    seq = range(start, start - COUNT_LEN, -1)
    return f"count down from {start} :", " ".join(map(str, seq))


def agree(rng: random.Random) -> tuple[str, str]:
    """Prompt up to the verb; the answer is the be-form (the adjective follows in running text)."""
    time = rng.choice(("now", "yesterday"))
    plural = rng.random() < 0.5
    head, other = rng.sample(NOUNS, 2)
    attractor_plural = rng.random() < 0.5
    prompt = f"{time} the {head[plural]} {rng.choice(PREPS)} the {other[attractor_plural]}"
    return prompt, BE[(time, plural)]


def fact(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        return f"the color of {name} is", WORLD[name]["color"]
    return f"{name} lives in", WORLD[name]["city"]


def copy(rng: random.Random) -> tuple[str, str]:
    letters = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"copy {letters} :", letters


GENERATORS = {"arith": arith, "count": count, "agree": agree, "fact": fact, "copy": copy}


def line(rng: random.Random, kind: str | None = None) -> str:
    kind = kind or rng.choices(KINDS, KIND_WEIGHTS)[0]
    prompt, answer = GENERATORS[kind](rng)
    text = f"{prompt} {answer}"
    if kind == "agree":
        text += " " + rng.choice(ADJS)
    return text


def document(rng: random.Random, min_lines: int = 4, max_lines: int = 10) -> str:
    """A few lines of mixed kinds joined by newlines, ending with one."""
    return "".join(line(rng) + "\n" for _ in range(rng.randint(min_lines, max_lines)))


def documents(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


# --- held-out task items -----------------------------------------------------------------------------


def _distractors(rng: random.Random, kind: str, answer: str) -> list[str]:
    """Three wrong answers of the same type as `answer` (numbers near it, other colors/cities/forms)."""
    if kind == "agree":
        return [f for f in BE_FORMS if f != answer]
    if kind == "fact":
        pool = COLORS if answer in COLORS else CITIES
        return rng.sample([x for x in pool if x != answer], 3)
    if kind == "arith":
        value = int(answer)
        near = [value + d for d in (-10, -2, -1, 1, 2, 10) if 0 <= value + d <= 2 * MAX_NUMBER]
        return [str(v) for v in rng.sample(near, 3)]
    raise ValueError(f"no distractors for {kind!r} items")


def _generated(rng: random.Random, kinds: tuple[str, ...], n: int):
    """(i, kind, prompt, answer) for n items, the kinds in turn. Lazy, so a caller drawing from the same rng
    between items keeps the draw order (and the committed task data) unchanged."""
    for i in range(n):
        kind = kinds[i % len(kinds)]
        yield (i, kind, *GENERATORS[kind](rng))


def mc_items(seed: int, n: int) -> list[dict]:
    """Multiple choice, 4 choices each: arithmetic result, agreement form, fact, next count."""
    rng = random.Random(seed)
    items = []
    for i, kind, prompt, answer in _generated(rng, ("arith", "agree", "fact", "count"), n):
        if kind == "count":
            numbers = answer.split()
            prompt = f"{prompt} {' '.join(numbers[:-1])}"
            last, step = int(numbers[-1]), int(numbers[-1]) - int(numbers[-2])
            answer = str(last)  # the fifth number; wrong: the fourth again, one too far, off by ten...
            near = (last - step, last + step, last + 10 * step, last - 10 * step, last + 2 * step, last - 2 * step)
            wrong = [str(v) for v in near if v >= 0][:3]
        else:
            wrong = _distractors(rng, kind, answer)
        choices = [answer, *wrong]
        assert len(set(choices)) == 4, (prompt, choices)
        rng.shuffle(choices)
        items.append({"id": i, "kind": kind, "query": prompt, "choices": choices, "gold": choices.index(answer)})
    return items


def gen_items(seed: int, n: int) -> list[dict]:
    """Short-answer generation: the answer is the rest of the line (until the newline)."""
    return [
        {"id": i, "kind": kind, "prompt": prompt, "answer": answer}
        for i, kind, prompt, answer in _generated(random.Random(seed), ("arith", "fact", "count", "copy"), n)
    ]


def ppl_items(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": i, "text": document(rng)} for i in range(n)]


N_MC, N_GEN, N_PPL = 400, 200, 100


def task_data(seed: int = HELDOUT_SEED) -> dict[str, list[dict]]:
    """file name -> records of the three demo suites (one seed stream per suite)."""
    return {
        "demo_mc.jsonl": mc_items(seed * 1000 + 1, N_MC),
        "demo_gen.jsonl": gen_items(seed * 1000 + 2, N_GEN),
        "demo_ppl.jsonl": ppl_items(seed * 1000 + 3, N_PPL),
    }


def write_task_data(directory: str | Path = TASK_DIR, seed: int = HELDOUT_SEED) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in task_data(seed).items():
        path = directory / name
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(row) for row in Path(path).read_text(encoding="utf-8").splitlines() if row.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TASK_DIR), help="directory for demo_*.jsonl")
    parser.add_argument("--sample", type=int, default=0, help="print N training documents instead")
    args = parser.parse_args(argv)
    if args.sample:
        print("".join(d + "\n" for d in documents(TRAIN_SEED, args.sample)), end="")
        return
    for path in write_task_data(args.out):
        print(path)


if __name__ == "__main__":
    main()
