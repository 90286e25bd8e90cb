"""Plain Linen models, and converters of pretrained checkpoints into their params.

Model families: the digit networks (``digits``), ConvNet8 (``convnet``), ResNet-18/34/50
(``resnet``, with ``batch_norm``), ViT-S/16 and B/16 (``vit``), ConvNeXt-T (``convnext``),
VGG-16 (``vgg``), progressive columns (``progressive``) and the gradient reversal layer (``grl``);
``domain`` and ``multitask`` wrap any of the classifiers with domain-adaptation heads or
per-task layers. ``make_classifier`` builds the classifier a config names (`CLASSIFIERS`) with the
CPU lowerings of ``tljax.ops`` (convolution and pooling are injected: ``conv``, ``pool``).

Checkpoints in PyTorch or big_vision layouts become params through ``converters`` (one per
family: ``torch_convert`` for ResNets, ``vit_convert``, ``convnext_convert``, ``vgg_convert``),
each a rule table over ``torch_rules``.
"""

from tljax.models.classifiers import CLASSIFIERS, make_classifier, refuse_statistics_updates

__all__ = ["CLASSIFIERS", "make_classifier", "refuse_statistics_updates"]
