"""Plain Linen modules: digit networks, ConvNet8, ResNets, progressive columns, GRL.

The convolution and pooling are injected (``conv``, ``pool``); ``make_classifier`` builds the
classifier a config names with the CPU lowerings of ``tljax.ops``.
"""

from tljax.models.classifiers import CLASSIFIERS, make_classifier

__all__ = ["CLASSIFIERS", "make_classifier"]
