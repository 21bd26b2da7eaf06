"""examples/accelerate_fsdp.yaml, checked on CPU through accelerate's own launcher code (no GPU, one process).

The 2-process FSDP script (``fsdp_script``) applies the same policies to real FSDP units.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from peft import get_peft_model

import pica
from tests.conftest import make_llama
from tests.distributed.accelerate_config import (
    CONFIG,
    config_policies,
    launch_environment,
    launched_environment,
    unknown_fsdp_keys,
    wrapped_by,
)

LAYERS = ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def test_config_is_a_valid_accelerate_fsdp_config():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIG))  # raises on unknown top-level keys
    assert config.distributed_type == "FSDP"
    assert unknown_fsdp_keys() == []  # accelerate would copy an unknown fsdp_config key silently
    env = launch_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # classes come from each model's _no_split_modules
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's dtype decides
    assert yaml.safe_load(CONFIG.read_text())["fsdp_config"]["fsdp_use_orig_params"] is True


def test_plugin_built_from_the_config():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    with launched_environment(FSDP_SYNC_MODULE_STATES="false"):  # sync needs a GPU device; not a wrapping matter
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD


@pytest.mark.parametrize("share", [True, False])
def test_config_policies_wrap_each_decoder_layer(share):
    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=4, share_across_layers=share))
    policies = config_policies(model)
    assert wrapped_by(policies["accelerate"], model) == LAYERS
    assert wrapped_by(policies["peft"], model) == LAYERS  # Trainer installs this one for a PEFT model


def test_fsdp2_through_trainer_would_not_wrap_per_layer():
    """Why this example uses FSDP1 with peft's policy: accelerate's FSDP2 path only translates
    transformer-/size-based policies, so given peft's (which Trainer installs under FSDP1) it would shard
    nothing below the root. Under FSDP2 Trainer keeps the config's policy (examples/accelerate_fsdp2.yaml,
    test_accelerate_fsdp2_config.py)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=4))
    with launched_environment(FSDP_SYNC_MODULE_STATES="false", FSDP_VERSION="2",
                              FSDP_RESHARD_AFTER_FORWARD="true"):
        plugin = FullyShardedDataParallelPlugin()
    plugin.auto_wrap_policy = config_policies(model)["peft"]  # = transformers' update_fsdp_plugin_peft
    assert fsdp2_prepare_auto_wrap_policy(plugin, model) is None


def test_python_m_pica_cli_is_the_entry_point():
    result = subprocess.run([sys.executable, "-m", "pica.cli", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--recipe" in result.stdout
