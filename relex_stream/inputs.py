"""What a run reads and what the store must gain: sources and store, checked together.

A run reads the observed steps it chose (after --steps and --window) from the store where the
store has them and from the checkpoints otherwise. Checkpoints after the store's last step are
appended to it; a checkpoint before that step that the store lacks is an error (a store's rows
are appended in step order). Without a store (or with --rebuild) the chosen steps build a new
one. Nothing is written here: the decision is made, and every mistake found, first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoints import ModelLayout, config_of, select_steps
from .errors import RelexError
from .jsonfile import show
from .sources import Sources, find_checkpoints, open_sources
from .store import TrajectoryStore, is_replaceable
from .store_layout import MAX_GENERATION, AuxFile, Generation, transforms_for
from .tensor_files import widest
from .units import StepSelection

log = logging.getLogger("relex_stream")


@dataclass(frozen=True)
class RunInputs:
    """The decision: which generation the run reads, which of its rows are new, and how."""

    sources: Sources | None
    store_path: Path
    store_state: str  # 'absent', 'empty', 'store' or 'old' (an earlier format, for --rebuild)
    kind: str | None  # None (read only), 'build' (a new generation) or 'append'
    target: Generation  # what the store holds once the run has written it
    committed_steps: tuple[int, ...]  # steps the store holds now (of target's generation)
    observed: list[int]  # steps the outputs use
    row_ids: list[int]  # their rows in `target`
    # the model's small files: from the base for a new generation (which keeps them), else
    # from the store (checked against its digests before the run writes anything)
    aux: dict[str, bytes] | None

    @property
    def first_new_row(self) -> int:
        """Rows from here on are read from the checkpoints and appended."""
        return len(self.committed_steps) if self.kind == "append" else (
            0 if self.kind == "build" else len(self.target.steps))

    @property
    def new_steps(self) -> list[int]:
        return list(self.target.steps[self.first_new_row :])


def tied_aliases(layout: ModelLayout, config: dict) -> dict[str, str]:
    """{'lm_head.weight': 'model.embed_tokens.weight'} when the config ties them, else {}."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise RelexError("the base's config.json has a tie_word_embeddings that is not true/false")
    if tie and head in layout.tensors and layout.tensors.get(embed) == layout.tensors[head]:
        return {head: embed}
    return {}


def gather_inputs(
    store_path: Path,
    base: Path | None,
    runs: Path | None,
    ckpts: tuple[str, ...] | None,
    steps: StepSelection | None,
    window: int | None,
    rebuild: bool,
    codec: str,
) -> RunInputs:
    """Open (headers only) and check sources and store, and decide what the run writes."""
    state = TrajectoryStore.probe(store_path)
    current = pending = stored_aux = None
    if state == "store":
        try:
            with TrajectoryStore.open(store_path) as store:
                current, pending = store.manifest.current, store.manifest.pending
                if current is not None and not rebuild:
                    # what a run takes from the store besides rows is checked before it
                    # writes anything: every group's record and Gram matrices, the model's files
                    for group in store.groups():
                        store.record(group)
                        if group.has_rows:
                            store.grams(group)
                    stored_aux = store.aux_files()
        except RelexError:
            if not (rebuild and base is not None and is_replaceable(store_path)):
                raise
            state = "old"  # an earlier format, or damaged: --rebuild builds it anew
    if base is None and (runs is not None or ckpts):
        if current is None or rebuild:
            raise RelexError(
                "--runs/--ckpt need --base, the checkpoint the run started from (only a store "
                "that exists can take new checkpoints without it)"
            )
        found = find_checkpoints(runs, list(ckpts) if ckpts else None)
        # no window here: the store takes every new checkpoint (_append), the window only
        # picks the steps the outputs use
        sources = open_sources(None, found, steps, None, also=list(current.steps),
                               stored=current.layout, stored_aliases=current.aliases)
        return _append(sources, store_path, state, current, steps, window, current.layout,
                       stored_aux)
    if base is None:
        if rebuild:
            raise RelexError("--rebuild needs the sources (--base and --runs/--ckpt)")
        if current is None:
            raise RelexError(
                f"no finished store at {store_path}; give --base and --runs (or --ckpt) to "
                "build one" + (" (a run building it was interrupted)" if state == "store" else "")
            )
        observed = select_steps(list(current.steps), steps, window)
        return RunInputs(None, store_path, state, None, current, current.steps, observed,
                         [current.steps.index(s) for s in observed], stored_aux)
    found = find_checkpoints(runs, list(ckpts) if ckpts else None)
    appending = current is not None and not rebuild
    stored = list(current.steps) if appending else []
    sources = open_sources(base, found, steps, None if appending else window, also=stored)
    layout = sources.base.layout()
    if current is None or rebuild:
        return _build(sources, store_path, state, current, pending, steps, window, codec, layout)
    return _append(sources, store_path, state, current, steps, window, layout, stored_aux)


def _build(sources: Sources, store_path: Path, state: str, current: Generation | None,
           pending: Generation | None, steps, window, codec: str,
           layout: ModelLayout) -> RunInputs:
    aux = sources.base_aux
    chosen = select_steps(sources.steps, steps, window)
    number = (current.generation + 1) if current is not None else (
        pending.generation if pending is not None else 1)
    if state == "old":  # past every generation the unreadable store may hold
        taken = [int(p.name[3:]) for p in store_path.iterdir()
                 if re.fullmatch(r"gen[0-9]{1,9}", p.name, re.ASCII)]
        number = max(taken, default=0) + 1
    if number > MAX_GENERATION:
        raise RelexError(
            f"the store at {store_path} has used up its generation numbers; remove it, or use "
            "another --cache"
        )
    aliases = tied_aliases(layout, config_of(aux, str(sources.base.config_dir)))
    row_dtypes = {n: d for n, d in sources.row_dtypes.items() if n not in aliases}
    target = Generation(
        generation=number,
        steps=tuple(chosen),
        layout=layout,
        row_dtypes=row_dtypes,
        aliases=aliases,
        aux=tuple(AuxFile(n, len(b), _sha256(b)) for n, b in aux.items()),
        codec=codec,
        sources=sources.fingerprints(chosen),
        transforms=transforms_for(codec, row_dtypes),
    )
    return RunInputs(sources, store_path, state, "build", target, (), chosen,
                     list(range(len(chosen))), aux)


def _append(sources: Sources, store_path: Path, state: str, current: Generation,
            steps, window, layout: ModelLayout, aux: dict[str, bytes] | None) -> RunInputs:
    if layout.to_json() != current.layout.to_json():
        raise RelexError(
            f"the store at {store_path} was built for another model layout; use --rebuild or "
            "another --cache"
        )
    stored = list(current.steps)
    available = sorted(set(stored) | set(sources.steps))
    chosen = select_steps(available, steps, window)
    # every new checkpoint --steps keeps enters the store, also those --window leaves out of
    # this prediction: a step skipped now could never be appended later (it would be early)
    taken = select_steps(available, steps, None) if window is not None else chosen
    prints = sources.fingerprints()
    if prints["base"] is not None and prints["base"] != current.sources["base"]:
        changed = _first_change(current.sources["base"], prints["base"])
        raise RelexError(
            f"the store at {store_path} was built from other inputs (base file {changed} "
            "differs); use --rebuild to rebuild it, or another --cache"
        )
    for step in chosen:
        if step in stored and str(step) in prints["steps"]:
            old, new = current.sources["steps"][str(step)], prints["steps"][str(step)]
            if old != new:
                raise RelexError(
                    f"the store at {store_path} was built from other inputs (step {step} file "
                    f"{_first_change(old, new)} differs); use --rebuild to rebuild it, or "
                    "another --cache"
                )
    new_steps = [s for s in taken if s not in stored]
    _check_not_stored_already(store_path, current, {s: prints["steps"][str(s)]
                                                    for s in new_steps}, sources)
    early = [s for s in new_steps if s < stored[-1]]
    if early:
        path = sources.checkpoint(early[0]).directory
        raise RelexError(
            f"the checkpoint at step {early[0]} ({path}) is before the last step {stored[-1]} "
            f"of the store at {store_path}, which lacks it; rows are appended in step order: "
            "exclude it with --steps, or rebuild the store with --rebuild"
        )
    for name, code in sources.row_dtypes.items():
        kept = current.row_dtypes.get(name)
        if new_steps and kept is not None and widest([kept, code]) != kept:
            raise RelexError(
                f"tensor {show(name)} needs {code} rows to hold the new checkpoints and the "
                f"store's exactly (their dtypes differ), but the store keeps its rows as {kept}; "
                "rebuild the store with --rebuild"
            )
    observed_rows = stored + new_steps
    target = current
    kind = None
    if new_steps:
        kind = "append"
        merged = {**current.sources["steps"],
                  **{str(s): prints["steps"][str(s)] for s in new_steps}}
        target = replace(current, steps=tuple(observed_rows),
                         sources={"base": current.sources["base"], "steps": merged})
    return RunInputs(sources, store_path, state, kind, target, current.steps, chosen,
                     [observed_rows.index(s) for s in chosen], aux)


def _check_not_stored_already(store_path: Path, current: Generation, new: dict[int, dict],
                              sources: Sources) -> None:
    """A new checkpoint whose weight files are the base's or a stored step's (same names'
    sizes, mtimes and headers: a link, a copy keeping times, a step directory renamed) would
    be a zero delta or a repeated row. With --base the files themselves are compared
    (sources._check_distinct_weights); without it, this is what the store knows of them."""
    known = {"the base": current.sources.get("base")}
    known |= {f"stored step {s}": p for s, p in current.sources.get("steps", {}).items()}
    for step, prints in new.items():
        for what, stored in known.items():
            if prints and prints == stored:
                raise RelexError(
                    f"the checkpoint of step {step} ({sources.checkpoint(step).directory}) "
                    f"has the same weight files as {what} of the store at {store_path} (same "
                    "sizes, times and headers); give each step its own checkpoint"
                )


def _first_change(old: dict, new: dict) -> str:
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            return name
    return "?"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
