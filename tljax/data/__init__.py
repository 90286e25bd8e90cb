"""tensorflow-datasets layer of tljax: builders for MNIST-M and an offline MNIST / MNIST-M pair.

Importing this package registers the tfds builders ``mnist_m`` and ``embedded_digits``
(configs ``mnist`` and ``mnist_m``).
"""

from tljax.data.loading import DatasetUnavailableError, load_split
from tljax.data.mnist_m import blend_mnist_m

__all__ = ["DatasetUnavailableError", "blend_mnist_m", "load_split"]
