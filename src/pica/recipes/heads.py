"""The task head of a classifier: the module names transformers gives it, and finding it on a model.

A sequence or image classifier built by transformers has a new head named ``classifier`` (BERT, DeBERTa,
ViT, DINOv2) or ``score`` (decoder models); DeBERTa adds a new ``pooler`` in front of it. Every method
trains the head in full (``probe``: only the head), the ``features`` reference reads the head's input,
a quantised base keeps it unquantised, and a saved adapter's head size is read from its weight.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["HEAD_NAMES", "UNQUANTIZED_HEADS", "default_head_modules", "head_module", "head_modules"]

HEAD_NAMES = ("classifier", "score")
"""Names of a transformers classifier's task head (the linear layer that outputs the labels)."""

UNQUANTIZED_HEADS = (*HEAD_NAMES, "pooler")
"""Modules a quantised classifier keeps in full precision by default: the new head and DeBERTa's new pooler."""


def default_head_modules(model: nn.Module, task_kind: str) -> list[str]:
    """Task-head module names of a sequence classifier (:data:`HEAD_NAMES`; DeBERTa's new ``pooler`` too);
    none for generative tasks (the LM head is pretrained).

    Raises:
        ValueError: a classifier without a module of those names (set ``head_modules``).
    """
    if task_kind != "classification":
        return []
    children = dict(model.named_children())
    heads = [name for name in HEAD_NAMES if name in children]
    if getattr(model.config, "model_type", "").startswith("deberta") and "pooler" in children:
        heads.append("pooler")
    if not heads:
        raise ValueError(f"cannot find the task head of {type(model).__name__} among {sorted(children)}; "
                         "set head_modules")
    return heads


def head_modules(model: nn.Module, task_kind: str, given: Optional[list[str]]) -> list[str]:
    """The head modules a run trains in full: ``given`` (the recipe's ``head_modules``) if set, else
    :func:`default_head_modules`."""
    return list(given) if given is not None else default_head_modules(model, task_kind)


def head_module(model: nn.Module, heads: list[str]) -> nn.Module:
    """The output layer among the head modules ``heads`` (the first of them named in :data:`HEAD_NAMES`).

    Raises:
        ValueError: none of ``heads`` is named in :data:`HEAD_NAMES`.
    """
    name = next((name for name in heads if name in HEAD_NAMES), None)
    if name is None:
        raise ValueError(f"method features: none of the head modules {heads} is one of {list(HEAD_NAMES)}")
    return getattr(model, name)
