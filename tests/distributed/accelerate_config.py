"""What ``accelerate launch --config_file examples/accelerate_fsdp.yaml`` hands its workers, without a GPU.

``accelerate launch`` turns the YAML into launch arguments and those into ``FSDP_*`` environment
variables; each worker's ``FullyShardedDataParallelPlugin`` (and peft's ``fsdp_auto_wrap_policy``, which
transformers' ``Trainer`` installs for PEFT models) reads them. These helpers run the same accelerate
functions so that tests can check the example config on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from torch import nn

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fsdp.yaml"


def launch_arguments(config_file: Path = CONFIG):
    """The ``argparse.Namespace`` that ``accelerate launch --config_file CONFIG -m pica.cli train`` works from."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), "-m", "pica.cli", "train"])
    args, _, _ = _validate_launch_command(args)
    return args


def unknown_fsdp_keys(config_file: Path = CONFIG) -> list[str]:
    """``fsdp_config`` keys that are no ``accelerate launch`` option (accelerate copies them silently)."""
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    fsdp = yaml.safe_load(config_file.read_text())["fsdp_config"]
    return sorted(key for key in fsdp if (key if key.startswith("fsdp_") else f"fsdp_{key}") not in options)


def launch_environment(config_file: Path = CONFIG) -> dict[str, str]:
    """The ``FSDP_*`` / ``ACCELERATE_*`` variables the launcher sets for its workers."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(launch_arguments(config_file))
    return {key: value for key, value in env.items() if key.startswith(("FSDP_", "ACCELERATE_"))}


@contextlib.contextmanager
def launched_environment(config_file: Path = CONFIG, **overrides: str) -> Iterator[dict[str, str]]:
    """Apply :func:`launch_environment` (then ``overrides``) to ``os.environ`` for the duration of the block."""
    env = {**launch_environment(config_file), **overrides}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def config_policies(model: nn.Module, config_file: Path = CONFIG) -> dict[str, Callable]:
    """The FSDP1 auto-wrap policies a worker launched with the config would use for ``model``.

    ``accelerate``: the plugin's own (used by ``Accelerator.prepare``); ``peft``: peft's
    ``fsdp_auto_wrap_policy``, which ``Trainer`` substitutes for a PEFT model (it reads
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` from the same environment).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft.utils.other import fsdp_auto_wrap_policy

    # sync_module_states makes the plugin look up the current accelerator device (for meta-device
    # initialisation), which a CPU-only host lacks; it plays no part in the wrapping policy.
    with launched_environment(config_file, FSDP_SYNC_MODULE_STATES="false"):
        plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(model)
        peft_policy = fsdp_auto_wrap_policy(model)
    assert plugin.auto_wrap_policy is not None, "the config implies no auto-wrap policy"
    return {"accelerate": plugin.auto_wrap_policy, "peft": peft_policy}


def wrapped_by(policy: Callable, model: nn.Module) -> list[str]:
    """Names of the modules an FSDP1 auto-wrap ``policy`` gives their own unit (the root always has one)."""
    def wraps(module: nn.Module) -> bool:
        numel = sum(p.numel() for p in module.parameters())
        return bool(policy(module=module, recurse=False, nonwrapped_numel=numel))

    return [name for name, module in model.named_modules() if name and wraps(module)]


FSDP2_CONFIG = CONFIG.with_name("accelerate_fsdp2.yaml")


def fsdp2_units(model: nn.Module, config_file: Path = FSDP2_CONFIG) -> list[str]:
    """Names of the modules accelerate's ``fsdp2_prepare_model`` gives a ``fully_shard`` unit of their own
    through the config's auto-wrap policy (the root is always one; the embedding and the tail, which
    accelerate carves out separately, are not included)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up

    with launched_environment(config_file):
        plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)  # as fsdp2_prepare_model does
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None, "the config implies no FSDP2 auto-wrap policy"
    names = {module: name for name, module in model.named_modules()}
    chosen = {names[module] for module in get_module_children_bottom_up(model)[:-1] if policy(module)}
    return [name for name, _ in model.named_modules() if name in chosen]
