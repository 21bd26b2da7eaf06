"""Answer-token eval loss (Trainer.evaluate on response-only labels) and the generative eval options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pica.recipes import harness
from pica.recipes.answer_loss import answer_token_loss
from pica.recipes.config import RecipeConfig, RecipeError
from pica.recipes.tasks import get_task
from tests.harness_fixtures import fake_generative_task, save_tiny_llama, write_jsonl

ROWS = [{"question": "q good", "answer": "yes"}, {"question": "q the movie was very bad", "answer": "no no no"},
        {"question": "q nice", "answer": "yes a plot"}, {"question": "q a", "answer": "no"}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = save_tiny_llama(tmp_path_factory.mktemp("llama"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return directory, model, tokenizer


def _reference_losses(model, dataset) -> list[tuple[float, int]]:
    """(sum of response-token cross-entropies, token count) per row, by hand with plain torch."""
    out = []
    for row in dataset:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]  # (L-1, vocab): position t predicts token t+1
        targets = labels[1:]
        out.append((F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item(),
                    int((targets != -100).sum())))
    return out


def test_loss_matches_a_hand_computation(llama):
    _, model, tokenizer = llama
    task = fake_generative_task()
    dataset = task.build_train_dataset(ROWS, tokenizer, max_length=32)
    reference = _reference_losses(model, dataset)
    per_example = answer_token_loss(model, tokenizer, task, ROWS, max_length=32, batch_size=1, options={})
    expected = sum(total / count for total, count in reference) / len(reference)
    assert per_example["eval_loss"] == pytest.approx(expected, rel=1e-5)
    # One batch holding every row: the token-weighted mean (padding positions are masked).
    one_batch = answer_token_loss(model, tokenizer, task, ROWS, max_length=32, batch_size=len(ROWS), options={})
    tokens = sum(count for _, count in reference)
    assert one_batch["eval_loss"] == pytest.approx(sum(total for total, _ in reference) / tokens, rel=1e-5)
    assert one_batch["eval_loss_tokens"] == tokens and one_batch["eval_loss_examples"] == len(ROWS)
    assert not model.training


def test_math_loss_is_on_the_response_even_if_training_used_the_prompt(llama):
    _, model, tokenizer = llama
    math_task = get_task("math")
    examples = [{"question": "the movie was very good", "solution": "yes a plot #### 4", "answer": "4"},
                {"question": "q", "solution": "no #### 5", "answer": "5"}]
    plain = answer_token_loss(model, tokenizer, math_task, examples, max_length=48, batch_size=2, options={})
    forced = answer_token_loss(model, tokenizer, math_task, examples, max_length=48, batch_size=2,
                               options={"train_on_prompt": True})
    assert forced == plain
    response_tokens = sum(len(tokenizer(e["solution"], add_special_tokens=False)["input_ids"]) + 1 for e in examples)
    assert plain["eval_loss_tokens"] == response_tokens  # solution + EOS, nothing of the prompt
    with pytest.raises(ValueError, match="no examples"):
        answer_token_loss(model, tokenizer, math_task, [], max_length=48, batch_size=2, options={})


def test_evaluate_model_generates_a_subset_and_scores_the_loss_on_all(llama, tmp_path):
    directory, model, tokenizer = llama
    task = fake_generative_task()
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    recipe = RecipeConfig(task="classify", model=str(directory), train_data=data, eval_data=data, max_length=32,
                          max_new_tokens=2, eval_batch_size=2, generate_limit=3, output_dir=str(tmp_path / "o"))
    prepared = harness.PreparedRun(recipe, task, {}, tokenizer, [], ROWS)
    evaluation = harness.evaluate_model(model, prepared, recipe, progress=False)
    metrics = evaluation["metrics"]
    assert len(evaluation["predictions"]) == 3 and metrics["generated_examples"] == 3
    assert metrics["eval_loss_examples"] == 4 and metrics["eval_loss"] > 0
    assert {"generate_seconds", "eval_loss_seconds", "accuracy"} <= set(metrics)
    no_loss = RecipeConfig(**{**recipe.to_dict(), "eval_loss": False, "generate_limit": None})
    evaluation = harness.evaluate_model(model, harness.PreparedRun(no_loss, task, {}, tokenizer, [], ROWS), no_loss,
                                        progress=False)
    assert "eval_loss" not in evaluation["metrics"] and len(evaluation["predictions"]) == 4


def test_generate_limit_is_validated():
    with pytest.raises(RecipeError, match="generate_limit"):
        RecipeConfig(generate_limit=0)
