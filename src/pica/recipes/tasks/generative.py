"""Shared pieces of the generative (instruction → response) tasks: ``math`` and ``commonsense``.

* Reading local ``.json`` (a list of objects) / ``.jsonl`` (one object per line) files with errors that
  name the file and the 1-based line, ``<file>:<line>`` (or the 0-based row index of a ``.json``
  list, ``<file>[<index>]``), through :func:`pica.recipes.data_files.iter_rows`.
* The Alpaca prompt. PiCa's official code (github hjunseoh/PiCa, ``MetaMath/train_math.py`` and the
  LLM-Adapters scripts) uses the Stanford Alpaca instruction template, with and without an ``### Input:``
  section, the response written right after ``### Response:``. The LLM-Adapters copies carry
  source-code indentation inside the string (and differ by a space between their train and eval
  scripts); we use one clean template for training and evaluation.
* Tokenisation with response-only labels (:func:`build_sft_dataset`).
* Batched greedy generation that returns only the generated text (:func:`generate_responses`).
* Task options: the harness passes one ``task_options`` dict to every verb of a task
  (:func:`check_options`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from transformers import GenerationConfig

from ..batching import batch_starts, eval_mode
from ..data_files import iter_rows

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the causal-LM loss (prompt and padding positions)."""

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the Alpaca field is called input)
    """The Alpaca prompt; the ``### Input:`` section only when ``input`` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------- files

def read_records(source: str | os.PathLike, *, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Read the objects of a ``.jsonl`` or ``.json`` file, each with a location for error messages.

    The rows come from :func:`pica.recipes.data_files.iter_rows` (the package's one row reader).

    Args:
        source: path of a ``.jsonl`` file (blank lines skipped) or a ``.json`` file holding a list.
        limit: stop after this many records.

    Returns:
        ``[(location, record), ...]`` where ``location`` reads ``"<path>:<n>"`` (1-based line) or
        ``"<path>[<i>]"`` (0-based index in the JSON list).

    Raises:
        FileNotFoundError: ``source`` does not exist (the message names it).
        ValueError: unknown extension, invalid JSON, or a record that is not an object.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return list(itertools.islice(iter_rows(source, allow_csv=False), limit))


def require_text(record: dict[str, Any], field: str, where: str, *, allow_empty: bool = False) -> str:
    """``record[field]`` as a string; ValueError naming the location and the field otherwise."""
    if field not in record or record[field] is None:
        raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def check_options(options: dict[str, Any], known: dict[str, Any], task: str) -> dict[str, Any]:
    """``known`` (option → default) updated with ``options``; ValueError naming unknown options.

    The harness passes one ``task_options`` dict to every verb of a task (load, build, evaluate), so
    each verb accepts all of its task's options and uses the ones it needs.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {task} task option(s) {unknown}; known: {sorted(known)}")
    return {**known, **options}


# ------------------------------------------------------------------------------------------ tokenising

def eos_token_id(tokenizer) -> int:
    """The tokenizer's EOS id; ValueError if it has none (a causal-LM tokenizer is required)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; generative tasks need one")
    return int(tokenizer.eos_token_id)


def build_sft_dataset(prompts: Sequence[str], responses: Sequence[str], tokenizer, *, max_length: int,
                      train_on_prompt: bool = False, on_overlong: Literal["drop", "error"] = "drop"):
    """Tokenise prompt/response pairs for causal-LM fine-tuning with the loss on the response.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the response without, and
    EOS is appended to the response; the two id lists are concatenated, so the prompt/response boundary
    is exact (no re-tokenisation across it) and identical to what :func:`generate_responses` feeds the
    model at evaluation. Rows longer than ``max_length`` keep the whole prompt and a truncated response
    (then without EOS). A row whose prompt alone takes ``max_length`` tokens or more leaves no response
    token to learn from: it is dropped with a warning (``on_overlong="drop"``) or raises.

    Args:
        prompts, responses: equal-length sequences of strings.
        tokenizer: a HF tokenizer with an ``eos_token``.
        max_length: maximum sequence length in tokens.
        train_on_prompt: put the loss on the prompt tokens too (the LLM-Adapters scripts default).
        on_overlong: ``"drop"`` or ``"error"`` for prompts of ``max_length`` tokens or more.

    Returns:
        ``datasets.Dataset`` with unpadded int lists ``input_ids``, ``attention_mask``, ``labels``
        (each row of length ``L <= max_length``; ``labels[t] = -100`` on prompt tokens unless
        ``train_on_prompt``, else ``input_ids[t]``).
    """
    import datasets

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if on_overlong not in ("drop", "error"):
        raise ValueError(f"on_overlong must be 'drop' or 'error', got {on_overlong!r}")
    eos = eos_token_id(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped: list[int] = []
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if len(prompt) >= max_length:
            if on_overlong == "error":
                raise ValueError(f"example {index}: the prompt alone has {len(prompt)} tokens, "
                                 f">= max_length={max_length}")
            dropped.append(index)
            continue
        target = (list(response) + [eos])[: max_length - len(prompt)]
        input_ids = list(prompt) + target
        labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt) + target
        columns["input_ids"].append(input_ids)
        columns["attention_mask"].append([1] * len(input_ids))
        columns["labels"].append(labels)
    if dropped:
        logger.warning("dropped %d of %d examples whose prompt alone has >= max_length=%d tokens (first: %s)",
                       len(dropped), len(prompt_ids), max_length, dropped[:5])
    if not columns["input_ids"]:
        raise ValueError(f"no training example fits in max_length={max_length}")
    return datasets.Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------ generating

@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Temporarily pad on the left, with EOS as the pad token if the tokenizer has none."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            eos_token_id(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        yield
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _eos_ids(model, tokenizer) -> int | list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    return eos if eos is not None else eos_token_id(tokenizer)


def generate_responses(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 256,
                       progress: bool = True, description: str = "generating") -> list[str]:
    """Greedy continuations of ``prompts``; returns only the newly generated text, in input order.

    Prompts are tokenised exactly as in :func:`build_sft_dataset` (special tokens, no response) and
    batched longest first with left padding (the tokenizer's padding side and pad token are restored
    afterwards). Decoding is greedy (``do_sample=False``, one beam), stopping at EOS or after
    ``max_new_tokens``; special tokens are removed from the decoded text. The model is put in eval mode
    for the call and returned to its previous mode.

    Args:
        model: a HF causal LM (plain or a PeftModel) already on its device.
        tokenizer: its tokenizer (needs an ``eos_token``).
        prompts: the prompt strings.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: generation budget per prompt.
        progress: show a tqdm bar over batches.
        description: the progress bar's label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    device = _model_device(model)
    with eval_mode(model), left_padding(tokenizer), torch.inference_mode():
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=_eos_ids(model, tokenizer))
        for start in batch_starts(len(order), batch_size, progress, description):
            batch = order[start:start + batch_size]
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=True).to(device)
            sequences = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                       generation_config=config)  # (batch, prompt_len + new)
            new_tokens = sequences[:, encoded["input_ids"].shape[1]:]  # (batch, new)
            for index, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[index] = text
    return outputs


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops`` (all of it if none occurs)."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]
