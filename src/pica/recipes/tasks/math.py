"""Math word problems: GSM8K and MetaMathQA, trained on the worked solution, scored on the final number.

Row formats read by :func:`load_examples` (``.jsonl`` or a ``.json`` list):

* GSM8K train: ``{"question", "answer"}``; the answer is a worked solution ending with ``#### <number>``.
* GSM8K test as shipped in ``data/gsm8k`` and MetaMathQA: ``{"query", "response"}``; the response ends
  with ``#### <number>`` (GSM8K) or ``The answer is: <number>`` (MetaMathQA).

Canonical row: ``{"question": str, "solution": str, "answer": str | None}``; ``answer`` is the gold final
number in canonical form (``"1234"``, ``"-3.5"``), ``None`` when the solution's marker is not followed by
a plain number (e.g. the LaTeX answers of the MATH-derived MetaMathQA rows: trainable, not scorable).

Prompt, as in PiCa's official MetaMath scripts (github hjunseoh/PiCa, ``MetaMath/train_math.py`` and
``MetaMath/eval_gsm8k.py``): the Alpaca no-input template (:data:`generative.PROMPT_NO_INPUT`) with the
question as the instruction; the training target (the solution, then EOS) follows ``### Response:``;
at evaluation the official script appends ``" Let's think step by step."`` after ``### Response:``
(:data:`COT_TRIGGER`, option ``prompt_suffix``). Differences from the official scripts, on purpose: the
whole question is the instruction (``train_math.py`` moves the lines after the first into an
``### Input:`` section); decoding uses HF ``generate`` (greedy) instead of vLLM, with the official stop
words applied to the decoded text; answers are compared exactly (the official scorer rounds the
prediction to an integer, so "18.4" counted as 18) and, without a marker, the last number is taken
(the official scorer counts that as invalid).
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from pica.recipes.tasks import generative

logger = logging.getLogger(__name__)

TASK_KIND = "generative"

COT_TRIGGER = " Let's think step by step."
"""Appended to the prompt at evaluation by PiCa's official GSM8K script."""

OPTIONS = {"prompt_suffix": COT_TRIGGER, "train_on_prompt": False, "on_overlong": "drop"}
"""Task options and defaults. Every verb accepts all of them (the harness passes one dict to each):
``prompt_suffix`` (evaluate), ``train_on_prompt`` and ``on_overlong`` (build_train_dataset)."""

STOP_STRINGS = ("### Instruction", "Instruction:", "### Response", "Response:", "Question:", "USER:", "ASSISTANT:")
"""The generated text is cut at the first of these (the official script stops vLLM on the same words)."""

_DATA_ENV = "PICA_DATA_DIR"
_REPO_DATA = Path(__file__).resolve().parents[4] / "data"


def data_dir() -> Path:
    """Folder holding the shipped data sets: ``$PICA_DATA_DIR`` if set, else ``<repo>/data``.

    ``<repo>/data`` is found next to ``src/`` (a git checkout, an editable install). A wheel does not
    carry the data: set ``PICA_DATA_DIR`` to a folder with ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl``.
    """
    return Path(os.environ[_DATA_ENV]) if os.environ.get(_DATA_ENV) else _REPO_DATA


GSM8K_TRAIN = _REPO_DATA / "gsm8k" / "train.jsonl"
"""The shipped GSM8K train split (7,473 rows, MIT licence, see ``data/gsm8k/README.md``)."""
GSM8K_TEST = _REPO_DATA / "gsm8k" / "test.jsonl"
"""The shipped GSM8K test split (1,319 rows)."""


def gsm8k_path(split: str) -> Path:
    """Path of the shipped GSM8K ``"train"`` or ``"test"`` split (under :func:`data_dir`).

    Raises:
        ValueError: unknown split.
        FileNotFoundError: the file is not there (names the path and ``PICA_DATA_DIR``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    path = data_dir() / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K {split} split not found at {path}; set {_DATA_ENV} to the folder "
                                "that holds gsm8k/ (the repository's data/ folder)")
    return path


# --------------------------------------------------------------------------------------------- answers

# A number: optional sign and "$", digits with optional thousands commas, optional decimals, or a fraction.
_NUMBER = r"-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_MARKER_RE = re.compile(r"####|the answer is\s*:?", re.IGNORECASE)


def normalize_number(token: str) -> str | None:
    """Canonical string of a number token.

    ``"$1,234.50"`` → ``"1234.5"``, ``"-7"`` → ``"-7"``, ``"3/4"`` → ``"0.75"``, ``"1/3"`` → ``"1/3"``.

    Returns ``None`` if ``token`` is not a number (or a fraction over zero).
    """
    value = number_value(token)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    decimal = _finite_decimal(value)
    return decimal if decimal is not None else f"{value.numerator}/{value.denominator}"


def number_value(token: str) -> Fraction | None:
    """Exact value of a number token (commas, ``$``, spaces and the Unicode minus allowed)."""
    cleaned = token.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _finite_decimal(value: Fraction) -> str | None:
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return None
    digits = max(twos, fives)
    scaled = abs(value.numerator) * 10**digits // value.denominator
    text = f"{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}".rstrip("0")
    return ("-" if value < 0 else "") + text


def extract_answer(text: str) -> str | None:
    """The final number of a model's solution, canonical (see :func:`normalize_number`), or ``None``.

    The first number after the last ``####`` / ``The answer is`` marker (any case, optional colon) that is
    followed by one; otherwise the last number anywhere in the text; ``None`` if there is no number.
    """
    text = text.replace("\u2212", "-")
    for marker in reversed(list(_MARKER_RE.finditer(text))):
        match = _NUMBER_RE.search(text, marker.end())
        if match is not None:
            return normalize_number(match.group())
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def parse_gold_answer(solution: str) -> str | None:
    """The gold number of a reference solution: the text after its last marker, if that is one number."""
    markers = list(_MARKER_RE.finditer(solution))
    if not markers:
        return None
    rest = solution[markers[-1].end():].strip().rstrip(".").strip()
    if _NUMBER_RE.fullmatch(rest) is None:
        return None
    return normalize_number(rest)


def answers_match(prediction: str | None, gold: str | None) -> bool:
    """Numeric equality of two number strings (``"18.0"`` equals ``"18"``); ``False`` if either is missing."""
    if prediction is None or gold is None:
        return False
    predicted, expected = number_value(prediction), number_value(gold)
    return predicted is not None and predicted == expected


# ------------------------------------------------------------------------------------------ task verbs

def load_examples(source: str | os.PathLike, *, limit: int | None = None, **options: Any) -> list[dict[str, Any]]:
    """Read GSM8K (``question``/``answer``) or MetaMathQA-style (``query``/``response``) rows.

    Args:
        source: a ``.jsonl`` or ``.json`` file (e.g. :func:`gsm8k_path` ``("test")``).
        limit: keep the first ``limit`` rows.
        **options: task options (:data:`OPTIONS`), checked, none used here.

    Returns:
        Canonical rows ``{"question", "solution", "answer"}`` (module docstring).

    Raises:
        FileNotFoundError: missing file. ValueError: a row without either field pair, naming file and line.
    """
    generative.check_options(options, OPTIONS, "math")
    examples = []
    for where, record in generative.read_records(source, limit=limit):
        if "query" in record or "response" in record:
            question_field, solution_field = "query", "response"
        elif "question" in record or "answer" in record:
            question_field, solution_field = "question", "answer"
        else:
            raise ValueError(f"{where}: expected fields 'question'/'answer' (GSM8K) or 'query'/'response' "
                             f"(MetaMathQA), found {sorted(record)}")
        question = generative.require_text(record, question_field, where)
        solution = generative.require_text(record, solution_field, where)
        examples.append({"question": question, "solution": solution, "answer": parse_gold_answer(solution)})
    unscorable = sum(example["answer"] is None for example in examples)
    if unscorable:
        logger.info("%s: %d of %d rows have no numeric final answer (usable for training only)",
                    source, unscorable, len(examples))
    return examples


def format_prompt(question: str) -> str:
    """The Alpaca no-input prompt with ``question`` as the instruction (ends with ``### Response:``)."""
    return generative.format_prompt(question)


def build_train_dataset(examples: list[dict[str, Any]], tokenizer, *, max_length: int, **options: Any):
    """Tokenised rows (``input_ids``, ``attention_mask``, ``labels``) with the loss on ``solution`` + EOS.

    Options ``train_on_prompt`` (default ``False``) and ``on_overlong`` (``"drop"``): see
    :func:`pica.recipes.tasks.generative.build_sft_dataset` for them and for truncation.
    """
    chosen = generative.check_options(options, OPTIONS, "math")
    prompts = [format_prompt(example["question"]) for example in examples]
    solutions = [example["solution"] for example in examples]
    return generative.build_sft_dataset(prompts, solutions, tokenizer, max_length=max_length,
                                        train_on_prompt=chosen["train_on_prompt"], on_overlong=chosen["on_overlong"])


def evaluate(model, tokenizer, examples: list[dict[str, Any]], *, batch_size: int = 8, max_new_tokens: int = 256,
             progress: bool = True, **options: Any) -> dict[str, Any]:
    """Greedy-decode a solution for each example and score its final number.

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        examples: canonical rows, every one with a numeric ``answer``.
        batch_size, max_new_tokens, progress: see :func:`generative.generate_responses`.
        **options: task options (:data:`OPTIONS`); ``prompt_suffix`` is appended after ``### Response:``
            (the official chain-of-thought trigger by default; ``""`` for exactly the training prompt).

    Returns:
        ``{"metrics": {"accuracy": float}, "predictions": [{"question", "prompt", "target", "generation",
        "extracted", "correct"}, ...]}``.
    """
    prompt_suffix = generative.check_options(options, OPTIONS, "math")["prompt_suffix"]
    if not examples:
        raise ValueError("no examples to evaluate")
    for index, example in enumerate(examples):
        if example.get("answer") is None:
            raise ValueError(f"example {index} has no numeric gold answer (its solution does not end with "
                             "'#### <number>' or 'The answer is: <number>'); it cannot be scored")
    prompts = [format_prompt(example["question"]) + prompt_suffix for example in examples]
    generations = generative.generate_responses(model, tokenizer, prompts, batch_size=batch_size,
                                                max_new_tokens=max_new_tokens, progress=progress,
                                                description="math eval")
    predictions = []
    for example, prompt, generation in zip(examples, prompts, generations):
        generation = generative.cut_at_stop(generation, STOP_STRINGS)
        extracted = extract_answer(generation)
        predictions.append({"question": example["question"], "prompt": prompt, "target": example["answer"],
                            "generation": generation, "extracted": extracted,
                            "correct": answers_match(extracted, example["answer"])})
    # The metric is numeric equality per example; accuracy is the fraction of matches.
    accuracy = sum(p["correct"] for p in predictions) / len(predictions)
    return {"metrics": {"accuracy": accuracy}, "predictions": predictions}
