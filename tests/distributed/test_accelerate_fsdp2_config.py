"""examples/accelerate_fsdp2.yaml (FSDP2, rank-0 loading), checked on CPU through accelerate's own code.

On CPU ``Trainer(use_cpu=True)`` runs DDP, so the config is checked here key by key and by what it implies:
the environment ``accelerate launch`` gives its workers, the ``FullyShardedDataParallelPlugin`` they build,
transformers' decision to load on rank 0 only, and the units accelerate's FSDP2 path shards. The loading and
training it implies run with 2 CPU processes in ``rank0_script`` (test_rank0_loading.py).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import yaml
from peft import get_peft_model
from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import pica
from tests.conftest import make_llama
from tests.distributed.accelerate_config import (
    FSDP2_CONFIG,
    fsdp2_units,
    launch_environment,
    launched_environment,
    unknown_fsdp_keys,
)

FSDP1_ONLY = {"fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_backward_prefetch", "fsdp_forward_prefetch",
              "fsdp_sharding_strategy"}
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def make_gemma():
    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(head_dim=8, **SMALL)).eval()


def make_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()


MODELS = {"llama": make_llama, "gemma": make_gemma, "qwen2": make_qwen2}


def test_config_is_a_valid_accelerate_fsdp2_config():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(FSDP2_CONFIG))  # raises on unknown top-level keys
    assert config.distributed_type == "FSDP"
    assert unknown_fsdp_keys(FSDP2_CONFIG) == []  # accelerate would copy an unknown fsdp_config key silently
    keys = set(yaml.safe_load(FSDP2_CONFIG.read_text())["fsdp_config"])
    assert keys.isdisjoint(FSDP1_ONLY), keys & FSDP1_ONLY  # obsolete or refused under FSDP2
    env = launch_environment(FSDP2_CONFIG)  # raises if cpu_ram_efficient_loading lacks sync_module_states
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # classes come from each model's _no_split_modules
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's dtype decides


def test_plugin_built_from_the_config(caplog):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with launched_environment(FSDP2_CONFIG):  # no override: FSDP2 needs no GPU to build its plugin
            plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading is True
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    # the launcher's FSDP1 variables (FSDP_USE_ORIG_PARAMS, FSDP_SYNC_MODULE_STATES, ...) play no part
    assert plugin.use_orig_params is None and plugin.sync_module_states is None
    assert plugin.backward_prefetch is None and plugin.forward_prefetch is None
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "FSDP2" in m or "obsolete" in m], messages


def test_transformers_loads_on_rank_0_only(monkeypatch):
    """``from_pretrained`` under these variables (and an initialised process group) loads the checkpoint on
    local rank 0 and builds the model on the meta device elsewhere."""
    import transformers.distributed.fsdp as hf_fsdp

    monkeypatch.setattr(hf_fsdp, "_is_torch_distributed_initialized", lambda: True)
    with launched_environment(FSDP2_CONFIG):
        assert hf_fsdp.is_fsdp_enabled()
    from tests.distributed.accelerate_config import CONFIG  # the FSDP1 example loads on every rank

    with launched_environment(CONFIG):
        assert not hf_fsdp.is_fsdp_enabled()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_config_policy_shards_each_decoder_layer(kind, share):
    model = get_peft_model(MODELS[kind](), pica.PiCaConfig(rank=4, share_across_layers=share))
    units = fsdp2_units(model)
    assert units == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and not [name for name in trainable if name.startswith(tuple(f"{u}." for u in units))]
