"""PyTorch (torchvision-layout) ResNet checkpoints to ``tljax.models.resnet`` params.

Weights are never downloaded at run time: a checkpoint is a local ``.safetensors`` or ``.npz``
file holding a torchvision ``state_dict`` (BUILD.md shows how to write one), whose path is a
config field. The conversion:

* convolutions: ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out);
* ``fc``: ``weight`` (out, in) -> ``head/kernel`` (in, out), ``bias`` -> ``head/bias``;
* BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``, eps 1e-5) is folded into
  the ``norm='affine'`` layers: ``scale = weight / sqrt(running_var + eps)`` and
  ``bias = bias - running_mean * scale``, which is BatchNorm in eval mode exactly;
  ``num_batches_tracked`` is ignored.

The template must come from a ``norm='affine'`` ResNet: GroupNorm has the same parameter names
but folded BatchNorm statistics mean nothing to it.

Every problem with a checkpoint (missing keys, keys left over, shapes that differ from the
template) is reported in one ``ValueError`` that lists all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = [
    "BATCH_NORM_EPS",
    "convert_resnet",
    "load_pretrained_resnet",
    "load_state_dict",
]

# torch.nn.BatchNorm2d's default, used by every torchvision ResNet.
BATCH_NORM_EPS = 1e-5

StateDict = Mapping[str, np.ndarray]
Path = tuple[str, ...]

_SUFFIXES = (".safetensors", ".npz")
_IGNORED_SUFFIX = ".num_batches_tracked"
_BATCH_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


# ----------------------------------------------------------------------------------------------
# Files.


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``state_dict`` saved as ``.safetensors`` or ``.npz``.

    Args:
      path: local file; ``.safetensors`` (``safetensors.torch.save_file``) or ``.npz``
        (``numpy.savez`` of the tensors as arrays).

    Returns:
      Parameter name (``layer1.0.conv1.weight``) -> array.

    Raises:
      FileNotFoundError: if ``path`` does not exist (nothing is downloaded at run time).
      ValueError: if the extension is neither ``.safetensors`` nor ``.npz``.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"Cannot read checkpoint {path!r}: unknown extension {suffix!r}; expected one of "
            f"{_SUFFIXES} holding a PyTorch state_dict (see BUILD.md, 'Pretrained ResNets')."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist. tljax never downloads weights at run time: "
            "write the state_dict to a .safetensors or .npz file once, on a machine with network "
            "access, and point transfer.init_from at it (see BUILD.md, 'Pretrained ResNets')."
        )
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    from safetensors.numpy import load_file  # Only needed for this format.

    return load_file(path)


def load_pretrained_resnet(
    path: str | os.PathLike, params_template: Mapping[str, Any], *, exclude_head: bool
) -> dict[str, Any]:
    """Loads a torchvision ResNet checkpoint into params shaped like ``params_template``.

    Args:
      path: ``.safetensors`` or ``.npz`` file with a torchvision ResNet ``state_dict``.
      params_template: ``params`` of a ``norm='affine'`` ``tljax.models.resnet.ResNet`` (from
        ``model.init(...)['params']``).
      exclude_head: keep ``head`` from the template (e.g. re-initialised for a new number of
        classes) and ignore the checkpoint's ``fc``.

    Returns:
      A new params tree with the template's structure, shapes and dtypes.

    Raises:
      FileNotFoundError, ValueError: see ``load_state_dict`` and ``convert_resnet``.
    """
    exclude = ("head",) if exclude_head else ()
    return convert_resnet(load_state_dict(path), params_template, exclude=exclude)


# ----------------------------------------------------------------------------------------------
# Names: which torchvision module each tljax module comes from.

_STAGE_BLOCK = r"stage(?P<stage>\d+)/block(?P<block>\d+)"
# (tljax module path pattern, torchvision module name, kind of layer)
_MODULE_NAMES: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(pattern), torch_name, kind)
    for pattern, torch_name, kind in (
        (r"stem/conv", "conv1", "conv"),
        (r"stem/norm", "bn1", "norm"),
        (_STAGE_BLOCK + r"/conv(?P<index>\d+)", "layer{stage}.{block}.conv{index}", "conv"),
        (_STAGE_BLOCK + r"/norm(?P<index>\d+)", "layer{stage}.{block}.bn{index}", "norm"),
        (_STAGE_BLOCK + r"/downsample/conv", "layer{stage}.{block}.downsample.0", "conv"),
        (_STAGE_BLOCK + r"/downsample/norm", "layer{stage}.{block}.downsample.1", "norm"),
        (r"head", "fc", "dense"),
    )
)


def _torch_module(module_path: str) -> tuple[str, str]:
    """The torchvision module name and the layer kind of a tljax module path."""
    for pattern, torch_name, kind in _MODULE_NAMES:
        match = pattern.fullmatch(module_path)
        if match:
            return torch_name.format(**match.groupdict()), kind
    raise ValueError(
        f"Template module {module_path!r} has no torchvision ResNet counterpart; "
        "params_template must be the params of a tljax.models.resnet.ResNet."
    )


# ----------------------------------------------------------------------------------------------
# Values: how each kind of layer is converted.


class _Layer:
    """One template module: the torch tensors it needs and how its params are made from them."""

    def __init__(self, module_path: str, template: Mapping[str, Any]):
        self.module_path = module_path
        self.torch_name, self.kind = _torch_module(module_path)
        self.template = template

    def torch_keys(self) -> list[str]:
        """The checkpoint keys this layer reads."""
        fields = {
            "conv": ("weight",),
            "dense": ("weight", "bias"),
            "norm": _BATCH_NORM_FIELDS,
        }[self.kind]
        return [f"{self.torch_name}.{field}" for field in fields]

    def expected_torch_shapes(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """Checkpoint key -> (template leaf, its shape, the PyTorch-layout shape it implies)."""
        prefix = self.torch_name
        if self.kind == "conv":
            kernel = tuple(self.template["kernel"].shape)
            kh, kw, cin, cout = kernel
            return {f"{prefix}.weight": ("kernel", kernel, (cout, cin, kh, kw))}
        if self.kind == "dense":
            kernel, bias = tuple(self.template["kernel"].shape), tuple(self.template["bias"].shape)
            return {
                f"{prefix}.weight": ("kernel", kernel, kernel[::-1]),
                f"{prefix}.bias": ("bias", bias, bias),
            }
        scale = tuple(self.template["scale"].shape)
        return {key: ("{scale,bias}", scale, scale) for key in self.torch_keys()}

    def convert(self, state_dict: StateDict) -> dict[str, np.ndarray]:
        """This layer's params (leaf name -> array in the template's dtype)."""
        tensors = {key.rsplit(".", 1)[1]: np.asarray(state_dict[key]) for key in self.torch_keys()}
        if self.kind == "conv":
            params = {"kernel": tensors["weight"].transpose(2, 3, 1, 0)}
        elif self.kind == "dense":
            params = {"kernel": tensors["weight"].T, "bias": tensors["bias"]}
        else:
            params = _fold_batch_norm(**tensors)
        return {
            name: np.ascontiguousarray(value, dtype=self.template[name].dtype)
            for name, value in params.items()
        }


def _fold_batch_norm(
    weight: np.ndarray, bias: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray
) -> dict[str, np.ndarray]:
    """BatchNorm in eval mode as ``x * scale + bias``, computed in float64 before the cast."""
    scale = weight.astype(np.float64) / np.sqrt(running_var.astype(np.float64) + BATCH_NORM_EPS)
    return {"scale": scale, "bias": bias.astype(np.float64) - running_mean * scale}


# ----------------------------------------------------------------------------------------------
# Conversion.


def convert_resnet(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a torchvision ResNet ``state_dict`` to params shaped like ``params_template``.

    Args:
      state_dict: parameter name -> array, as returned by ``load_state_dict``.
      params_template: ``params`` of a ``norm='affine'`` ``tljax.models.resnet.ResNet``; its
        leaves need ``shape`` and ``dtype`` only (``jax.eval_shape`` output will do) except
        under ``exclude``, whose leaves are returned as they are.
      exclude: module paths (``'head'``, ``'stage4'``, ``'stage4/block1/conv2'``) whose params
        are kept from the template; the checkpoint's tensors for them are not read.

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes.

    Raises:
      ValueError: if the template is not a ResNet's params, or, listing every problem at once,
        if checkpoint keys are missing, keys are left over, or shapes differ from the template.
    """
    if "params" in params_template:
        raise ValueError(
            "params_template has a 'params' key: pass variables['params'], not the variables."
        )
    layers = _template_layers(params_template, exclude)
    loaded = [layer for layer in layers if not _is_excluded(layer.module_path, exclude)]
    _check_checkpoint(state_dict, layers, loaded, exclude)

    flat = traverse_util.flatten_dict(params_template, sep="/")
    for layer in loaded:
        for name, value in layer.convert(state_dict).items():
            flat[f"{layer.module_path}/{name}"] = value
    return traverse_util.unflatten_dict(flat, sep="/")


def _template_layers(params_template: Mapping[str, Any], exclude: Sequence[str]) -> list[_Layer]:
    """The template's modules (paths of the parents of its leaves), in the template's order.

    Excluded modules without a torchvision counterpart (e.g. a domain-adaptation method's
    discriminator beside the ResNet) are left out: nothing is read for them.
    """
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params_template, sep="/").items():
        module_path, _, leaf_name = path.rpartition("/")
        modules.setdefault(module_path, {})[leaf_name] = leaf
    layers = []
    for module_path, leaves in modules.items():
        try:
            layers.append(_Layer(module_path, leaves))
        except ValueError:
            if not _is_excluded(module_path, exclude):
                raise
    return layers


def _is_excluded(module_path: str, exclude: Sequence[str]) -> bool:
    return any(module_path == prefix or module_path.startswith(prefix + "/") for prefix in exclude)


def _check_checkpoint(
    state_dict: StateDict,
    layers: Sequence[_Layer],
    loaded: Sequence[_Layer],
    exclude: Sequence[str],
) -> None:
    """Raises one ValueError describing every missing key, leftover key and wrong shape."""
    known = {key for layer in layers for key in layer.torch_keys()}
    missing = [key for layer in loaded for key in layer.torch_keys() if key not in state_dict]
    unexpected = [
        key for key in state_dict if key not in known and not key.endswith(_IGNORED_SUFFIX)
    ]
    mismatched = [
        f"{layer.module_path}/{leaf}: template {template_shape} needs {key} of shape {expected}, "
        f"checkpoint has {tuple(np.shape(state_dict[key]))}"
        for layer in loaded
        for key, (leaf, template_shape, expected) in layer.expected_torch_shapes().items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != expected
    ]
    problems = _problem_report(missing, unexpected, mismatched)
    if problems:
        raise ValueError(
            "Cannot convert the checkpoint to this ResNet"
            f"{f' (excluding {list(exclude)})' if exclude else ''}:\n{problems}"
        )


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
                f"{len(unexpected)} checkpoint keys have no place in the template (a different "
                "architecture or depth, or a template initialised without its head?)",
                unexpected,
            )
        )
    if mismatched:
        hint = ""
        if any(line.startswith("head/") for line in mismatched):
            hint = (
                " The head differs (a different number of classes?): exclude it so that it is "
                "re-initialised (load_pretrained_resnet(..., exclude_head=True) or "
                "convert_resnet(..., exclude=('head',)))."
            )
        sections.append(_listing(f"{len(mismatched)} shapes differ.{hint}", mismatched))
    return "\n".join(sections)


def _listing(title: str, items: Sequence[str]) -> str:
    return "  " + title + "\n" + "\n".join(f"    {item}" for item in items)
