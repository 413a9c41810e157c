"""relex_stream: RELEX rank-1 trajectory extrapolation of LLM checkpoints, streaming."""

from .errors import RelexError

__all__ = ["RelexError", "RunSummary", "extrapolate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine (and torch) load on first use, so that the CLI can check the environment
    # (OMP_NUM_THREADS is read by torch's OpenMP runtime as it loads) before torch is imported.
    if name in ("RunSummary", "extrapolate"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
