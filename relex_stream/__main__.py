import os
import sys


def _reopen_closed_standard_streams() -> None:
    """Point closed file descriptors 0-2 at /dev/null, and give Python streams for them.

    With fd 2 closed (`2>&-`) the next file the run opens would take fd 2, and whatever C
    code writes to stderr (libgomp's warnings) would land inside an output file.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


_reopen_closed_standard_streams()

try:  # torch's libraries fail to load, with a FATAL line of their own, from a deleted cwd
    os.getcwd()
except OSError:
    print("error: the current directory no longer exists; cd to one that does and rerun",
          file=sys.stderr)
    sys.exit(2)

from .envvars import gomp_cpu_affinity, import_library, omp_num_threads  # noqa: E402
from .errors import RelexError  # noqa: E402

# OpenMP and tqdm read their variables as torch and tqdm load: OMP_NUM_THREADS malformed is
# warned about and ignored, GOMP_CPU_AFFINITY malformed can hang libgomp, TQDM_* and TORCH_LOGS
# malformed raise. All checked here, before anything imports them.
try:
    omp_num_threads()
    gomp_cpu_affinity()
    import_library("tqdm")
    import_library("torch")  # seconds: a Ctrl-C often lands here
    from .cli import main
except RelexError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt:
    print("error: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
