"""Opening what a run reads: the source checkpoints and the trajectory store, checked together."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import zarr

from . import store as trajectory_store
from .checkpoints import (
    Checkpoint,
    ModelFiles,
    ModelLayout,
    check_same_model,
    discover_runs,
    open_model,
    parse_ckpt_args,
    select_steps,
)
from .errors import RelexError
from .units import StepSelection

log = logging.getLogger("relex_stream")


@dataclass(frozen=True)
class Sources:
    """The base and the observed checkpoints of a run, opened (headers only)."""

    base: ModelFiles
    checkpoints: list[Checkpoint]  # the observed ones, sorted by step

    def fingerprints(self) -> dict:
        return {
            "base": self.base.fingerprint(),
            "steps": {str(c.step): c.model.fingerprint() for c in self.checkpoints},
        }


def open_sources(
    base: Path,
    runs: Path | None,
    ckpts: list[str] | None,
    steps: StepSelection | None,
    window: int | None,
) -> Sources:
    if runs is not None and ckpts:
        raise RelexError("give either --runs or --ckpt, not both")
    if runs is None and not ckpts:
        raise RelexError("give the observed checkpoints with --runs RUN_DIR or --ckpt STEP=PATH")
    found = discover_runs(Path(runs)) if runs is not None else parse_ckpt_args(list(ckpts or []))
    chosen = select_steps(list(found), steps, window)
    base_model = open_model(Path(base))
    checkpoints = [Checkpoint(step, open_model(found[step])) for step in chosen]
    check_same_model(base_model, checkpoints)
    return Sources(base_model, checkpoints)


def tied_aliases(layout: ModelLayout, aux_files: dict[str, bytes]) -> dict[str, str]:
    """{'lm_head.weight': 'model.embed_tokens.weight'} when the config ties them, else {}."""
    try:
        config = json.loads(aux_files.get("config.json", b"{}"))
    except json.JSONDecodeError:
        raise RelexError("the base's config.json is not valid JSON") from None
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if (
        config.get("tie_word_embeddings") is True
        and head in layout.tensors
        and layout.tensors.get(embed) == layout.tensors[head]
    ):
        return {head: embed}
    return {}


def open_store(
    path: Path,
    sources: Sources | None,
    steps: StepSelection | None,
    window: int | None,
    rebuild: bool,
    codec: str = "xor-zstd",
) -> tuple[zarr.Group, list[int], list[int]]:
    """Open or create the store; returns (zarr group, observed steps, their row ids).

    With sources, an existing store must hold their steps and match their fingerprints.
    """
    if rebuild and trajectory_store.open_existing(path, any_version=True) is not None:
        if sources is None:
            raise RelexError("--rebuild needs the sources (--base and --runs/--ckpt)")
        log.info("removing the store at %s (--rebuild)", path)
        trajectory_store.remove(path)
    root = trajectory_store.open_existing(path)
    if sources is None:
        if root is None:
            raise RelexError(f"no store at {path}; give --base and --runs (or --ckpt) to build one")
        stored = list(root.attrs["steps"])
        chosen = select_steps(stored, steps, window)
        return root, chosen, [stored.index(s) for s in chosen]
    chosen = [c.step for c in sources.checkpoints]
    fingerprints = sources.fingerprints()
    if root is None:
        aux = sources.base.aux_files()
        layout = sources.base.layout()
        root = trajectory_store.create(
            path, layout, chosen, fingerprints, aux, tied_aliases(layout, aux), codec
        )
        return root, chosen, list(range(len(chosen)))
    meta = trajectory_store.attrs(root)
    stored = list(meta["steps"])
    if meta["layout"] != sources.base.layout().to_json():
        raise RelexError(
            f"the store at {path} was built for another model layout; "
            "use --rebuild or another --cache"
        )
    missing = [s for s in chosen if s not in stored]
    if missing:
        raise RelexError(
            f"the store at {path} holds steps {stored[0]}..{stored[-1]} ({len(stored)}) but not "
            f"step(s) {missing[:5]}; use --rebuild to rebuild it, or another --cache"
        )
    old = meta["sources"]
    changed = _first_change(old["base"], fingerprints["base"], "base")
    for step in chosen:
        changed = changed or _first_change(
            old["steps"][str(step)], fingerprints["steps"][str(step)], f"step {step}"
        )
    if changed:
        raise RelexError(
            f"the store at {path} was built from other inputs ({changed}); "
            "use --rebuild to rebuild it, or another --cache"
        )
    return root, chosen, [stored.index(s) for s in chosen]


def _first_change(old: dict, new: dict, what: str) -> str | None:
    for shard in sorted(set(old) | set(new)):
        if old.get(shard) != new.get(shard):
            return f"{what} file {shard} differs"
    return None
