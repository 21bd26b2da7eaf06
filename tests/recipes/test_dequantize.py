"""GGUF → plain safetensors checkpoint: a tiny Llama written as a real GGUF file (gguf package), read back
through transformers, rebuilt without the quantisation flag, cached, and trainable by PiCa and Trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model

from pica import PiCaConfig
from pica.recipes import dequantize
from pica.recipes.models import load_base_model, load_tokenizer, model_source
from tests.conftest import make_llama

gguf = pytest.importorskip("gguf")

N_HEAD, N_KV_HEAD = 4, 2


def _byte_alphabet() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2 convention: printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows for its rotary layout; transformers undoes it on load."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_llama_gguf(path, model, half: bool = False) -> None:
    """Write ``model`` (a tiny LlamaForCausalLM, vocab 259, tied embeddings) as a llama GGUF with a BPE tokenizer."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None)
                              else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    tokens = _byte_alphabet() + ["Ġt", "<s>", "</s>"]
    assert len(tokens) == config.vocab_size
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    state = {k: v.detach().numpy().astype(np.float16 if half else np.float32) for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].astype(np.float32))
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _llama_cpp_permute(weight, N_HEAD)
            elif gguf_name == "attn_k":
                weight = _llama_cpp_permute(weight, N_KV_HEAD)
            if weight.ndim == 1:
                weight = weight.astype(np.float32)  # norms stay float32 in GGUF
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv(dequantize.CACHE_ENV, str(tmp_path / "cache"))
    model = make_llama(vocab_size=259, num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD,
                       tie_word_embeddings=True, pad_token_id=None, bos_token_id=257, eos_token_id=258,
                       max_position_embeddings=512)
    model.tie_weights()
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path, model)
    return model, path


def test_roundtrip_gives_the_original_weights_as_a_plain_model(tiny, tmp_path):
    original, path = tiny
    directory = dequantize.dequantized_checkpoint(path)
    assert directory.parent == tmp_path / "cache" / "gguf"
    assert directory.name.startswith("tiny-")
    marker = json.loads((directory / dequantize.MARKER_FILE).read_text())
    assert marker["sha256"] == dequantize.file_sha256(path) and marker["architecture"] == "LlamaForCausalLM"
    assert (directory / "model.safetensors").is_file()

    model = load_base_model(str(path), "generative")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie kept
    reference = original.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)  # exact: the GGUF was float32
    ids = torch.tensor([[257, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_transformers_gguf_model_is_flagged_quantised_and_rebuild_removes_the_flag(tiny):
    """The reason for the conversion: transformers' GGUF model is flagged as quantised and Trainer refuses
    to fine-tune it, even with a PiCa adapter attached."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    original, path = tiny
    flagged = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    assert flagged.config.quantization_config is not None
    args = TrainingArguments(output_dir=str(path.parent / "trainer"), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="GGUF"):
        Trainer(model=get_peft_model(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name),
                                     PiCaConfig(rank=4)), args=args)
    plain = dequantize.rebuild_plain_model(flagged)
    assert getattr(plain.config, "quantization_config", None) is None
    Trainer(model=get_peft_model(plain, PiCaConfig(rank=4)), args=args)  # accepted
    plain = dequantize.rebuild_plain_model(flagged)
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_half_precision_gguf_dequantises_to_the_rounded_weights(tiny, tmp_path):
    original, _ = tiny
    path = tmp_path / "models" / "tiny-f16.gguf"
    write_tiny_llama_gguf(path, original, half=True)
    model = load_base_model(str(path.parent), "generative", gguf_file=path.name)
    weight = model.model.layers[1].self_attn.q_proj.weight
    expected = original.model.layers[1].self_attn.q_proj.weight.to(torch.float16).to(torch.float32)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert weight.dtype == torch.float32


def test_cached_once_and_reconverted_when_the_file_changes(tiny, monkeypatch):
    original, path = tiny
    first = dequantize.dequantized_checkpoint(path)
    calls = []
    real = dequantize.rebuild_plain_model
    monkeypatch.setattr(dequantize, "rebuild_plain_model", lambda m: calls.append(1) or real(m))
    assert dequantize.dequantized_checkpoint(path) == first and calls == []  # cache hit, no conversion
    source, extra = model_source(str(path), None)
    assert source == str(first) and extra == {} and calls == []
    # A different file under the same name gets its own entry (keyed by content hash).
    with torch.no_grad():
        original.model.norm.weight.add_(1.0)
    write_tiny_llama_gguf(path, original)
    second = dequantize.dequantized_checkpoint(path)
    assert second != first and calls == [1]
    # An entry whose marker is missing (an interrupted older conversion) is not trusted.
    (second / dequantize.MARKER_FILE).unlink()
    assert dequantize.dequantized_checkpoint(path) == second and calls == [1, 1]


def test_tokenizer_comes_from_the_gguf(tiny):
    _, path = tiny
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token is not None
    ids = tokenizer("Hi! to", add_special_tokens=False)["input_ids"]
    assert ids == [ord("H"), ord("i"), ord("!"), 256, ord("o")]  # byte-level ids, and the merge " t" → "Ġt"


def test_converted_model_trains_with_pica(tiny):
    """PiCa wraps the converted model and one optimiser step changes only M."""
    _, path = tiny
    model = get_peft_model(load_base_model(str(path), "generative"), PiCaConfig(rank=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.shape[1] == 4 for p in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([[257, 40, 41, 42, 43, 44, 258]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed and all(".pica_M." in k for k in changed), changed


def test_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(dequantize.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        dequantize.dequantized_checkpoint(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        dequantize.dequantized_checkpoint(bad)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_pica_train_and_eval_on_a_gguf_through_the_cli(tiny, tmp_path, capsys):
    """`pica train --model DIR --gguf-file NAME` trains on the converted checkpoint; `pica eval` reloads it."""
    from pica.cli import main

    _, path = tiny
    rows = [{"question": f"Tom has {n} apples and eats one. How many are left?", "answer": f"{n} - 1 = {n - 1}\n#### {n - 1}"}
            for n in range(2, 10)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    assert main(["--no-progress", "train", "--task", "math", "--model", str(path.parent), "--gguf-file", path.name,
                 "--train-data", str(data), "--eval-data", str(data), "--eval-limit", "4", "--generate-limit", "2",
                 "--method", "pica", "--rank", "4", "--max-steps", "2", "--batch-size", "4", "--max-length", "400",
                 "--max-new-tokens", "3", "--output-dir", str(out)]) == 0
    result = json.loads((out / "pica" / "seed0" / "results.json").read_text())
    metrics = result["metrics"]
    assert metrics["generated_examples"] == 2 and metrics["eval_loss_examples"] == 4 and metrics["eval_loss"] > 0
    adapter = json.loads((out / "pica" / "seed0" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(dequantize.dequantized_checkpoint(path))
    capsys.readouterr()
    assert main(["--no-progress", "eval", str(out / "pica" / "seed0"), "--eval-data", str(data), "--eval-limit", "4",
                 "--generate-limit", "2", "--max-new-tokens", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
