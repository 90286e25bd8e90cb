"""Train-on-target upper bound for MNIST -> MNIST-M: labelled target data, no adaptation.

  python launch.py --config=configs/target_only.py --workdir=runs/target_only

Takes the same variants as configs/dann.py (data=embedded|full, seed=N).
Reproduces (embedded, 3000 steps, seeds 0-2, docs/results/dann_accuracy.md): target test
accuracy 0.911 ± 0.003 (paper, full MNIST-M: .9596); the upper bound for DANN on the same data.
"""

from configs import dann


def get_config(arg: str | None = None):
    """configs/dann.py trained on the target's labels with the adversarial branch off."""
    config = dann.get_config(arg)
    config.dann.adversarial = False
    config.data.source = config.data.target
    return config
