"""`python -m relex_stream` with the store's row and base chunks neither encoded nor written.

For bench/store_cost.py only: the store this leaves behind is unusable (its shards are empty),
so point --out at a scratch directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relex_stream import store  # noqa: E402
from relex_stream.cli import main  # noqa: E402


def _skip_shard(self, row, name, start, raw, previous, base=None) -> int:  # noqa: ANN001
    """Mark the chunks as written (so the shard can be finished) without encoding them."""
    shard = self._shards[row]
    for j in self.group.chunk_range(name, start, start + raw.shape[0]):
        shard.index.offsets[j] = 0
    return 0


store.GroupWriter._write_shard = _skip_shard

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
