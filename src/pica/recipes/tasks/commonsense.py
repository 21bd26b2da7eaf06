"""Commonsense reasoning in the LLM-Adapters format: 8 multiple-choice tasks answered with a label word.

Rows (``.json`` list or ``.jsonl``) as in the LLM-Adapters ``commonsense_170k.json`` / ``<task>/test.json``
files: ``instruction`` (the question with its options, required), ``input`` (usually empty, optional),
``answer`` (the label word, required), ``output`` (the training target, e.g. ``"the correct answer is
true"``; optional, defaults to that sentence) and an optional ``task``.

Tasks and label words (``answer``), as scored by the LLM-Adapters / PiCa evaluation script
(github hjunseoh/PiCa, ``LLM-Adapters/commonsense_evaluate.py``):

=================  =============================  ==================
task               label words                    also accepted as
=================  =============================  ==================
``boolq``          ``true``, ``false``
``piqa``           ``solution1``, ``solution2``
``social_i_qa``    ``answer1`` … ``answer5`` [*]  ``siqa``
``hellaswag``      ``ending1`` … ``ending4``
``winogrande``     ``option1``, ``option2``
``ARC-Easy``       ``answer1`` … ``answer5``      ``arc_e``, ``arc-e``
``ARC-Challenge``  ``answer1`` … ``answer5``      ``arc_c``, ``arc-c``
``openbookqa``     ``answer1`` … ``answer5``      ``obqa``
=================  =============================  ==================

[*] SIQA questions have three options; the official script matches ``answer1``–``answer5`` for it, so we do.

The prediction is the **first** label word of the task found in the generated text (case-sensitive, as in
the official script), or ``""`` if none. Differences from the official script: greedy decoding (it uses
4-beam search), and one clean Alpaca template for training and evaluation (its templates carry source
indentation). Its training script puts the loss on the prompt too (``train_on_inputs=True``); here the
loss is on the response unless ``train_on_prompt=True``.

Which task a row belongs to (needed to score it, not to train on it), first match wins: the ``task``
argument of :func:`load_examples`; the row's ``task`` field; the file name (``boolq.jsonl``); the name of
the file's folder (the LLM-Adapters layout ``dataset/boolq/test.json``). A folder given as ``source``
loads every task present as ``<folder>/<task>/test.json``, ``<folder>/<task>.json`` or
``<folder>/<task>.jsonl``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from pica.recipes.tasks import generative

logger = logging.getLogger(__name__)

TASK_KIND = "generative"

_CHOICES_5 = tuple(f"answer{i}" for i in range(1, 6))
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _CHOICES_5,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": _CHOICES_5,
    "ARC-Challenge": _CHOICES_5,
    "openbookqa": _CHOICES_5,
}
"""Canonical task name → the label words its answers use (in the official order of the 8 tasks)."""

OPTIONS = {"task": None, "train_on_prompt": False, "on_overlong": "drop"}
"""Task options and defaults. Every verb accepts all of them (the harness passes one dict to each):
``task`` (load_examples), ``train_on_prompt`` and ``on_overlong`` (build_train_dataset)."""

_ALIASES = {"siqa": "social_i_qa", "socialiqa": "social_i_qa", "arce": "ARC-Easy", "arceasy": "ARC-Easy",
            "arcc": "ARC-Challenge", "arcchallenge": "ARC-Challenge", "obqa": "openbookqa"}
_LABEL_PATTERNS = {task: re.compile("|".join(map(re.escape, words))) for task, words in LABEL_WORDS.items()}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_BY_KEY = {_key(task): task for task in LABEL_WORDS} | _ALIASES


def canonical_task(name: str) -> str | None:
    """Canonical task name for ``name`` (case, ``-``/``_`` and the aliases above ignored), else ``None``."""
    return _BY_KEY.get(_key(name))


def extract_answer(task: str, text: str) -> str:
    """The first label word of ``task`` in ``text`` (case-sensitive), or ``""`` if there is none."""
    canonical = canonical_task(task)
    if canonical is None:
        raise ValueError(f"unknown commonsense task {task!r}; known: {list(LABEL_WORDS)}")
    match = _LABEL_PATTERNS[canonical].search(text)
    return match.group() if match else ""


def _task_from_path(path: Path) -> str | None:
    return canonical_task(path.stem) or canonical_task(path.parent.name)


def _task_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for task in LABEL_WORDS:
        candidates = [folder / task / "test.json", folder / f"{task}.json", folder / f"{task}.jsonl"]
        existing = [path for path in candidates if path.is_file()]
        if len(existing) > 1:
            raise ValueError(f"{folder}: several files for task {task}: {[str(p) for p in existing]}")
        if existing:
            found.append((task, existing[0]))
    if not found:
        raise FileNotFoundError(f"no commonsense task file in {folder} (looked for <task>/test.json, <task>.json, "
                                f"<task>.jsonl with task in {list(LABEL_WORDS)})")
    return found


def load_examples(source: str | os.PathLike, *, limit: int | None = None, **options: Any) -> list[dict]:
    """Read commonsense rows from a file, or every task file in a folder.

    Args:
        source: a ``.json``/``.jsonl`` file, or a folder (module docstring).
        limit: keep the first ``limit`` rows of each file (of each task, for a folder).
        **options: task options (:data:`OPTIONS`); ``task`` is the task of every row of a file (overrides
            row fields and the file name).

    Returns:
        Canonical rows ``{"task": str | None, "instruction", "input", "output", "answer"}``.

    Raises:
        FileNotFoundError: missing file or a folder without task files.
        ValueError: malformed row (names file, line and field), unknown ``task``, or an ``answer`` that is
            not a label word of the row's task.
    """
    task = generative.check_options(options, OPTIONS, "commonsense")["task"]
    path = Path(source)
    if path.is_dir():
        if task is not None:
            raise ValueError("task= applies to a single file, not to a folder of task files")
        return [row for name, file in _task_files(path) for row in load_examples(file, limit=limit, task=name)]
    fixed_task = None
    if task is not None:
        fixed_task = canonical_task(task)
        if fixed_task is None:
            raise ValueError(f"unknown commonsense task {task!r}; known: {list(LABEL_WORDS)}")
    file_task = _task_from_path(path)
    examples = []
    for where, record in generative.read_records(path, limit=limit):
        row_task = fixed_task
        if row_task is None and record.get("task") is not None:
            row_task = canonical_task(str(record["task"]))
            if row_task is None:
                raise ValueError(f"{where}: unknown task {record['task']!r}; known: {list(LABEL_WORDS)}")
        row_task = row_task or file_task
        instruction = generative.require_text(record, "instruction", where)
        answer = generative.require_text(record, "answer", where).strip()
        input_text = generative.require_text(record, "input", where, allow_empty=True) if "input" in record else ""
        if "output" in record:
            output = generative.require_text(record, "output", where)
        else:
            output = f"the correct answer is {answer}"
        if row_task is not None and answer not in LABEL_WORDS[row_task]:
            raise ValueError(f"{where}: field 'answer' is {answer!r}, not a label word of task {row_task} "
                             f"{list(LABEL_WORDS[row_task])}")
        examples.append({"task": row_task, "instruction": instruction, "input": input_text, "output": output,
                         "answer": answer})
    return examples


def format_prompt(example: dict[str, Any]) -> str:
    """The Alpaca prompt of a canonical row (``### Input:`` only when ``input`` is non-empty)."""
    return generative.format_prompt(example["instruction"], example.get("input", ""))


def build_train_dataset(examples: list[dict[str, Any]], tokenizer, *, max_length: int, **options: Any):
    """Tokenised rows (``input_ids``, ``attention_mask``, ``labels``) with the loss on ``output`` + EOS.

    Options ``train_on_prompt`` (default ``False``; ``True`` reproduces the LLM-Adapters training) and
    ``on_overlong`` (``"drop"``): see :func:`pica.recipes.tasks.generative.build_sft_dataset`.
    """
    chosen = generative.check_options(options, OPTIONS, "commonsense")
    return generative.build_sft_dataset([format_prompt(example) for example in examples],
                                        [example["output"] for example in examples], tokenizer,
                                        max_length=max_length, train_on_prompt=chosen["train_on_prompt"],
                                        on_overlong=chosen["on_overlong"])


def evaluate(model, tokenizer, examples: list[dict[str, Any]], *, batch_size: int = 8, max_new_tokens: int = 32,
             progress: bool = True, **options: Any) -> dict[str, Any]:
    """Greedy-decode an answer for each example and score its first label word.

    ``max_new_tokens`` defaults to 32, the official setting (the answer sentence is short). ``options``:
    the task options (:data:`OPTIONS`), checked, none used here.

    Returns:
        ``{"metrics": {"accuracy/<task>": float for each task present, "accuracy": mean over those tasks},
        "predictions": [{"task", "prompt", "target", "generation", "extracted", "correct"}, ...]}``.
    """
    from sklearn.metrics import accuracy_score

    generative.check_options(options, OPTIONS, "commonsense")
    if not examples:
        raise ValueError("no examples to evaluate")
    for index, example in enumerate(examples):
        if example.get("task") not in LABEL_WORDS:
            raise ValueError(f"example {index} has no known task ({example.get('task')!r}); load it with task=..., "
                             "a 'task' field, or a file named after its task")
    prompts = [format_prompt(example) for example in examples]
    generations = generative.generate_responses(model, tokenizer, prompts, batch_size=batch_size,
                                                max_new_tokens=max_new_tokens, progress=progress,
                                                description="commonsense eval")
    predictions = []
    for example, prompt, generation in zip(examples, prompts, generations):
        extracted = extract_answer(example["task"], generation)
        predictions.append({"task": example["task"], "prompt": prompt, "target": example["answer"],
                            "generation": generation, "extracted": extracted,
                            "correct": extracted == example["answer"]})
    metrics: dict[str, float] = {}
    for task in LABEL_WORDS:
        rows = [p for p in predictions if p["task"] == task]
        if rows:
            metrics[f"accuracy/{task}"] = float(accuracy_score([p["target"] for p in rows],
                                                               [p["extracted"] for p in rows]))
    metrics["accuracy"] = sum(metrics.values()) / len(metrics)
    return {"metrics": metrics, "predictions": predictions}
