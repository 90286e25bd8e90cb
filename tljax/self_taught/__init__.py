"""Self-taught learning (Raina et al. 2007) and self-taught clustering (Dai et al. 2008).

* `patches`: natural image patches cut from the photographs shipped in scikit-learn /
  scikit-image, and their ZCA whitening.
* `autoencoder`: the sparse autoencoder learned on those patches, and the convolve-and-pool
  features it gives a digit image.
* `clustering`: k-means (as gradient descent), NMI and clustering accuracy.
* `filters`: a PNG grid of the learned bases.

The method that trains each stage through the trainer is `tljax.methods.self_taught`.
"""
