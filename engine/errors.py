"""The errors a user can fix, in one place. Entry points print them as one line and exit 2 (engine/cli.py);
anything else is a bug and keeps its traceback."""


class DMDError(RuntimeError):
    """An error the user can fix (bad data, missing file, bad setting); printed as one line, no traceback."""


class ConfigError(DMDError, ValueError):
    """A config file or --set override that does not fit the schema (engine/config.py)."""


class PairsError(DMDError):
    """A pairs folder that is missing, incomplete, corrupt or made for another teacher or config."""


def root_cause(e: BaseException) -> BaseException:
    """The innermost error behind `e`: dynamo and other wrappers re-raise the real failure with a first line
    that says little, so one-line reports name the root instead."""
    root = e
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    return root
