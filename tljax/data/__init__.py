"""tensorflow-datasets layer of tljax: builders for MNIST-M and an offline MNIST / MNIST-M pair.

Using ``load_split`` (or importing ``tljax.data.loading``) registers the tfds builders
``mnist_m`` and ``embedded_digits`` (configs ``mnist`` and ``mnist_m``). TensorFlow is imported
only then, so the models, train step and input pipeline also run where it is not installed
(``benchmarks/speed_dann.py --synthetic`` on an accelerator image without TensorFlow).
"""

import importlib

__all__ = ["DatasetUnavailableError", "blend_mnist_m", "load_split"]

_PROVIDERS = {
    "DatasetUnavailableError": "tljax.data.loading",
    "load_split": "tljax.data.loading",
    "blend_mnist_m": "tljax.data.mnist_m",
}


def __getattr__(name: str):
    if name in _PROVIDERS:
        return getattr(importlib.import_module(_PROVIDERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
