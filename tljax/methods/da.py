"""Domain adaptation as a list of terms from config: ``da.terms='cdan:1,bsp:0.0001'``.

Every term module of this package (a module with ``term(config) -> adaptation.Term`` and a
``DEFAULTS`` dict of its settings, read from the config block of its name) can be listed with
its weight; the run's loss is the source cross-entropy plus each weighted term
(`tljax.methods.adaptation`). An empty list trains on the source alone. ``configs/da.py`` names
the catalogue's recipes (``method=cdan_e``, ``method=dann_mcc``, ...) as term lists.
"""

import functools
import importlib
import pkgutil
from types import ModuleType

import ml_collections

from tljax import methods, validate
from tljax.methods import Method, adaptation


@functools.cache
def term_modules() -> dict[str, ModuleType]:
    """Every term module of `tljax.methods`, by name.

    Returns:
      name -> module with ``term`` and ``DEFAULTS``.
    """
    found = {}
    for info in pkgutil.iter_modules(methods.__path__):
        module = importlib.import_module(f"{methods.__name__}.{info.name}")
        if callable(getattr(module, "term", None)):
            found[info.name] = module
    return found


def parse_terms(spec: str) -> list[tuple[str, float]]:
    """Reads a term list such as ``'dann:1,mcc:0.5'`` ('' or 'none': no terms).

    Args:
      spec: comma-separated ``name:weight`` (``name`` alone means weight 1).

    Returns:
      (term name, weight) pairs in the given order.

    Raises:
      tljax.validate.ConfigError: an unknown term, a weight that is not a number, or a term
        listed twice.
    """
    known = term_modules()
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "none":
            continue
        name, _, weight = item.partition(":")
        if name not in known:
            raise validate.ConfigError(
                f"da.terms={spec!r}: unknown term {name!r}; expected names from "
                f"{', '.join(sorted(known))}, each with an optional ':weight'."
            )
        try:
            pairs.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise validate.ConfigError(
                f"da.terms={spec!r}: the weight of {name!r} must be a number, got {weight!r}."
            ) from None
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise validate.ConfigError(f"da.terms={spec!r} lists a term twice.")
    return pairs


def term_settings() -> dict[str, ml_collections.ConfigDict]:
    """The config block of every term, holding its defaults (for configs/da.py).

    Returns:
      term name -> ConfigDict of its ``DEFAULTS``.
    """
    return {name: ml_collections.ConfigDict(m.DEFAULTS) for name, m in term_modules().items()}


def build(config: ml_collections.ConfigDict) -> Method:
    """The domain-adaptation method of ``config.da.terms``.

    Args:
      config: experiment config with `data`, `model`, `train`, `eval`, `da` (terms,
        grl_gamma, discriminator_widths, auxiliary_widths) and one block per listed term.

    Returns:
      The `Method`.
    """
    modules = term_modules()
    terms = [(modules[name].term(config), weight) for name, weight in parse_terms(config.da.terms)]
    return adaptation.build(
        config,
        terms,
        grl_gamma=config.da.grl_gamma,
        discriminator_widths=tuple(config.da.discriminator_widths),
        auxiliary_widths=tuple(config.da.auxiliary_widths),
    )


def method_settings(name: str) -> dict:
    """The ``DEFAULTS`` of the domain-adaptation method module ``name`` (e.g. SHOT).

    Args:
      name: a module of `tljax.methods` with a ``DEFAULTS`` dict.

    Returns:
      A copy of its defaults.
    """
    return dict(importlib.import_module(f"{methods.__name__}.{name}").DEFAULTS)
