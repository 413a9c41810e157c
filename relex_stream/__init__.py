"""relex_stream: RELEX rank-1 trajectory extrapolation of LLM checkpoints, streaming."""

from .engine import RunSummary, extrapolate
from .errors import RelexError

__all__ = ["RelexError", "RunSummary", "extrapolate"]
__version__ = "0.1.0"
