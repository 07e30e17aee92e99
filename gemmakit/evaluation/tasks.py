"""Multiple-choice task files: their four layouts, parsing with located errors, and prompts.

Task files are JSONL in one of four common layouts (HellaSwag, ARC, MMLU, PIQA), detected per
file; every record becomes a `Question` (prompt text, choices, gold index). Prompts follow
lm-evaluation-harness's templates for those tasks so that the numbers are comparable, and
`build_context` puts few-shot examples before a question as lm-eval does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemmakit.errors import GemmakitError
from gemmakit.paths import DATA

TASKS_DIR = DATA / "tasks"

LAYOUTS = {
    "hellaswag": "HellaSwag-style {ctx|context, endings, label}",
    "arc": "ARC-style {question, choices: {text, label}, answerKey}",
    "mmlu": "MMLU-style {question, choices | A..D, answer (index or letter)}",
    "piqa": "PIQA-style {goal, sol1, sol2, label}",
}

# Prompt templates, as lm-eval's task configs write them (arc_easy.yaml, piqa.yaml,
# hellaswag/utils.py, mmlu/default/_default_template_yaml); target delimiter " ", few-shot
# delimiter "\n\n".
TEMPLATES = {
    "hellaswag": '"{activity_label}: {ctx}" + " " + ending   (no activity_label: "{ctx}")',
    "arc": '"Question: {question}\\nAnswer:" + " " + choice text',
    "mmlu": '"{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" + " " + letter; a '
    '"subject" field adds lm-eval\'s "The following are multiple choice questions (with '
    'answers) about {subject}.\\n\\n" before the prompt',
    "piqa": '"Question: {goal}\\nAnswer:" + " " + solution',
}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = "ABCDEFGHIJ"


@dataclass
class Question:
    """One multiple-choice item: the prompt text, the strings scored, the gold index."""

    line: int
    text: str
    choices: list[str]
    label: int
    subject: str | None = None


@dataclass
class Task:
    """A parsed task file: its name (the file's stem), path, detected layout and questions."""

    name: str
    path: Path
    layout: str
    questions: list[Question]


def task_path(name: str) -> Path:
    """The shipped task file called `name` (see `list_tasks`)."""
    path = TASKS_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(t["name"] for t in list_tasks()) or "none"
        raise GemmakitError(f"no shipped task {name!r}; shipped tasks: {known}")
    return path


def list_tasks() -> list[dict]:
    """Name, layout, question count and path of each shipped task file."""
    out = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")):
        task = load_task(path, where=path.name)
        out.append({"name": path.stem, "layout": task.layout, "questions": len(task.questions),
                    "path": str(path)})  # fmt: skip
    return out


def detect_layout(record: dict) -> str | None:
    """The layout whose keys `record` has, or None."""
    keys = set(record)
    if "endings" in keys and ({"ctx", "context"} & keys):
        return "hellaswag"
    if {"question", "choices", "answerKey"} <= keys and isinstance(record["choices"], dict):
        return "arc"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if {"question", "answer"} <= keys and ("choices" in keys or {"A", "B"} <= keys):
        return "mmlu"
    return None


def load_task(path: str | Path, where: str | None = None) -> Task:
    """Reads a JSONL task file; errors name the file and line (`where` replaces the path).

    Blank lines are skipped. Every record must have the layout detected on the first one.
    """
    path = Path(path)
    where = where or str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GemmakitError(f"{where}: no such file") from None
    except UnicodeDecodeError as e:
        raise GemmakitError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    layout, first_line, questions = None, 0, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GemmakitError(f"{at}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise GemmakitError(f"{at}: expected a JSON object, got {type(record).__name__}")
        kind = detect_layout(record)
        if kind is None:
            raise GemmakitError(
                f"{at}: unknown layout (keys: {', '.join(sorted(record)) or 'none'}); expected one of: "
                + "; ".join(LAYOUTS.values())
            )
        if layout is None:
            layout, first_line = kind, number
        elif kind != layout:
            raise GemmakitError(f"{at}: {kind} layout, but line {first_line} is {layout}; use one per file")
        questions.append(_PARSERS[kind](record, at, number))
    if not questions:
        raise GemmakitError(f"{where}: no questions (the file is empty)")
    return Task(path.stem, path, layout, questions)


def _text(record: dict, key: str, at: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise GemmakitError(f"{at}: {key!r} must be a non-empty string")
    return value.strip()


def _choices(values, at: str, key: str) -> list[str]:
    if not isinstance(values, list) or len(values) < 2:
        raise GemmakitError(f"{at}: {key!r} must be a list of at least 2 choices")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise GemmakitError(f"{at}: every entry of {key!r} must be a non-empty string")
    return [v.strip() for v in values]


def _index(value, n: int, at: str, key: str = "label", letters: bool = False) -> int:
    """A gold index from an int, a digit string or (with `letters`) a letter."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    elif letters and isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        letter = value.strip().upper()
        index = LETTERS.find(letter)
        if not 0 <= index < n:
            raise GemmakitError(f"{at}: {key} {letter!r} out of range for {n} choices")
        return index
    if not isinstance(value, int):
        raise GemmakitError(f"{at}: {key} must be an index{' or a letter' if letters else ''}, got {value!r}")
    if not 0 <= value < n:
        raise GemmakitError(f"{at}: {key} {value} out of range for {n} choices")
    return value


def _parse_hellaswag(r: dict, at: str, line: int) -> Question:
    ctx = _text(r, "ctx" if "ctx" in r else "context", at)
    label = r.get("activity_label")
    text = f"{label.strip()}: {ctx}" if isinstance(label, str) and label.strip() else ctx
    endings = _choices(r["endings"], at, "endings")
    return Question(line, text, endings, _index(r.get("label"), len(endings), at))


def _parse_arc(r: dict, at: str, line: int) -> Question:
    question, c = _text(r, "question", at), r["choices"]
    texts = _choices(c.get("text"), at, "choices.text")
    labels = c.get("label")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise GemmakitError(f"{at}: 'choices.label' must list one label per choice text")
    labels = [str(x).strip() for x in labels]
    key = str(r["answerKey"]).strip()
    if key not in labels:
        raise GemmakitError(f"{at}: answerKey {key!r} is not one of the choice labels {', '.join(labels)}")
    return Question(line, f"Question: {question}\nAnswer:", texts, labels.index(key))


def _parse_mmlu(r: dict, at: str, line: int) -> Question:
    question = _text(r, "question", at)
    if "choices" in r:
        options = _choices(r["choices"], at, "choices")
    else:
        keys = [k for k in LETTERS if k in r]
        if keys != list(LETTERS[: len(keys)]):
            raise GemmakitError(
                f"{at}: option keys must run A, B, C, ... without gaps, got {', '.join(keys)}"
            )
        options = _choices([r[k] for k in keys], at, "A..D")
    if len(options) > len(LETTERS):
        raise GemmakitError(f"{at}: at most {len(LETTERS)} choices, got {len(options)}")
    letters = list(LETTERS[: len(options)])
    text = question + "".join(f"\n{x}. {o}" for x, o in zip(letters, options)) + "\nAnswer:"
    subject = r.get("subject") if isinstance(r.get("subject"), str) else None
    return Question(line, text, letters, _index(r["answer"], len(options), at, "answer", True), subject)


def _parse_piqa(r: dict, at: str, line: int) -> Question:
    goal = _text(r, "goal", at)
    sols = [_text(r, "sol1", at), _text(r, "sol2", at)]
    return Question(line, f"Question: {goal}\nAnswer:", sols, _index(r.get("label"), 2, at))


_PARSERS: dict[str, Callable[[dict, str, int], Question]] = {
    "hellaswag": _parse_hellaswag,
    "arc": _parse_arc,
    "mmlu": _parse_mmlu,
    "piqa": _parse_piqa,
}


def build_context(task: Task, index: int, fewshot: int = 0, seed: int = 1234) -> str:
    """The context of question `index`: description, `fewshot` solved examples, the prompt.

    Examples are drawn from the whole file except the question itself, with a generator
    seeded by (seed, index): a question's prompt is the same whatever `--limit` is.
    """
    q = task.questions[index]
    parts = []
    if fewshot:
        others = [i for i in range(len(task.questions)) if i != index]
        if fewshot > len(others):
            raise GemmakitError(f"--fewshot {fewshot}: the file has only {len(others)} other questions")
        rng = random.Random(seed * 1_000_003 + index)
        for i in rng.sample(others, fewshot):
            shot = task.questions[i]
            parts.append(shot.text + TARGET_DELIMITER + shot.choices[shot.label])
    parts.append(q.text)
    description = ""
    if task.layout == "mmlu" and q.subject:
        description = (
            "The following are multiple choice questions (with answers) about "
            f"{q.subject.replace('_', ' ')}.\n\n"
        )
    return description + FEWSHOT_DELIMITER.join(parts)
