"""What the command-line entry points share: user errors as one line, flags and config files
parsed the same way, quiet library logs.

An entry point starts with `cli.run(main)` and runs its work inside `one_line_errors()`: a
`UserError` (errors.py) is printed as one line `error: ...` on stderr and becomes exit status
1, without a traceback. `run` parses the flags with `parse_flags`, so a bad flag value, a
config file that cannot be loaded and an override of a field that does not exist
(`--config.mta.top_kk=1`) end the same way, naming the flag and the nearest existing field.
"""
import contextlib
import difflib
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Optional

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from mta_jax.errors import ConfigError, UserError


class UserExit(SystemExit):
    """Raised by `one_line_errors` after printing a user error (exit status 1)."""


def one_line(message: str) -> str:
    """`message` on one line: its lines joined with '; ' (library messages may span several)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        raise UserExit(1) from None


def run(main: Callable[[list[str]], int]) -> None:
    """absl's app.run(main) with `parse_flags`; main's return value is the exit status."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses `argv` into `flag_values` (absl's flags_parser); returns the arguments left.

    Each config-file flag's file is loaded (a file that cannot be, fails here, not at first
    use), after its folder's parent is put on sys.path: `configs/*.py` import
    `configs.default`, which then works from any working directory. Any mistake is one line
    `error: ...` and exit status 1.
    """
    names = [n for n in flag_values
             if isinstance(flag_values[n].parser, config_flags.ConfigFileFlagParser)]
    files = {n: _flag_argument(argv, n) for n in names}
    for value in files.values():
        if value:
            _make_importable(value.split(":", 1)[0])
    with one_line_errors():
        try:
            rest = flag_values(argv)
            for name in names:
                value = flag_values[name].value
                if value is not None:
                    getattr(value, "keys")  # a config that failed to load raises here
        except Exception as e:  # noqa: BLE001 -- every parsing failure is a user's mistake
            raise _explain(e, argv, files) from None
    return rest


def _flag_argument(argv: list[str], name: str) -> Optional[str]:
    """The value given to --name (`--name=v` or `--name v`), the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{re.escape(name)}=.*", arg):
            value = arg.split("=", 1)[1]
        elif re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _make_importable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(folder)
    if os.path.isfile(os.path.join(folder, "__init__.py")) and root not in sys.path:
        sys.path.insert(0, root)


def _explain(error: Exception, argv: list[str], files: dict[str, Optional[str]]) -> UserError:
    """The user's mistake behind a flag-parsing failure, as a UserError naming the flag."""
    for name, value in files.items():
        if value is None:
            continue
        config = load_config_file(name, value)
        for override in _overrides(argv, name):
            _check_field(config, name, override)
    if isinstance(error, UserError):
        return error
    return UserError(str(error))


def load_config_file(name: str, value: str) -> Any:
    """The config `--name=value` names (value: 'path.py' or 'path.py:argument')."""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError(f"--{name}={value}: no such file {os.path.abspath(path)} "
                          "(a config file, e.g. configs/demo.py)")
    try:
        config = config_flags.ConfigFileFlagParser(name, lock_config=False).parse(value)
        getattr(config, "keys")
    except Exception as e:  # noqa: BLE001 -- the user's config file raised
        cause = e.__cause__ or e.__context__ or e
        raise ConfigError(f"--{name}={value}: loading {path} failed: "
                          f"{type(cause).__name__}: {one_line(str(cause))}") from None
    return config


def _overrides(argv: list[str], name: str) -> list[str]:
    """The field paths overridden on the command line: --config.a.b=1 -> 'a.b'."""
    paths = []
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if match:
            paths.append(match.group(1))
    return paths


def _check_field(config: Any, name: str, path: str) -> None:
    """Raises ConfigError when `path` ('mta.top_kk') is not a field of `config`."""
    node, walked = config, name
    for part in path.split("."):
        if not isinstance(node, (config_dict.ConfigDict, dict)):
            raise ConfigError(f"--{name}.{path}: {walked} is {node!r}, which has no fields")
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.5)
            hint = f"; did you mean {walked}.{close[0]}?" if close else (
                f"; its fields: {', '.join(sorted(node.keys()))}")
            raise ConfigError(f"--{name}.{path}: {walked} has no field {part!r}{hint}")
        node, walked = node[part], f"{walked}.{part}"


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the rest."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        # Saves without metrics are expected: only evaluated steps compete for "best".
        return record.levelno >= std_logging.WARNING and "did not provide metrics" not in str(record.msg)


def add_libtpu_flags(extra) -> None:
    """Appends `extra` to LIBTPU_INIT_ARGS (read once, when libtpu loads: call before JAX
    touches a TPU), keeping what the user set; a flag the user already names is left alone."""
    current = os.environ.get("LIBTPU_INIT_ARGS", "")
    named = {a.split("=")[0] for a in current.split()}
    new = [f for f in extra if f.split("=")[0] not in named]
    if new:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([current, *new]).strip()


def quiet_libraries() -> None:
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
    for name in ("gcsfs", "fsspec"):  # they log every gs:// read cache they open at INFO
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
