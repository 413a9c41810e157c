"""Rank 0's bars add up every rank's bytes through the shared progress board."""

from __future__ import annotations

from pathlib import Path

from relex_stream.progress import Progress


def test_rank0_shows_the_sum_of_all_ranks(tmp_path: Path) -> None:
    totals = {"gram": 1000, "materialise": 1000}
    board = tmp_path / "board"
    rank0 = Progress(totals, show=False, board=board, rank=0, interval_s=0.0)
    rank1 = Progress(totals, show=False, board=board, rank=1, interval_s=0.0)
    rank1.add("gram", 300)
    rank1.add("materialise", 100)
    rank0.add("gram", 200)
    assert rank0.shown["gram"] == 500
    assert rank0.shown["materialise"] == 100
    rank1.close()
    rank0.close()
    rank0.remove_board()
    assert not board.exists()


def test_single_process_counts_its_own_bytes() -> None:
    progress = Progress({"gram": 10, "materialise": 10}, show=False)
    progress.add("gram", 4)
    progress.add("materialise", 6)
    assert progress.shown == {"gram": 4, "materialise": 6}
    progress.close()
