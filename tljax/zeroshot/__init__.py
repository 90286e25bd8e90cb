"""Zero-shot learning building blocks: class descriptions, data sources and scoring rules.

* `attributes`: the seven-segment-style attribute table of the digits 0-9 and seeded
  seen / unseen class splits.
* `proposed_split`: AwA2 / CUB / SUN in the "proposed split" feature format of Xian et al.
  (per-image ResNet-101 features and class attributes in two .mat files).
* `scoring`: DAP, attribute-embedding, ConSE and ESZSL scores, and the ZSL / GZSL metrics.

The method that trains the models and reports the metrics is `tljax.methods.zeroshot`.
"""
