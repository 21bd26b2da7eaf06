"""``PiCaConfig``: the PEFT config of PiCa, validated on construction and on load, and PiCa's name in peft
(``PeftType.PICA``, added to peft's str-enum with ``aenum.extend_enum`` once per process)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, Optional, Union

import aenum
from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from ..base_weights import SCHEME_KEYS
from .quantized import BLOCK_SCALES

__all__ = ["DEFAULT_TARGET_MODULES", "PICA_NAME", "PICA_PEFT_TYPE", "PICA_PREFIX", "PiCaConfig"]

PICA_NAME = "pica"
PICA_PREFIX = "pica_"
if not hasattr(PeftType, PICA_NAME.upper()):
    aenum.extend_enum(PeftType, PICA_NAME.upper(), PICA_NAME.upper())
PICA_PEFT_TYPE: PeftType = getattr(PeftType, PICA_NAME.upper())

logger = logging.getLogger(__name__)

_PROJECTOR_DTYPES = ("float32", "float64")
_REMOVED_FORWARD_MODES = ("merged", "merged_keep")
_SUBSPACES = ("top", "random")


@dataclass
class PiCaConfig(PeftConfig):
    """Configuration of a PiCa adapter.

    PiCa adds ``M_g P_i`` to each targeted weight ``W0_i (out×in)``: ``P_i (rank×in)`` are the frozen
    top-``rank`` right singular vectors of ``W0_i``; ``M_g (out×rank)`` is trainable, zero at start,
    and shared by all layers of the same role (group ``g``) unless ``share_across_layers=False``.

    Unknown keys are refused (``TypeError`` naming them, as peft configs do; ``pica.io.AdapterFileError``
    when they come from an ``adapter_config.json``): a PiCa adapter from a newer version must not load
    with a silently different meaning.

    Attributes:
        rank: number of singular directions per layer; ``1 ≤ rank ≤ min(in, out)`` of every target.
        target_modules: module names matched exactly or as a dotted-path suffix (list), or a regex
            full-matched against the whole path (str). ``None`` uses the default for the model type.
        exclude_modules: same matching rules; these modules are never adapted.
        share_across_layers: one ``M`` per role (module path with layer indices wildcarded) if True,
            one ``M`` per layer if False.
        layers_to_transform: only adapt layers with these indices (int or list).
        layers_pattern: name of the layer-list attribute (e.g. ``"layers"``) used with
            ``layers_to_transform``.
        modules_to_save: extra modules trained in full and saved (e.g. a classifier head).
        projector_dtype: precision of the projector computation, ``"float32"`` or ``"float64"``.
        subspace: ``"top"`` (the method: top-``rank`` right singular vectors) or ``"random"`` (ablation:
            a random orthonormal ``P`` of the same rank, drawn from ``subspace_seed`` and the module name,
            stored in the adapter like the top one).
        subspace_seed: seed of the random subspace (ignored for ``"top"``).
        projector_storage: what the adapter file holds of ``P``: ``"full"`` (every ``P``, exact),
            ``"compact"`` (a small sketch per layer; ``P`` is recomputed at load, aligned to the sketch
            and refused if it misses it), ``"none"`` (nothing; recomputed at load, unchecked).
        store_projector: init-only, not stored: the older name (True = ``"full"``), still read from files
            written by pica 0.1.0; must agree with ``projector_storage``.
        forward_mode: ``"auto"`` (default: ``x (W0 + M P)ᵀ`` in one product when exact and cheaper, else
            factored) or ``"factored"`` (always ``base(x) + (x Pᵀ) Mᵀ``). Files of pica ≤ 0.2 may hold the
            removed ``"merged"``/``"merged_keep"``: they are read as ``"auto"``, with a warning.
        init_weights: True (the method): every ``M`` starts at zero, so the model equals its base.
            False: ``M`` starts as small Gaussian noise (std ``0.1/sqrt(rank)``, from torch's current
            random state), for tests that need an adapter that changes the output from the start (peft's
            convention for ``init_weights=False``); not for training.
        base_quantization: set by PiCa, not by hand: the quantisation scheme of the base the adapter was
            created on (None: unquantised), e.g. ``{"method": "bitsandbytes_4bit", "quant_type": "nf4",
            "blocksize": 64, "compress_statistics": True, "dtype": "float32", "block_scales": "bfloat16",
            "unquantized_modules": []}`` (``block_scales``: ``P`` and fingerprints read the 4-bit block scales
            rounded to bfloat16, so every layout bitsandbytes keeps gives the same ``P``; absent in adapters
            of pica 0.1, which read them as stored). On full-precision weights, ``P`` and fingerprints are
            taken from them quantised again by it (see :mod:`pica.tuner.quantized`).
    """

    rank: int = field(default=256, metadata={"help": "Number of top right singular directions per layer."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (exact or dotted suffix) or a full-match regex."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex never to adapt."}
    )
    share_across_layers: bool = field(default=True, metadata={"help": "One M per role (True) or per layer."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Layer-list attribute name used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. classifier)."}
    )
    projector_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "Precision of the projector computation."}
    )
    subspace: Literal["top", "random"] = field(
        default="top", metadata={"help": "'top' singular subspace (PiCa) or 'random' orthonormal (ablation)."}
    )
    subspace_seed: int = field(default=0, metadata={"help": "Seed of the random subspace (with the module name)."})

    store_projector: InitVar[Optional[bool]] = None
    projector_storage: Literal["full", "compact", "none"] = field(
        default="full", metadata={"help": "full (every P, exact) | compact (a sketch of each P) | none."}
    )
    forward_mode: Literal["auto", "factored"] = field(
        default="auto", metadata={"help": "auto (merged product when exact and cheaper) | factored."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: M = 0 (the method). False: small random M, for tests only."}
    )
    base_quantization: Optional[dict] = field(
        default=None, metadata={"help": "Set by PiCa: quantisation scheme of the base the adapter was created on."}
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> "PiCaConfig":
        known = {f.name for f in dataclasses.fields(cls)} | {"store_projector"} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(kwargs) - known)
        if known and unknown:
            # TypeError, as for any unexpected keyword (peft's convention); worded so that peft's
            # forward-compatibility filter in PeftConfig.from_peft_type does not swallow it.
            raise TypeError(f"PiCaConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return super().__new__(cls)

    def __post_init__(self, store_projector: Optional[bool]) -> None:
        super().__post_init__()
        if store_projector is not None:  # pica 0.1.0 files hold both fields; store_projector was the older one
            if not isinstance(store_projector, bool) or (self.projector_storage == "full") != store_projector:
                raise ValueError(f"PiCaConfig.store_projector={store_projector!r} (older name of projector_storage) "
                                 f"contradicts projector_storage={self.projector_storage!r}")
        self.peft_type = PICA_PEFT_TYPE
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"PiCaConfig.rank must be a positive int, got {self.rank!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                    raise ValueError(f"PiCaConfig.{name} must be None, a regex str or a list of names, got {value!r}")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("PiCaConfig.target_modules is empty; give module names or leave it None for defaults")
        for name in ("share_across_layers", "inference_mode", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PiCaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.projector_dtype not in _PROJECTOR_DTYPES:
            raise ValueError(f"PiCaConfig.projector_dtype must be one of {_PROJECTOR_DTYPES}, got {self.projector_dtype!r}")
        if self.subspace not in _SUBSPACES:
            raise ValueError(f"PiCaConfig.subspace must be one of {_SUBSPACES}, got {self.subspace!r}")
        if isinstance(self.subspace_seed, bool) or not isinstance(self.subspace_seed, int) or self.subspace_seed < 0:
            raise ValueError(f"PiCaConfig.subspace_seed must be a non-negative int, got {self.subspace_seed!r}")
        if self.projector_storage not in ("full", "compact", "none"):
            raise ValueError(f"PiCaConfig.projector_storage must be 'full', 'compact' or 'none', got {self.projector_storage!r}")
        if self.forward_mode in _REMOVED_FORWARD_MODES:  # e.g. an adapter_config.json of pica 0.2
            logger.warning("PiCaConfig.forward_mode=%r was removed; using 'auto', which computes the merged product "
                           "where it is exact and cheaper (the same outputs)", self.forward_mode)
            self.forward_mode = "auto"
        if self.forward_mode not in ("auto", "factored"):
            raise ValueError(f"PiCaConfig.forward_mode must be 'auto' or 'factored', got {self.forward_mode!r}")
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise ValueError(f"PiCaConfig.layers_to_transform must be an int or list of ints, got {layers!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("PiCaConfig.layers_pattern needs layers_to_transform to be set")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("PiCaConfig.layers_to_transform cannot be used when target_modules is a regex str")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(f"PiCaConfig.modules_to_save must be a list of str, got {self.modules_to_save!r}")
        _check_base_quantization(self.base_quantization)


def _check_base_quantization(record: Any) -> None:
    """Raise ``ValueError`` naming the problem if ``record`` is not a valid ``PiCaConfig.base_quantization``."""
    if record is None:
        return
    if not isinstance(record, dict) or record.get("method") not in SCHEME_KEYS:
        raise ValueError(f"PiCaConfig.base_quantization must be None or a dict with 'method' in {sorted(SCHEME_KEYS)}, "
                         f"got {record!r}")
    expected = {"method", "unquantized_modules", *SCHEME_KEYS[record["method"]]}
    optional = {"block_scales"} if record["method"] == "bitsandbytes_4bit" else set()
    if not expected <= set(record) <= expected | optional:
        raise ValueError(f"PiCaConfig.base_quantization for {record['method']} needs exactly the keys {sorted(expected)}"
                         f"{f' (optionally {sorted(optional)})' if optional else ''}, got {sorted(record)}")
    if record.get("block_scales", BLOCK_SCALES) != BLOCK_SCALES:
        raise ValueError(f"PiCaConfig.base_quantization['block_scales'] must be {BLOCK_SCALES!r}, "
                         f"got {record['block_scales']!r}")
    modules = record["unquantized_modules"]
    if not isinstance(modules, list) or not all(isinstance(name, str) for name in modules):
        raise ValueError(f"PiCaConfig.base_quantization['unquantized_modules'] must be a list of str, got {modules!r}")


# DEFAULT_TARGET_MODULES: ``target_modules`` per transformers ``model_type``, used when the config gives none.
#
# The rule: PiCa's roles, the paper's choice (the attention query, key and value projections and the
# MLP up and down projections; a fused projection such as ``query_key_value`` or ``qkv_proj`` is one
# role), under each architecture's own module names, for every model type peft's LoRA mapping lists
# (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) and a few more. Encoders target the attention
# projections and the three dense layers of each block, and never the pooler. Encoder-decoder models
# (T5, mT5, BART) adapt the same roles in the encoder, the decoder's self-attention and its
# cross-attention (each its own group). Multimodal models adapt their language model only.
_DECODER = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", *_BERT_LIKE]
_T5 = ["q", "k", "v", "wi", "wi_0", "wi_1", "wo"]  # gated T5 (v1.1, mT5) splits wi into wi_0 / wi_1
_DEBERTA = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{
        model_type: _DECODER
        for model_type in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "olmo", "olmo2", "smollm3", "granite", "cohere", "stablelm", "llama4_text",
            "gemma4_text", "nemotron_h",
        )
    },
    "gpt2": ["c_attn", "c_fc"],
    **{model_type: _BERT_LIKE for model_type in ("bert", "roberta", "xlm-roberta", "electra")},
    # ViT-style encoders: transformers ≥5 names (q/k/v/o_proj, fc1/fc2) and the older BERT-style names.
    **{model_type: _VIT for model_type in ("vit", "dinov2", "deit")},
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": _DEBERTA,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    # Other decoders, same roles (attention q/k/v, MLP up/down) under their own names; fused projections
    # (query_key_value, qkv_proj, gate_up_proj) are one role each.
    **{model_type: ["q_proj", "k_proj", "v_proj", "fc1", "fc2"] for model_type in ("opt", "phi")},
    "gptj": ["q_proj", "k_proj", "v_proj", "fc_in", "fc_out"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "c_fc", "c_proj"],
    **{model_type: ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"] for model_type in ("gpt_neox", "falcon", "bloom")},
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "c_fc", "c_proj"],
    "codegen": ["qkv_proj", "fc_in", "fc_out"],
    "gpt_bigcode": ["c_attn", "mlp.c_fc", "mlp.c_proj"],  # attn.c_proj is the output projection
    "mpt": ["Wqkv", "up_proj", "down_proj"],
    "rwkv": ["attention.key", "attention.value", "attention.receptance", "feed_forward.key", "feed_forward.value"],
    "layoutlm": _BERT_LIKE,
    **{model_type: _T5 for model_type in ("t5", "mt5")},
    "bart": ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
    # multimodal: the language model only (a regex over the whole module path)
    "llama4": r".*language_model\..*\.(q_proj|k_proj|v_proj|up_proj|down_proj)",
    "gemma4": r".*language_model\..*\.(q_proj|k_proj|v_proj|up_proj|down_proj)",
    "blip-2": r".*language_model\..*\.(q_proj|k_proj|v_proj|fc1|fc2|q|k|v|wi|wi_0|wi_1|wo)",
    # remote-code architectures (not in transformers; names from their published modelling code, untested here)
    **{model_type: ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]
       for model_type in ("RefinedWeb", "RefinedWebModel", "chatglm")},
    "btlm": ["c_attn", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "key", "value"],
}
