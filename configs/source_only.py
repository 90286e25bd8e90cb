"""Source-only baseline for MNIST -> MNIST-M: DANN's network without the domain branch.

  python launch.py --config=configs/source_only.py --workdir=runs/source_only

Takes the same variants as configs/dann.py (data=embedded|full, seed=N).
Reproduces (embedded, 3000 steps, seeds 0-2, docs/results/dann_accuracy.md): target test
accuracy 0.478 ± 0.017 (paper, full data: .5225).
"""

from configs import dann


def get_config(arg: str | None = None):
    """configs/dann.py with dann.adversarial=False."""
    config = dann.get_config(arg)
    config.dann.adversarial = False
    return config
