"""Train-on-target upper bound for MNIST -> MNIST-M: labelled target data, no adaptation.

  python launch.py --config=configs/target_only.py --workdir=runs/target_only

Takes the same variants as configs/dann.py (data=embedded|full, seed=N).
Expected: the paper's .9596 on full MNIST-M; the upper bound for DANN on the same data.
"""

from configs import dann


def get_config(arg: str | None = None):
    """configs/dann.py trained on the target's labels with the adversarial branch off."""
    config = dann.get_config(arg)
    config.dann.adversarial = False
    config.data.source = config.data.target
    return config
