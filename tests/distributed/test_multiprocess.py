"""Multi-process training with PiCa: DDP through transformers Trainer, and FSDP wrapping policies.

Each test launches ``torchrun --nproc_per_node=2`` (gloo, CPU) on a script in this package.
Marked ``multiprocess`` (deselect with ``-m "not multiprocess"``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_BATCH = 6, 4


def _torchrun(processes: int, module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, *args]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # the scripts dump every thread's stack before this (HANG_DUMP_S)
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"torchrun {module} timed out after {timeout} s:\n{stderr[-8000:]}") from None
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from tests.distributed.train_script import main as train

    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"world{processes}"
        if processes == 1:  # the reference: this process, no torch.distributed, one thread like the workers
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(str(out), GLOBAL_BATCH, STEPS)
            finally:
                torch.set_num_threads(threads)
        else:
            _torchrun(processes, "tests.distributed.train_script", str(out), str(GLOBAL_BATCH), str(STEPS))
        runs[processes] = (json.loads((out / "run.json").read_text()),
                           [load_file(out / f"updates_rank{rank}.safetensors") for rank in range(processes)])
    (single, [single_updates]), (double, double_updates) = runs[1], runs[2]
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["wrapper"] == "DistributedDataParallel"
    assert set(single_updates) == set(double_updates[0]) and len(single_updates) == 5  # one M per group
    for group, expected in single_updates.items():
        assert expected.abs().max() > 1e-3  # trained, not still zero
        assert torch.equal(double_updates[0][group], double_updates[1][group])  # ranks agree exactly
        relative = float((double_updates[0][group] - expected).norm() / expected.norm())
        assert relative <= 1e-6, (group, relative)  # measured ≤ 3.0e-7
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(single["losses"], double["losses"]))


# Tolerance for FSDP vs one process, relative Frobenius difference of each group's M after 3 AdamW steps.
# Both runs compute the same math in fp32 but in a different order: each rank sums the gradient over its
# half of the batch, then FSDP reduce-scatters (averages) the halves, and the half-batch matmuls may block
# their reductions differently. The gradient of an M element is a sum over N ~ tokens x hidden products
# (4 x 12 tokens x 32 features ~ 1.5e3 terms); reordering an fp32 sum of N terms perturbs it by
# ~ sqrt(N) * u relative (random-walk rounding, u = 2^-24 = 6e-8), i.e. ~ 2.3e-6, more where the terms
# cancel. AdamW turns the gradient into lr * m_hat / (sqrt(v_hat) + eps): at step 1 that is lr * sign(g),
# blind to a relative error, and afterwards a relative gradient error delta moves m_hat / sqrt(v_hat) by at
# most ~delta (first order), for elements whose gradient is well above the rounding noise and eps. Over 3
# steps M ~ lr * (sum of 3 such ratios), so its relative error stays ~delta (plus the tiny effect of the
# perturbed M on later gradients at lr = 1e-2). Measured: <= 1.36e-6 today, once 2.31e-6 (which broke a
# 2e-6 bound). 1e-5 = ~4x the sqrt(N) * u estimate, room for cancellation; a real bug is orders larger
# (expected, not measured: a rank training on its half alone or a stale M flips many of Adam's signs).
# Blind spot: Adam is invariant to a uniform gradient scale, so sum-vs-mean reduction bugs pass here.
FSDP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    """One torchrun launch of ``fsdp_script`` (training matrix, state-dict round trip, config policies)."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.json"
    _torchrun(2, "tests.distributed.fsdp_script", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"train", "round_trip", "config"}
    return results


FSDP_VARIANTS = [f"{engine}/{policy}/{sharing}" for engine in ("fsdp1", "fsdp2")
                 for policy in ("whole_model", "per_decoder_layer") for sharing in ("shared", "unshared")]


@pytest.mark.parametrize("variant", FSDP_VARIANTS)
def test_fsdp_two_processes_match_one_process(fsdp_results, variant):
    """Every engine x wrapping x sharing trains like one process. Shared + per_decoder_layer fails until
    every M lives on the tuner module (the root FSDP unit) instead of on one member layer."""
    assert set(fsdp_results["train"]) == set(FSDP_VARIANTS)
    result = fsdp_results["train"][variant]
    assert result["ok"], result.get("error")
    engine, policy, sharing = variant.split("/")
    assert result["groups"] == (5 if sharing == "shared" else 10)  # q/k/v/up/down, x 2 layers if unshared
    if policy == "per_decoder_layer":
        layers = ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
        assert result["units"] == ["", *layers] and result["decoder_layer_units"] == 2, result["units"]
        for name, unit in result["update_units"].items():  # shared: the root; unshared: root or own layer
            assert unit == "" or (sharing == "unshared" and name.startswith(unit + ".")), (name, unit)
    else:
        assert result["units"] == [""]
    assert result["max_relative_difference"] <= FSDP_TOLERANCE, result


@pytest.mark.parametrize("sharing", ["shared", "unshared"])
def test_fsdp1_per_layer_adapter_state_dict_round_trip(fsdp_results, sharing):
    """Save as Trainer does under FSDP1 per layer (FULL_STATE_DICT, then get_peft_model_state_dict of the
    wrapped model's module: every FSDP segment is stripped from the layer names) and load onto a fresh
    wrapped model with set_peft_model_state_dict inside summon_full_params: the same M and logits, bit for bit."""
    result = fsdp_results["round_trip"][f"fsdp1/per_decoder_layer/{sharing}"]
    assert result["ok"], result.get("error")
    assert result["updates_nonzero"] and result["saved_match_trained"]
    assert result["saved_updates"] == (5 if sharing == "shared" else 10)
    assert result["unexpected_keys"] == []
    assert "summon_full_params" in result["refused_outside_summon"]  # never a silent partial load
    assert result["updates_identical"] and result["logits_identical"], result
    assert result["selected_as_trainer"] == result["selected_by_twin"], result  # Trainer.save_model's path


@pytest.mark.parametrize("sharing", ["shared", "unshared"])
@pytest.mark.parametrize("source", ["accelerate", "peft"])
def test_example_fsdp_config_wraps_each_decoder_layer(fsdp_results, source, sharing):
    """examples/accelerate_fsdp.yaml: accelerate's policy and peft's (Trainer's for PEFT models), built
    from the launcher's environment, give one FSDP1 unit per decoder layer; a shared M is in the root."""
    result = fsdp_results["config"][f"fsdp1/{source}_policy/{sharing}"]
    assert result["ok"], result.get("error")
    layers = ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert result["policy_wraps"] == layers and result["units"] == ["", *layers]
    assert result["decoder_layer_units"] == 2
    if sharing == "shared":  # fails until M lives on the tuner module
        assert set(result["update_units"].values()) == {""}, result["update_units"]


def test_pica_train_under_torchrun_publishes_one_output_from_rank_zero(tmp_path):
    """``pica train`` launched on 2 processes (DDP via Trainer): every rank trains, rank 0 alone publishes."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl

    model = save_tiny_bert(tmp_path / "bert")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "classify", "model": str(model), "train_data": str(write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32))),
        "eval_data": str(write_jsonl(tmp_path / "test.jsonl", sentiment_rows(12, seed=1))), "rank": 4, "lr": 0.005,
        "max_steps": 2, "batch_size": 4, "max_length": 16, "methods": ["pica"], "output_dir": str(tmp_path / "out")}))
    launched = _torchrun(2, "pica.cli", "--no-progress", "train", "--recipe", str(recipe))
    logs = launched.stdout + launched.stderr
    assert re.search(r"run pica seed 0 \(lr 0\.005, [a-z]+\) → ", logs) and ".pica-rank1-" in logs  # rank 1 trained privately
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert [run["method"] for run in results["runs"]] == ["pica"] and results["runs"][0]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "out", "recipe.yaml", "test.jsonl", "train.jsonl"]
    adapter = out / "pica" / "seed0" / "adapter"
    names = {p.name for p in adapter.iterdir()}  # Trainer.save_model also writes the collator's tokenizer
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "training_args.bin" not in names
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    PeftModel.from_pretrained(base, adapter)  # loads through every check
