"""How the commands report what a user got wrong: one short `error:` line, no traceback.

Every command's entry point runs through `run_command`: errors a user can fix (bad settings, missing or
unsafe files, data that cannot be used) print their message and exit 1; MEMFLOW_TRAIN_TRACEBACK=1 shows
the traceback. Warnings print as one line, `CategoryName: message`, without the source line.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

USER_ERRORS = (FileNotFoundError, KeyError, ValueError, NotImplementedError, FloatingPointError, pickle.UnpicklingError)
HINT = "(MEMFLOW_TRAIN_TRACEBACK=1 shows the traceback)"


_NOISE = ("Given value", "Expected a <class 'NoneType'>", "Subtypes:", "Does not validate against any", "Errors:")


def short_error(text: str) -> list[str]:
    """The lines of a jsonargparse error that say what is wrong (no Union bookkeeping, no config dump).

    A reason given for one key (a value of the wrong type) is prefixed with the key's full path
    (model.init_args.memory.init_args.read_topk: Expected a <class 'int'>, got abc); a reason a class
    gives for its own arguments (its validation error) is kept as it is."""
    out: list[str] = []
    lines = text.splitlines()
    context: list[tuple[int, str]] = []  # enclosing 'Parser key "k"' (the key) and class_path lines ("")
    keyed: dict[str, int] = {}  # key path -> index in out of the reason given for it
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        s = line.strip().removeprefix("- ")
        while context and context[-1][0] >= indent:
            context.pop()
        if key := re.match(r'(?:error: )?Parser key "([^"]+)"', s):
            context.append((indent, key.group(1)))
            continue
        if s.startswith("Problem with given class_path") and i + 1 < len(lines):
            context.append((indent, ""))
            continue  # its reason follows on the next line
        path = ".".join(k if k else "init_args" for _, k in context).removesuffix(".init_args")
        leaf = bool(context) and context[-1][1] != ""
        if leaf and s.startswith("Given value:") and path in keyed:
            value = s.removeprefix("Given value:").strip()
            if len(value) <= 60 and "Got value" not in out[keyed[path]]:
                out[keyed[path]] += f", got {value}"
            continue
        if not s or s.startswith(_NOISE):
            continue
        if leaf and path not in keyed:
            s = f"{path}: {s}"
            keyed[path] = len(out)
        elif leaf:
            continue  # a second reason for the same key (another Union member's)
        if s not in out:
            out.append(s)
    return out or [lines[0] if lines else text]


def message(err: BaseException) -> str:
    """The error's own text (a KeyError's str() is the repr of its argument), jsonargparse's bookkeeping
    dropped."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return "\n  ".join(short_error(text))


def one_line_warning(msg: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"{category.__name__}: {msg}\n"


def run_command(main: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """main(argv) with user errors reported in a few lines (exit 1) and one-line warnings."""
    debug = os.environ.get("MEMFLOW_TRAIN_TRACEBACK") == "1"
    if not debug:
        warnings.formatwarning = one_line_warning
    try:
        return main(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        sys.exit(f"error: {message(err)}\n{HINT}")
