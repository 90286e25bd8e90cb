"""timm and big_vision ViT checkpoints to ``tljax.models.vit`` params.

Weights are never downloaded at run time: a checkpoint is a local file whose path is
``transfer.init_from`` (BUILD.md shows how to write one). Two layouts are read, told apart by the
checkpoint's keys, not by the file suffix (either may come as ``.npz``):

* **timm** (huggingface/pytorch-image-models, ``timm/models/vision_transformer.py``): a
  ``VisionTransformer`` ``state_dict`` saved with ``safetensors.torch.save_file`` (or
  ``numpy.savez``); dotted keys ``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``,
  ``blocks.{i}.norm1.weight``, ``blocks.{i}.attn.qkv.weight``, ``blocks.{i}.attn.proj.weight``,
  ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``/``fc2``, ``norm``, ``head``. Linear weights
  ``(out, in)`` are transposed, the patch conv ``(D, C, P, P)`` becomes ``(P, P, C, D)``, and the
  fused ``qkv`` (rows: query, key, value) is split in three.
* **big_vision** (google-research/big_vision ``big_vision/models/vit.py`` with
  ``pool_type='tok'``, and the AugReg ``.npz`` files of google-research/vision_transformer that
  it and timm load): flattened Flax names joined by ``/``; any key with a ``/`` selects this
  layout. Keys may sit under ``params/`` (big_vision) or ``opt/target/`` (old Flax optimizer
  checkpoints), found as the prefix of ``embedding/kernel``; keys outside it (optimizer state)
  are ignored, as ``big_vision.utils.load_params`` does. Both block namings are read:
  big_vision's ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0/Dense_{0,1}}`` and vision_transformer's (``..._1``, ``LayerNorm_2``,
  ``MlpBlock_3``). Attention kernels ``(D, heads, D / heads)`` and ``(heads, D / heads, D)`` are
  reshaped to ``(D, D)``. ``pre_logits`` (a representation layer of some old checkpoints) is
  ignored when the head is excluded (as timm does); with the head it is an error, since the
  logits would not be the checkpoint's. Scanned-layer checkpoints
  (``Transformer/encoderblock/...`` with a leading depth axis) are not read.

Position embeddings. big_vision adds them to the patches *before* prepending the class token
(``pos_embedding`` of N entries, the class token has none), timm and old checkpoints after
(``1 + N`` entries, the first the class token's). As ``big_vision.models.vit.fix_old_checkpoints``
does, the layout is told by the count (``1 + g**2`` or ``g**2``); a missing class entry becomes
zeros, which is the same function. When the checkpoint's grid differs from the template's (a
224-pixel checkpoint in a model of another ``model.image_size``) the grid part is resized
bilinearly and the class entry kept (`resample_pos_embedding`, timm's ``resample_abs_pos_embed``
with ``interpolation='bilinear', antialias=False`` as its ``.npz`` loader calls it). Checkpoint
grids are square, as timm and big_vision assume.

Neither layout records the number of heads: a checkpoint must go into the preset it was
trained as (S/16: 6 heads, B/16: 12). big_vision models use Flax's tanh-approximated GELU where
this ViT (like timm) uses the exact one; timm's ports of those checkpoints make the same swap.

Every problem with a checkpoint (missing keys, keys left over, shapes that do not fit the
template) is reported in one ``ValueError`` that lists all of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = ["LAYOUTS", "convert_vit", "detect_layout", "resample_pos_embedding"]

LAYOUTS = ("timm", "big_vision")

StateDict = Mapping[str, np.ndarray]
Shape = tuple[int, ...]

_BLOCK = re.compile(r"encoder/block(?P<index>\d+)/(?P<layer>.+)")
_QKV = ("query", "key", "value")


# ----------------------------------------------------------------------------------------------
# Position embeddings.


def resample_pos_embedding(
    posemb: np.ndarray, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> np.ndarray:
    """Resizes the square grid part of position embeddings bilinearly, keeping the prefix.

    timm's ``resample_abs_pos_embed(posemb, grid, num_prefix_tokens=...,
    interpolation='bilinear', antialias=False)``: half-pixel-centred bilinear interpolation
    (PyTorch's ``align_corners=False``), computed in float64.

    Args:
      posemb: ``(1, num_prefix_tokens + g * g, D)`` embeddings.
      grid: the new (rows, columns) of patches.
      num_prefix_tokens: leading entries (the class token's) kept as they are.

    Returns:
      ``(1, num_prefix_tokens + rows * columns, D)`` embeddings of ``posemb``'s dtype.

    Raises:
      ValueError: the grid part of ``posemb`` is not square.
    """
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(
            f"Position embeddings of {patches.shape[1]} patches are not a square grid."
        )
    rows, columns = grid
    square = patches.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum(
        "ih,jw,hwd->ijd", _bilinear_matrix(side, rows), _bilinear_matrix(side, columns), square
    )
    resized = resized.reshape(1, rows * columns, -1).astype(posemb.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _bilinear_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` weights of PyTorch's bilinear resize (align_corners=False) along an axis."""
    # PyTorch's source coordinate of output pixel i, clamped at 0 (area_pixel_compute_source_index).
    source = np.maximum((np.arange(new) + 0.5) * (old / new) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), old - 1)
    high = np.minimum(low + 1, old - 1)
    fraction = source - low
    weights = np.zeros((new, old))
    np.add.at(weights, (np.arange(new), low), 1.0 - fraction)
    np.add.at(weights, (np.arange(new), high), fraction)
    return weights


def _has_class_entry(count: int) -> bool:
    """Whether ``count`` position embeddings are a class entry plus a square grid."""
    return count > 1 and math.isqrt(count - 1) ** 2 == count - 1


def _pos_problem(shape: Shape, template: Shape) -> str | None:
    """Why checkpoint position embeddings of ``shape`` cannot become ``template``'s, or None."""
    if tuple(shape) == tuple(template):
        return None
    if len(shape) != 3 or shape[0] != 1 or shape[2] != template[2]:
        return f"(1, 1 + g*g or g*g, {template[2]})"
    count = shape[1]
    if not (_has_class_entry(count) or math.isqrt(count) ** 2 == count):
        return f"(1, 1 + g*g or g*g, {template[2]}) with a square grid g x g"
    if not _has_class_entry(template[1]):
        return (
            f"a grid to resize to the template's {template[1] - 1} patches, which are not a "
            "square grid (a non-square model.image_size)"
        )
    return None


def _convert_pos(posemb: np.ndarray, template: Shape) -> np.ndarray:
    """Checkpoint position embeddings (either layout) as the template's, resized if need be."""
    if not _has_class_entry(posemb.shape[1]):
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    if posemb.shape == tuple(template):
        return posemb
    side = math.isqrt(template[1] - 1)
    return resample_pos_embedding(posemb, (side, side))


# ----------------------------------------------------------------------------------------------
# Where each template leaf comes from.


@dataclasses.dataclass(frozen=True)
class _Source:
    """The checkpoint tensor one template leaf is made of.

    Attributes:
      key: the checkpoint key read.
      problem: checkpoint shape -> None if it fits, else the shape it needs (for messages).
      convert: checkpoint array -> the leaf's array (before the cast to the template's dtype).
    """

    key: str
    problem: Callable[[Shape], str | None]
    convert: Callable[[np.ndarray], np.ndarray]


def _needs(expected: Shape) -> Callable[[Shape], str | None]:
    return lambda shape: None if tuple(shape) == tuple(expected) else str(tuple(expected))


def _exact(key: str, shape: Shape, convert=lambda array: array, expected: Shape | None = None):
    """A leaf read from ``key`` of ``expected`` shape (default: the leaf's own)."""
    return _Source(key, _needs(shape if expected is None else expected), convert)


def _pos_source(key: str, shape: Shape) -> _Source:
    return _Source(key, lambda found: _pos_problem(found, shape), lambda a: _convert_pos(a, shape))


class _Layout(abc.ABC):
    """A checkpoint layout: the source of every template leaf and the keys it may leave over."""

    name: str

    @abc.abstractmethod
    def source(self, path: str, shape: Shape) -> _Source | None:
        """The source of the leaf at ``path`` (``/``-joined) of ``shape``; None if none."""

    def known_keys(self) -> set[str]:
        """Keys this layout reads besides the sources' (alternative names)."""
        return set()

    def ignored(self, key: str, excluded_head: bool) -> bool:
        """Whether a checkpoint key that no leaf reads is left out silently."""
        del key, excluded_head
        return False


class _Timm(_Layout):
    """timm ``VisionTransformer`` state_dict names."""

    name = "timm"
    # tljax module (inside a block, or at the top) -> timm module.
    _BLOCK_MODULES = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn/out": "attn.proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }
    _TOP_MODULES = {"encoder/norm": "norm", "head": "head"}

    def source(self, path, shape):
        module, _, leaf = path.rpartition("/")
        if path == "embedding/cls":
            return _exact("cls_token", shape)
        if path == "embedding/pos_embedding":
            return _pos_source("pos_embed", shape)
        if module == "embedding/patch":
            if leaf == "bias":
                return _exact("patch_embed.proj.bias", shape)
            rows, columns, channels, width = shape
            return _exact(
                "patch_embed.proj.weight",
                shape,
                lambda w: w.transpose(2, 3, 1, 0),
                expected=(width, channels, rows, columns),
            )
        block = _BLOCK.fullmatch(module)
        if block and block["layer"] in (f"attn/{name}" for name in _QKV):
            which = block["layer"].removeprefix("attn/")
            return self._qkv(f"blocks.{block['index']}.attn.qkv", which, leaf, shape)
        if block and block["layer"] in self._BLOCK_MODULES:
            torch_module = f"blocks.{block['index']}.{self._BLOCK_MODULES[block['layer']]}"
        elif module in self._TOP_MODULES:
            torch_module = self._TOP_MODULES[module]
        else:
            return None
        if leaf == "kernel":
            return _exact(f"{torch_module}.weight", shape, lambda w: w.T, expected=shape[::-1])
        return _exact(f"{torch_module}.{'weight' if leaf == 'scale' else 'bias'}", shape)

    @staticmethod
    def _qkv(torch_module: str, which: str, leaf: str, shape: Shape) -> _Source:
        """Rows ``[j * D, (j + 1) * D)`` of the fused qkv, j = 0, 1, 2 for query, key, value."""
        width = shape[-1]
        index = _QKV.index(which)
        part = slice(index * width, (index + 1) * width)
        if leaf == "kernel":
            return _exact(
                f"{torch_module}.weight", shape, lambda w: w[part].T, expected=(3 * width, width)
            )
        return _exact(f"{torch_module}.bias", shape, lambda b: b[part], expected=(3 * width,))


class _BigVision(_Layout):
    """big_vision / vision_transformer Flax names, flattened with ``/``."""

    name = "big_vision"

    def __init__(self, state_dict: StateDict):
        embedding = [key for key in state_dict if key.endswith("embedding/kernel")]
        self.prefix = min(embedding, key=len)[: -len("embedding/kernel")] if embedding else ""
        # vision_transformer numbered a block's sublayers among all of its modules.
        old = any(
            key.startswith(f"{self.prefix}Transformer/encoderblock_") and "/MlpBlock_3/" in key
            for key in state_dict
        )
        self.attention, self.norm2, self.mlp = (1, 2, 3) if old else (0, 1, 0)
        self.pos_keys = (
            f"{self.prefix}pos_embedding",
            f"{self.prefix}Transformer/posembed_input/pos_embedding",
        )
        self.pos_key = next((k for k in self.pos_keys if k in state_dict), self.pos_keys[0])

    def _block_module(self, layer: str) -> str | None:
        attention = f"MultiHeadDotProductAttention_{self.attention}"
        return {
            "norm1": "LayerNorm_0",
            "norm2": f"LayerNorm_{self.norm2}",
            **{f"attn/{name}": f"{attention}/{name}" for name in (*_QKV, "out")},
            "mlp/fc1": f"MlpBlock_{self.mlp}/Dense_0",
            "mlp/fc2": f"MlpBlock_{self.mlp}/Dense_1",
        }.get(layer)

    def source(self, path, shape):
        module, _, leaf = path.rpartition("/")
        if path == "embedding/cls":
            return _exact(f"{self.prefix}cls", shape)
        if path == "embedding/pos_embedding":
            return _pos_source(self.pos_key, shape)
        block = _BLOCK.fullmatch(module)
        if block:
            name = self._block_module(block["layer"])
            if name is None:
                return None
            flax_module = f"{self.prefix}Transformer/encoderblock_{block['index']}/{name}"
            if block["layer"].startswith("attn/"):
                return self._attention(flax_module, block["layer"] == "attn/out", leaf, shape)
        else:
            top = {"embedding/patch": "embedding", "encoder/norm": "Transformer/encoder_norm"}
            if module not in (*top, "head"):
                return None
            flax_module = self.prefix + top.get(module, module)
        return _exact(f"{flax_module}/{leaf}", shape)

    @staticmethod
    def _attention(flax_module: str, is_out: bool, leaf: str, shape: Shape) -> _Source:
        """Flax attention kernels keep a heads axis: (D, h, D/h) in, (h, D/h, D) out."""
        key = f"{flax_module}/{leaf}"
        width = shape[-1]
        if leaf == "bias" and is_out:
            return _exact(key, shape)

        def problem(found: Shape) -> str | None:
            if leaf == "bias":
                fits = len(found) == 2 and found[0] * found[1] == width
                return None if fits else f"(heads, {width} / heads)"
            if is_out:
                fits = len(found) == 3 and found[0] * found[1] == width and found[2] == width
                return None if fits else f"(heads, {width} / heads, {width})"
            fits = len(found) == 3 and found[0] == width and found[1] * found[2] == width
            return None if fits else f"({width}, heads, {width} / heads)"

        return _Source(key, problem, lambda array: array.reshape(shape))

    def known_keys(self):
        return set(self.pos_keys)

    def ignored(self, key, excluded_head):
        outside = not key.startswith(self.prefix)
        return outside or (excluded_head and key.startswith(f"{self.prefix}pre_logits/"))


def detect_layout(state_dict: StateDict) -> str:
    """The layout of a checkpoint: 'big_vision' if any key holds a '/', else 'timm'.

    Args:
      state_dict: checkpoint key -> array.

    Returns:
      One of ``LAYOUTS``.
    """
    return "big_vision" if any("/" in key for key in state_dict) else "timm"


def _layout(state_dict: StateDict) -> _Layout:
    return _BigVision(state_dict) if detect_layout(state_dict) == "big_vision" else _Timm()


# ----------------------------------------------------------------------------------------------
# Conversion.


def convert_vit(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a timm or big_vision ViT checkpoint to params shaped like ``params_template``.

    Args:
      state_dict: checkpoint key -> array (``tljax.validate.read_state_dict`` of the file); the
        layout is `detect_layout`'s.
      params_template: ``params`` of a ``tljax.models.vit.ViT``; its leaves need ``shape`` and
        ``dtype`` only (``jax.eval_shape`` output will do) except under ``exclude``, whose
        leaves are returned as they are.
      exclude: module paths (``'head'``, ``'encoder/block11'``, ``'embedding'``) whose params are
        kept from the template; the checkpoint's tensors for them are not read.

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes (position embeddings resized to the template's grid).

    Raises:
      ValueError: if the template is not a ViT's params, or, listing every problem at once, if
        checkpoint keys are missing, keys are left over, or shapes do not fit the template.
    """
    if "params" in params_template:
        raise ValueError(
            "params_template has a 'params' key: pass variables['params'], not the variables."
        )
    layout = _layout(state_dict)
    flat = traverse_util.flatten_dict(params_template, sep="/")
    shapes = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    sources = _sources(layout, shapes)
    loaded = {path: s for path, s in sources.items() if not _is_excluded(path, exclude)}
    _check_checkpoint(state_dict, layout, sources, loaded, exclude, shapes)
    converted = dict(flat)
    for path, source in loaded.items():
        value = source.convert(np.asarray(state_dict[source.key]))
        converted[path] = np.ascontiguousarray(value, dtype=flat[path].dtype)
    return traverse_util.unflatten_dict(converted, sep="/")


def _sources(layout: _Layout, shapes: Mapping[str, Shape]) -> dict[str, _Source]:
    """Template leaf path -> its source; a ValueError naming the leaves a ViT does not have."""
    sources, strangers = {}, []
    for path, shape in shapes.items():
        source = layout.source(path, shape)
        if source is None:
            strangers.append(path)
        else:
            sources[path] = source
    if strangers:
        raise ValueError(
            f"{len(strangers)} template leaves have no ViT counterpart (e.g. {strangers[:3]}); "
            "params_template must be the params of a tljax.models.vit.ViT."
        )
    return sources


def _is_excluded(leaf_path: str, exclude: Sequence[str]) -> bool:
    module = leaf_path.rpartition("/")[0]
    return any(module == prefix or module.startswith(prefix + "/") for prefix in exclude)


def _check_checkpoint(
    state_dict: StateDict,
    layout: _Layout,
    sources: Mapping[str, _Source],
    loaded: Mapping[str, _Source],
    exclude: Sequence[str],
    shapes: Mapping[str, Shape],
) -> None:
    """Raises one ValueError describing every missing key, leftover key and wrong shape."""
    known = {source.key for source in sources.values()} | layout.known_keys()
    excluded_head = any(p.startswith("head/") and _is_excluded(p, exclude) for p in sources)
    missing = list(dict.fromkeys(s.key for s in loaded.values() if s.key not in state_dict))
    unexpected = [
        key for key in state_dict if key not in known and not layout.ignored(key, excluded_head)
    ]
    # One line per checkpoint key, though query, key and value all read timm's fused qkv.
    mismatched: dict[str, str] = {}
    for path, source in loaded.items():
        if source.key not in state_dict or source.key in mismatched:
            continue
        found = tuple(np.shape(state_dict[source.key]))
        needed = source.problem(found)
        if needed is not None:
            mismatched[source.key] = (
                f"{path}: template {shapes[path]} needs {source.key} of shape {needed}, "
                f"checkpoint has {found}"
            )
    problems = _problem_report(missing, unexpected, list(mismatched.values()))
    if problems:
        raise ValueError(
            f"Cannot convert the {layout.name}-layout checkpoint (read as {layout.name} because "
            f"{_LAYOUT_REASONS[layout.name]}) to this ViT"
            f"{f' (excluding {list(exclude)})' if exclude else ''}:\n{problems}"
        )


_LAYOUT_REASONS = {
    "timm": "no key holds a '/'",
    "big_vision": "its keys hold '/'",
}


def _problem_report(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]
) -> str:
    """The sections of the conversion error, one per kind of problem; empty if there is none."""
    sections = []
    if missing:
        sections.append(_listing(f"{len(missing)} keys missing from the checkpoint", missing))
    if unexpected:
        sections.append(
            _listing(
                f"{len(unexpected)} checkpoint keys have no place in the template (another "
                "architecture, depth or pooling, or a template initialised without its head?)",
                unexpected,
            )
        )
    if mismatched:
        hint = ""
        if any(line.startswith("head/") for line in mismatched):
            hint = (
                " The head differs (a different number of classes?): re-initialise it "
                "(transfer.reinit=('head',), or convert_vit(..., exclude=('head',)))."
            )
        sections.append(_listing(f"{len(mismatched)} shapes differ.{hint}", mismatched))
    return "\n".join(sections)


def _listing(title: str, items: Sequence[str]) -> str:
    return "  " + title + "\n" + "\n".join(f"    {item}" for item in items)
