"""Helpers for `get_config(arg)` config files."""

import ast

from tljax.validate import ConfigError


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parses a config variant string 'k1=v1,k2=v2' against typed defaults.

    `--config=configs/dann.py:data=full,seed=3` reaches `get_config` as
    'data=full,seed=3'. Values are coerced to the type of their default.

    Args:
      arg: the string after ':' in --config (may be None or empty).
      **defaults: every accepted key with its default value.

    Returns:
      Dict of all keys with defaults overridden by `arg`.

    Raises:
      tljax.validate.ConfigError: (a ValueError) for a malformed item, a key that has no
        default, or a value that is not of its default's type; the message names the item.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"Config variant item {item!r} is not of the form key=value.")
        if key not in defaults:
            raise ConfigError(f"Unknown config variant key {key!r}; accepted: {sorted(defaults)}.")
        values[key] = _coerce(raw, defaults[key], key)
    return values


def _coerce(raw: str, default, key: str):
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"Config variant {key}={raw!r} is not a boolean.")
        return raw.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            kind = "an int" if isinstance(default, int) else "a number"
            raise ConfigError(f"Config variant {key}={raw!r} is not {kind}.") from None
    if isinstance(default, str) or default is None:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"Config variant {key}={raw!r} is not a Python literal like its default {default!r}."
        ) from None
