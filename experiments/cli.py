"""What every entrypoint shares: user errors as one line, ``--debug``, the multi-host flags.

A user error (a flag that does not parse, a misspelt ``--config`` field, an unknown
dataset path, target, model or experiment, a run directory that holds another config, a
folder that exists) prints ``<command>: error: <message>`` on ONE line to stderr and
exits with status 2; ``--debug`` shows the traceback instead. :func:`run` replaces
``app.run`` for that. A user error is what the library raises for bad input
(``ValueError``, by its contract, and the ``OSError`` kinds of a path that is not
there or is in the way) and ``app.UsageError``; anything else is a bug and keeps its
traceback.

The multi-host flags (``--distributed``, ``--coordinator_address``, ``--num_processes``,
``--process_id``) are defined here and passed to
:func:`gllora.parallel.maybe_initialize_distributed`: the library takes arguments, the
command line is the entrypoints'.

This module imports absl only, so ``--help`` answers before JAX is imported: entrypoints
import the library inside ``main``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS

#: What a user can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    app.UsageError,
    flags.Error,
)
#: Values of ``--distributed`` (as :data:`gllora.parallel.DISTRIBUTED_MODES`, which
#: this module does not import: it would start JAX before ``--help``).
DISTRIBUTED_MODES = ("auto", "on", "off")


def define_debug_flag(fv: flags.FlagValues = FLAGS) -> None:
    """Defines ``--debug`` on ``fv`` once."""
    if "debug" not in fv:
        flags.DEFINE_bool(
            "debug",
            False,
            "Show the traceback of an error instead of its one-line message.",
            flag_values=fv,
        )


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    Errors that wrap another as their only argument (ml_collections' ``AttributeError``
    around a ``KeyError`` around the text) give the innermost text, unquoted.
    """
    while len(error.args) == 1 and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    if isinstance(error, KeyError) and len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1]  # KeyError's str() is the repr of its key
    text = text.replace("\\'", "'")
    return re.sub(r"\s*\n\s*", "; ", text.strip()) or type(error).__name__


def _flag_message(error: BaseException, argv: Sequence[str]) -> str:
    """A flag-parsing error as a user reads it."""
    message = one_line(error)
    if isinstance(error, AttributeError):  # a --config.field that the config lacks
        field = re.match(r"'?([\w.]+)'?", message)
        bad = [a.split("=")[0] for a in argv if field and a.split("=")[0].endswith(field[1])]
        where = bad[0] if bad else "--config"
        hint = message.split(";", 1)[1].strip() if ";" in message else ""
        return f"{where}: the config has no such field" + (f" ({hint})" if hint else "")
    return message.removeprefix("FATAL Flags parsing error: ")


def fail(command: str, message: str) -> None:
    """Prints ``<command>: error: <message>`` on one line to stderr and exits with 2."""
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def command_name() -> str:
    """The short name of the running entrypoint (``train`` for ``-m experiments.train``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return name.rsplit(".", 1)[-1]


def run(
    main: Callable[[list[str]], Any], command: str | None = None, positional: bool = False
) -> None:
    """``app.run(main)`` with user errors as one line and exit status 2 (see above).

    Args:
      main: the absl ``main(argv)``; its return value is the exit status.
      command: the name in messages (default :func:`command_name`).
      positional: whether the command takes positional arguments (else any is an error).
    """
    define_debug_flag()
    command = command or command_name()
    # Flags defined here and in data_gen.cli belong to the command: list them in --help.
    for module in (__name__, "data_gen.cli"):
        for flag in FLAGS.get_flags_for_module(module):
            FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except Exception as e:  # a flag that does not parse is the user's error
            if "--debug" in argv:
                raise
            fail(command, _flag_message(e, argv))

    def checked(argv: list[str]) -> Any:
        try:
            if len(argv) > 1 and not positional:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
            return main(argv)
        except USER_ERRORS as e:
            if FLAGS.debug:
                raise
            fail(command, one_line(e))

    app.run(checked, flags_parser=parse)


def entrypoints() -> list[str]:
    """Every command of the project: the modules of ``experiments/`` and ``data_gen/`` (top
    level) that run as ``python -m`` (they have a ``__main__`` block), sorted."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    for package in ("experiments", "data_gen"):
        for name in sorted(os.listdir(os.path.join(root, package))):
            if not name.endswith(".py") or name.startswith("_"):
                continue
            with open(os.path.join(root, package, name)) as f:
                if re.search(r"^if __name__ == .__main__.:", f.read(), re.MULTILINE):
                    out.append(f"{package}.{name[:-3]}")
    return out


def check_choices(flag: str, given: Sequence[str], known: Sequence[str]) -> None:
    """Raises ``app.UsageError`` naming ``--flag`` and the known values if any of
    ``given`` is not one of ``known``."""
    unknown = [g for g in given if g not in known]
    if unknown:
        raise app.UsageError(
            f"--{flag}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )


# -- several hosts ---------------------------------------------------------------------


def define_distributed_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines ``--distributed``, ``--coordinator_address``, ``--num_processes`` and
    ``--process_id`` on ``fv`` (once; safe to call from several modules)."""
    if "distributed" in fv:
        return
    flags.DEFINE_enum(
        "distributed",
        "auto",
        list(DISTRIBUTED_MODES),
        "Start jax.distributed: 'auto' under SLURM (several tasks), on a multi-host TPU "
        "slice or when a coordinator is given; 'on' always; 'off' never.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (or $JAX_NUM_PROCESSES).", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (or $JAX_PROCESS_ID).", flag_values=fv
    )


def initialize_distributed(fv: flags.FlagValues = FLAGS) -> bool:
    """:func:`gllora.parallel.maybe_initialize_distributed` with the flags of
    :func:`define_distributed_flags`; call it first in ``main``, before any device is used.

    Returns:
      Whether ``jax.distributed`` is initialised.
    """
    from gllora import parallel

    try:
        return parallel.maybe_initialize_distributed(
            fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id
        )
    except ValueError as e:
        raise app.UsageError(
            f"--distributed={fv.distributed}: {one_line(e)} (the flags --coordinator_address, "
            "--num_processes and --process_id)"
        ) from e
