import json

import peft
import pytest

from pica import PICA_PEFT_TYPE, PiCaConfig


def test_defaults_and_peft_type():
    config = PiCaConfig()
    assert config.rank == 256 and config.share_across_layers and config.projector_storage == "full"
    assert config.peft_type == PICA_PEFT_TYPE == peft.PeftType.PICA


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": "8"}, "rank"),
        ({"rank": True}, "rank"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"exclude_modules": 5}, "exclude_modules"),
        ({"share_across_layers": "yes"}, "share_across_layers"),
        ({"store_projector": 1}, "store_projector"),
        ({"store_projector": False}, "contradicts projector_storage='full'"),
        ({"projector_dtype": "bfloat16"}, "projector_dtype"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"modules_to_save": "classifier"}, "modules_to_save"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PiCaConfig(**kwargs)


def test_unknown_fields_raise_type_error_as_peft_configs_do():
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['lora_alpha'\]"):
        PiCaConfig(lora_alpha=16)


def test_json_round_trip_and_bad_files(tmp_path):
    config = PiCaConfig(rank=8, target_modules=["q_proj", "v_proj"], share_across_layers=False)
    config.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PiCaConfig)
    assert (loaded.rank, loaded.target_modules, loaded.share_across_layers) == (8, ["q_proj", "v_proj"], False)

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for patch, error, field in [({"rank": -1}, ValueError, "rank"), ({"new_option": 1}, TypeError, "new_option"),
                                ({"rank": "x"}, ValueError, "rank")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**data, **patch}))
        with pytest.raises(error, match=field):  # an unknown key is never dropped by peft's filter
            peft.PeftConfig.from_pretrained(tmp_path)
