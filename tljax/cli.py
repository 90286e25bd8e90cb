"""Command-line front ends: bad input as one line and a non-zero exit, not a traceback.

``launch.py`` and ``python -m tljax.report`` run ``app.run(exit_cleanly(main),
flags_parser=flags_parser("config"))``. Mistakes in the command line or the input then end
with one ``Error: ...`` line on stderr and exit status `EXIT_BAD_INPUT`, before anything is
imported or written:

* a ``--config`` file that does not exist (checked before the config is loaded);
* a config variant the config file rejects (``--config=configs/dann.py:seed=abc``);
* an override of a field the config does not have (``--config.train.stesp=2``), with the
  closest field names;
* every `tljax.validate.InputError` raised by ``main`` (config values, data, files).

Anything else (e.g. an exception from a bug in a config file) keeps its traceback. This module
imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from absl import flags, logging

from tljax import stopping, validate

# 2, as for other command-line usage errors (argparse, absl's UsageError uses 1 for all).
EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
    """Prints ``Error: message`` to stderr and exits with `EXIT_BAD_INPUT`.

    Args:
      message: what is wrong and what was expected.
    """
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def exit_cleanly(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """``main`` with bad input and deliberate stops ending in one line and their exit status.

    A `tljax.validate.InputError` becomes `fail` (status `EXIT_BAD_INPUT`); a
    `tljax.stopping.RunStoppedError` (preempted, collapsed; its checkpoint and results already
    saved) is logged as one line and exits with its ``exit_code``. Neither is a crash, so
    neither prints a traceback.

    Args:
      main: an ``absl.app`` main function.

    Returns:
      The wrapped main.
    """

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except validate.InputError as error:
            fail(str(error))
        except stopping.RunStoppedError as stop:
            log = logging.warning if isinstance(stop, stopping.PreemptedError) else logging.error
            log("%s", stop)
            sys.exit(stop.exit_code)

    return wrapped


def flags_parser(config_flag: str = "config") -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run`` that reports config mistakes in one line.

    Args:
      config_flag: the name of the ``config_flags.DEFINE_config_file`` flag.

    Returns:
      argv -> the arguments left after flag parsing, as absl's own parser returns them.
    """

    def parse(argv: list[str]) -> list[str]:
        spec = flag_value(argv, config_flag)
        if spec is not None:
            check_config_file(spec, config_flag)
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            message = _flag_error_message(error, config_flag)
            if message is None:
                _absl_flag_failure(error)
            fail(message)
        except (AttributeError, KeyError):
            # ml_collections raises these, unwrapped, for an override of an unknown field.
            message = unknown_override(argv, spec, config_flag)
            if message is None:
                raise
            fail(message)

    return parse


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in argv (the last one), if given.

    Args:
      argv: the command line, program name first.
      name: the flag's name.

    Returns:
      The value, or None.
    """
    value = None
    args = list(argv[1:])
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
    return value


def check_config_file(spec: str, config_flag: str = "config") -> None:
    """Fails at once if the file of a ``--config=FILE[:VARIANT]`` value does not exist.

    ml_collections defers that error until the config is first read, which for launch.py is
    after JAX and TensorFlow have loaded and the workdir has been created.

    Args:
      spec: the flag's value.
      config_flag: the flag's name (for the message).
    """
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        fail(f"--{config_flag}={spec}: config file {path!r} does not exist{where}.")


def _flag_error_message(error: flags.Error, config_flag: str) -> str | None:
    """One line for a flag error (the config's own ValueError when it rejected a variant), or
    None for an error that carries a traceback worth showing."""
    text = str(error)
    if text.startswith(f"flag --{config_flag}=") and "Error whilst parsing config file" in text:
        innermost = _innermost(error)
        if not isinstance(innermost, ValueError):
            return None  # Another exception in get_config is a bug in the config file.
        spec = text[len(f"flag --{config_flag}=") :].split(": Error whilst parsing", 1)[0]
        return f"--{config_flag}={spec}: {innermost}"
    return text if "\n" not in text else None


def _absl_flag_failure(error: flags.Error) -> NoReturn:
    # What absl.app prints for flag errors: here the config file's traceback, indented.
    indented = "\n".join("  " + line for line in str(error).splitlines())
    sys.stderr.write(f"FATAL Flags parsing error:\n{indented}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def _innermost(error: BaseException) -> BaseException:
    # absl re-raises ml_collections' re-raise of get_config's exception, each inside the
    # previous one's handler, so the config's own error ends the chain; one raised `from None`
    # (e.g. parse_arg's, over int()'s) is where its author meant the story to start.
    while True:
        inner = error.__cause__
        if inner is None and not error.__suppress_context__:
            inner = error.__context__
        if inner is None:
            return error
        error = inner


def unknown_override(argv: Sequence[str], spec: str | None, config_flag: str) -> str | None:
    """The message for the first ``--config.a.b=...`` override naming a field that is absent.

    Args:
      argv: the command line.
      spec: the ``--config`` value (file and variant).
      config_flag: the config flag's name.

    Returns:
      One line naming the override, the missing field and close matches; None if every
      override names an existing field (the error came from elsewhere).
    """
    if spec is None:
        return None
    config = flags.FLAGS[config_flag].parser.parse(spec)
    prefix = f"--{config_flag}."
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix) :].split("=", 1)[0]
        problem = _missing_field(config, path)
        if problem is not None:
            return f"Unknown config field {prefix}{path}: {problem}"
    return None


def _missing_field(config, path: str) -> str | None:
    node = config
    parts = path.split(".")
    for depth, raw in enumerate(parts):
        name = re.sub(r"\[.*\]$", "", raw)  # list[0] addresses an element of field `list`.
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return None  # Inside a value (e.g. a tuple); ml_collections judges the rest.
        if name not in node:
            parent = ".".join(parts[:depth]) or "the config"
            return validate.with_suggestion(f"{parent} has no field {name!r}", name, node.keys())
        node = node[name]
    return None
