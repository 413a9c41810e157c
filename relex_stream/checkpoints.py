"""Finding checkpoints on disk and checking they describe one model before any weight is read."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RelexError
from .safetensors_io import INDEX_NAME, SINGLE_NAME, TensorInfo, header_fingerprint, read_header
from .units import StepSelection

log = logging.getLogger(__name__)

# checkpoint-N (HF Trainer, TRL), global_step_N / global_stepN (verl, DeepSpeed),
# global_stepN_hf (OpenRLHF), step_N, step-N
STEP_DIR_RE = re.compile(r"^(?:checkpoint-|global_step_?|step[_-])(\d+)(?:_hf)?$")
MODEL_SUBDIRS = (".", "huggingface", "actor/huggingface")


AUX_EXCLUDE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


@dataclass(frozen=True)
class ModelLayout:
    """What an output model must look like: tensor dtypes and shapes, shard files and order."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype code, shape)
    shard_tensors: dict[str, tuple[str, ...]]  # shard file name -> tensor names, in order
    sharded: bool

    def to_json(self) -> dict:
        return {
            "tensors": {n: [d, list(s)] for n, (d, s) in self.tensors.items()},
            "shard_tensors": {f: list(names) for f, names in self.shard_tensors.items()},
            "sharded": self.sharded,
        }

    @staticmethod
    def from_json(data: dict) -> ModelLayout:
        return ModelLayout(
            tensors={n: (d, tuple(s)) for n, (d, s) in data["tensors"].items()},
            shard_tensors={f: tuple(names) for f, names in data["shard_tensors"].items()},
            sharded=bool(data["sharded"]),
        )


@dataclass(frozen=True)
class ModelFiles:
    """One model directory: its tensors, which shard holds each, and the shard order."""

    directory: Path
    tensors: dict[str, TensorInfo]
    shard_names: tuple[str, ...]  # file names, in the order they should be written
    shard_tensors: dict[str, tuple[str, ...]]  # file name -> tensor names in header order
    sharded: bool

    def layout(self) -> ModelLayout:
        return ModelLayout(
            tensors={n: (t.dtype, t.shape) for n, t in self.tensors.items()},
            shard_tensors=dict(self.shard_tensors),
            sharded=self.sharded,
        )

    def aux_files(self) -> dict[str, bytes]:
        """Config, tokenizer and other small files that an output model needs, by name."""
        return {
            path.name: path.read_bytes()
            for path in sorted(self.directory.iterdir())
            if path.is_file()
            and path.name != INDEX_NAME
            and not path.name.endswith(AUX_EXCLUDE_SUFFIXES)
        }

    def fingerprint(self) -> dict:
        """Per shard file: size, mtime and header hash."""
        return {name: header_fingerprint(self.directory / name) for name in self.shard_names}


@dataclass(frozen=True)
class Checkpoint:
    """An observed checkpoint: its training step and its model files."""

    step: int
    model: ModelFiles


def _explain_non_safetensors(directory: Path) -> str:
    if any(directory.glob("model_world_size_*_rank_*.pt")):
        return (
            f"{directory} holds verl FSDP shards, not a Hugging Face model; merge them first, e.g. "
            f"`python -m verl.model_merger merge --backend fsdp --local_dir {directory} "
            f"--target_dir {directory}/huggingface`"
        )
    if (directory / "adapter_config.json").exists():
        return (
            f"{directory} holds a PEFT adapter, not a full model; merge it into the base first "
            "(peft: `model.merge_and_unload().save_pretrained(dir)`)"
        )
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        return (
            f"{directory} holds .bin/.pt weights; relex_stream reads safetensors only (pickle "
            "files can run code). Convert with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    return f"{directory} holds no model.safetensors or {INDEX_NAME}"


def find_model_dir(directory: Path) -> Path:
    """The safetensors model's directory: DIR, DIR/huggingface or DIR/actor/huggingface."""
    for sub in MODEL_SUBDIRS:
        candidate = (directory / sub).resolve()
        if (candidate / INDEX_NAME).is_file() or (candidate / SINGLE_NAME).is_file():
            return candidate
    for sub in (*MODEL_SUBDIRS, "actor"):  # verl keeps FSDP shards in step/actor/
        candidate = directory / sub
        if candidate.is_dir() and (
            any(candidate.glob("model_world_size_*_rank_*.pt"))
            or (candidate / "adapter_config.json").exists()
        ):
            raise RelexError(_explain_non_safetensors(candidate))
    raise RelexError(_explain_non_safetensors(directory))


def open_model(directory: Path) -> ModelFiles:
    """Index the tensors of a single-file or sharded safetensors model (headers only)."""
    if not directory.is_dir():
        raise RelexError(f"model directory {directory} does not exist")
    model_dir = find_model_dir(directory)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise RelexError(
                f"{index_path} is not a valid safetensors index (no weight_map)"
            ) from None
        shard_names = list(dict.fromkeys(weight_map.values()))
        sharded = True
    else:
        weight_map, shard_names, sharded = None, [SINGLE_NAME], False
    tensors: dict[str, TensorInfo] = {}
    shard_tensors: dict[str, tuple[str, ...]] = {}
    for shard in shard_names:
        # A shard must be named by a plain file name in the model's own directory. Its file
        # may be a link (the Hugging Face cache links snapshots into blobs/): the directory's
        # owner put it there; an index file cannot point anywhere else.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise RelexError(
                f"{index_path} points to {shard!r}, outside its directory; refusing to read it"
            )
        path = model_dir / shard
        if not path.is_file():
            raise RelexError(f"{index_path} names shard {shard!r}, which is missing")
        header, data_start, _ = read_header(path)
        order = sorted(header, key=lambda n: int(header[n]["data_offsets"][0]))
        for name in order:
            entry = header[name]
            if name in tensors:
                raise RelexError(f"tensor {name!r} appears in two shards of {model_dir}")
            tensors[name] = TensorInfo(
                name=name,
                file=path,
                offset=data_start + int(entry["data_offsets"][0]),
                dtype=entry["dtype"],
                shape=tuple(int(d) for d in entry["shape"]),
            )
        shard_tensors[shard] = tuple(order)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if tensors.get(name) is None or tensors[name].file.name != shard:
                raise RelexError(f"{index_path}: tensor {name!r} is not in shard {shard!r}")
    return ModelFiles(model_dir, tensors, tuple(shard_names), shard_tensors, sharded)


def discover_runs(runs_dir: Path) -> dict[int, Path]:
    """Step number -> directory, for every step directory directly inside `runs_dir`."""
    if not runs_dir.is_dir():
        raise RelexError(f"run directory {runs_dir} does not exist")
    found: dict[int, Path] = {}
    for child in sorted(runs_dir.iterdir()):
        match = STEP_DIR_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        step = int(match.group(1))
        if step in found:
            raise RelexError(
                f"step {step} appears twice in {runs_dir} ({found[step].name} and {child.name}); "
                "keep one, or name checkpoints explicitly with --ckpt STEP=PATH"
            )
        found[step] = child
    if not found:
        raise RelexError(
            f"no checkpoints found in {runs_dir}: expected directories named checkpoint-N, "
            "global_step_N, global_stepN[_hf], step_N or step-N (or use --ckpt STEP=PATH)"
        )
    return found


def parse_ckpt_args(pairs: list[str]) -> dict[int, Path]:
    """Step number -> directory from repeated --ckpt STEP=PATH."""
    found: dict[int, Path] = {}
    for pair in pairs:
        step_text, sep, path = pair.partition("=")
        if not sep or not step_text.strip().isdigit():
            raise RelexError(
                f"--ckpt {pair!r} must look like STEP=PATH, e.g. --ckpt 100=run/ckpt100"
            )
        step = int(step_text)
        if step in found:
            raise RelexError(f"step {step} is given twice with --ckpt; each step must be distinct")
        found[step] = Path(path)
    return found


def select_steps(
    available: list[int], steps: StepSelection | None, window: int | None
) -> list[int]:
    """Apply --steps then --window (keep the last N) to the sorted available steps."""
    chosen = sorted(available)
    if steps is not None:
        missing = sorted(set(steps.exact) - set(chosen))
        if missing:
            raise RelexError(
                f"--steps names step(s) {missing[:5]} that are not observed; "
                f"observed: {chosen[:10]}{' ...' if len(chosen) > 10 else ''}"
            )
        chosen = [s for s in chosen if steps.keeps(s)]
    if window is not None:
        if window < 2:
            raise RelexError("--window must be at least 2")
        chosen = chosen[-window:]
    if len(chosen) < 2:
        raise RelexError(
            f"need at least two observed checkpoints, got {len(chosen)}; "
            "add checkpoints or widen --steps/--window"
        )
    return chosen


def check_same_model(base: ModelFiles, checkpoints: list[Checkpoint]) -> None:
    """Refuse before reading weights if names, shapes or dtypes differ from the base."""
    for ckpt in checkpoints:
        names, base_names = set(ckpt.model.tensors), set(base.tensors)
        if names != base_names:
            missing, extra = sorted(base_names - names), sorted(names - base_names)
            what = f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            raise RelexError(
                f"checkpoint at step {ckpt.step} ({ckpt.model.directory}) {what} that the base "
                f"{'has' if missing else 'lacks'}; all checkpoints must be of the base's model"
            )
        for name, info in base.tensors.items():
            other = ckpt.model.tensors[name]
            if other.shape != info.shape:
                raise RelexError(
                    f"tensor {name!r} has shape {list(other.shape)} at step {ckpt.step} "
                    f"but {list(info.shape)} in the base"
                )
            if other.dtype != info.dtype:
                raise RelexError(
                    f"tensor {name!r} has dtype {other.dtype} at step {ckpt.step} "
                    f"but {info.dtype} in the base; save all checkpoints in one dtype"
                )
