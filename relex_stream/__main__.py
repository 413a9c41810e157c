import sys

from .envvars import omp_num_threads
from .errors import RelexError

# OMP_NUM_THREADS is read by torch's OpenMP runtime as torch loads (it warns and goes on when
# the value is malformed): checked here, before anything imports torch.
try:
    omp_num_threads()
except RelexError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)

from .cli import main  # noqa: E402

sys.exit(main())
