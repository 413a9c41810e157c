"""Strict reading of the environment variables relex_stream looks at.

The environment is input too: `int(os.environ["RANK"])` ends in a traceback on 'abc' and
silently accepts '٣' (Arabic-Indic three) or ' 3'. Here a value is ASCII digits only, bounded,
and a malformed one is a RelexError that names the variable and says what to do.

Every function takes an optional `environ` mapping (default: os.environ) so that tests need
not touch the process environment.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping

from .errors import RelexError

MAX_WORLD_SIZE = 2**20  # far above any torchrun job; keeps ranks well inside C int
MAX_OMP_THREADS = 2**16
TEST_DEVICES = ("cpu", "cuda")
_UINT_RE = re.compile(r"[0-9]{1,12}")  # ASCII only: re's \d and int() take any script's digits
_SIGNED_RE = re.compile(r"[+-][0-9]{1,40}", re.ASCII)
MAX_CPU_INDEX = 65535  # libgomp's own limit on this machine; higher ones it refuses
_CPU_RANGE_RE = re.compile(r"([0-9]{1,12})(?:-([0-9]{1,12})(?::([0-9]{1,12}))?)?")
_CPU_LIST_SEPARATORS = re.compile(r"[ ,\t]+")
# the variables each library parses as it is imported (or as its objects are made)
LIBRARY_PREFIXES = {"tqdm": ("TQDM_",), "torch": ("TORCH_", "PYTORCH_")}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def parse_env_int(name: str, value: str, minimum: int, maximum: int, fix: str) -> int:
    """An environment value as an int in [minimum, maximum]: ASCII digits, nothing else.

    `fix` ends the message: what the user should do instead.
    """
    if not _UINT_RE.fullmatch(value):
        if _SIGNED_RE.fullmatch(value):
            raise RelexError(
                f"environment variable {name}={value[:40]} is outside {minimum}..{maximum}; {fix}"
            )
        raise RelexError(f"environment variable {name}={value[:40]!r} is not a number; {fix}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise RelexError(
            f"environment variable {name}={value} is outside {minimum}..{maximum}; {fix}"
        )
    return number


def read_env_int(
    name: str,
    default: int,
    minimum: int,
    maximum: int,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The variable as a bounded int, or `default` when it is unset or empty."""
    value = _env(environ).get(name, "")
    if value == "":
        return default
    return parse_env_int(name, value, minimum, maximum, f"set it to a whole number, e.g. {default}")


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) under torchrun; None outside it (WORLD_SIZE unset or 1).

    RANK must be set when WORLD_SIZE > 1 (torchrun always sets it); LOCAL_RANK defaults to 0.
    Both must be below WORLD_SIZE.
    """
    env = _env(environ)
    fix = "launch with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK for a single process"
    world_text = env.get("WORLD_SIZE")
    if world_text is None or world_text == "1":
        return None
    world_size = parse_env_int("WORLD_SIZE", world_text, 1, MAX_WORLD_SIZE, fix)
    if world_size == 1:  # e.g. '01'
        return None
    if "RANK" not in env:
        raise RelexError(f"WORLD_SIZE is {world_size} but RANK is not set; {fix}")
    rank = parse_env_int("RANK", env["RANK"], 0, world_size - 1, fix)
    local_rank = parse_env_int("LOCAL_RANK", env.get("LOCAL_RANK", "0"), 0, world_size - 1, fix)
    return rank, world_size, local_rank


def master_address(environ: Mapping[str, str] | None = None,
                   fix: str = "launch with torchrun") -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of a torchrun job, checked: torch's own errors for these are
    tracebacks (and an empty or unknown host made it retry for its two-hour timeout)."""
    env = _env(environ)
    address = env.get("MASTER_ADDR", "")
    if not address or len(address) > 253 or not address.isascii() or not address.isprintable() \
            or any(c.isspace() for c in address):
        raise RelexError(f"MASTER_ADDR must be a host name or address (torchrun sets it), got "
                         f"{address[:60]!r}; {fix}")
    if "MASTER_PORT" not in env:
        raise RelexError(f"MASTER_PORT is not set (torchrun sets it); {fix}")
    port = parse_env_int("MASTER_PORT", env["MASTER_PORT"], 1, 65535, fix)
    return address, port


def message_rank(environ: Mapping[str, str] | None = None) -> int:
    """The rank to prefix error lines with; never raises (0 if the variables are malformed).

    For the CLI's error handler, which must print even the error about a malformed RANK.
    """
    try:
        found = torchrun_env(environ)
    except RelexError:
        return 0
    return 0 if found is None else found[0]


def omp_num_threads_is_set(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the user chose OMP_NUM_THREADS (set and non-empty); its value is not checked."""
    return _env(environ).get("OMP_NUM_THREADS", "") != ""


def omp_num_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """The outermost OMP_NUM_THREADS level as an int, or None when unset or empty.

    OpenMP allows a comma list for nested levels ('8,2'); the first entry is the one torch's
    intra-op pool uses. Each entry must be 1..MAX_OMP_THREADS.
    """
    value = _env(environ).get("OMP_NUM_THREADS", "")
    if value == "":
        return None
    fix = "set it to a thread count such as 8, or unset it"
    levels = [
        parse_env_int("OMP_NUM_THREADS", part, 1, MAX_OMP_THREADS, fix) for part in value.split(",")
    ]
    return levels[0]


def gomp_cpu_affinity(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a GOMP_CPU_AFFINITY that libgomp cannot parse, before torch loads libgomp.

    libgomp hangs for ever on some malformed lists ('abc', '0:2', '1 abc') and exits the
    process on others ('1-0', '0-1:0'); a list is CPU numbers, ranges N-M and strided ranges
    N-M:S, separated by spaces or commas.
    """
    value = _env(environ).get("GOMP_CPU_AFFINITY", "")
    fix = "set it to a CPU list such as '0-7' or '0 2 4-6', or unset it"
    for item in _CPU_LIST_SEPARATORS.split(value.strip(" ,\t")):
        if item == "":
            continue
        found = _CPU_RANGE_RE.fullmatch(item)
        if found is None:
            raise RelexError(
                f"environment variable GOMP_CPU_AFFINITY={value[:60]!r} is not a CPU list "
                f"({item[:20]!r} is not a number or range; libgomp would hang on it); {fix}"
            )
        first = int(found[1])
        last = first if found[2] is None else int(found[2])
        stride = 1 if found[3] is None else int(found[3])
        if not first <= last <= MAX_CPU_INDEX or stride < 1:
            raise RelexError(
                f"environment variable GOMP_CPU_AFFINITY={value[:60]!r} has the range {item!r}: "
                f"CPUs must rise, stay at most {MAX_CPU_INDEX}, and a stride must be at least 1; "
                f"{fix}"
            )


def set_library_variables(module: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The names of the set environment variables that `module` reads itself, sorted."""
    prefixes = LIBRARY_PREFIXES[module]
    return sorted(name for name in _env(environ) if name.startswith(prefixes))


def import_library(module: str) -> None:
    """Import tqdm or torch, turning a failure caused by their own variables into a RelexError.

    Both parse their variables as they load (TQDM_NCOLS=x, TORCH_LOGS=zzz): a traceback even
    for --help. A failure with none of their variables set is a bug and propagates.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:
        blamed = library_variable_error(module, f"{module} failed to load", exc)
        if blamed is None:
            raise
        raise blamed from exc


def library_variable_error(module: str, failed: str, exc: Exception,
                           fix: str = "fix or unset them") -> RelexError | None:
    """The user error for `exc` raised inside tqdm or torch when some of `module`'s own
    variables are set (they are the likely cause); None when none is set (then it is a bug)."""
    names = set_library_variables(module)
    if not names:
        return None
    first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
    return RelexError(f"{failed} ({type(exc).__name__}: {first_line[:120]}) with environment "
                      f"variable(s) {', '.join(names)} set; {fix}")


def relex_test_device(environ: Mapping[str, str] | None = None) -> str:
    """RELEX_TEST_DEVICE for the test suite: 'cpu' (default, also when empty) or 'cuda'."""
    value = _env(environ).get("RELEX_TEST_DEVICE", "")
    if value == "":
        return "cpu"
    if value not in TEST_DEVICES:
        raise RelexError(
            f"environment variable RELEX_TEST_DEVICE={value[:40]!r} must be 'cpu' or 'cuda' "
            "(unset means cpu)"
        )
    return value
