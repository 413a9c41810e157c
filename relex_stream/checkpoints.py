"""Finding checkpoints on disk and checking they describe one model before any weight is read."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import RelexError
from .jsonfile import (
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    JsonProblem,
    get_optional_bool,
    get_str_map,
    load_json_object,
    loads_strict,
    show,
)
from .safetensors_io import (
    FLOAT_CODES,
    INDEX_NAME,
    SINGLE_NAME,
    HeaderProblem,
    check_tensor,
    header_fingerprint,
    is_prediction,
    read_header,
)
from .tensor_files import Piece, TensorInfo, widest
from .units import StepSelection

log = logging.getLogger(__name__)

# checkpoint-N (HF Trainer, TRL), global_step_N / global_stepN (verl, DeepSpeed),
# global_stepN_hf (OpenRLHF), step_N, step-N
STEP_DIR_RE = re.compile(r"^(?:checkpoint-|global_step_?|step[_-])([0-9]{1,15})(?:_hf)?$", re.ASCII)
# A name that starts like a step directory but is not one (checkpoint-100.tmp, global_step_1e3):
# most likely a checkpoint the user meant, so skipping it is said, once per directory.
_NEAR_STEP_DIR_RE = re.compile(r"^(?:checkpoint|global_step|step)[-_]?[0-9]", re.ASCII)
_WARNED_SKIPPED: set[Path] = set()
MODEL_SUBDIRS = (".", "huggingface", "actor/huggingface")
AUX_EXCLUDE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")
# all of them together (held in memory while the outputs are written): a tokenizer.json is 7-35
# MB (Qwen2.5, Llama 3, Gemma)
AUX_MAX_BYTES = 96 * 2**20
MAX_AUX_FILES = 256  # config, tokenizer, custom code: a few dozen at most
JSON_AUX = ("config.json", "generation_config.json")
MIN_STEPS = 2


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

    def numel(self, name: str) -> int:
        return math.prod(self.tensors[name][1])


def is_shard_name(name: object) -> bool:
    """A plain file name ending in .safetensors: safe to create inside an output directory."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and 0 < len(name) <= 255
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


def check_layout(layout: ModelLayout, where: str) -> None:
    """Every tensor in exactly one shard, shard files plainly named, at least one tensor."""
    if not layout.tensors:
        raise RelexError(f"{where} holds no tensors")
    seen: set[str] = set()
    for shard, names in layout.shard_tensors.items():
        if not is_shard_name(shard):
            raise RelexError(
                f"{where} names an output shard {shard!r}, which is not a plain .safetensors file "
                "name; refusing to write it"
            )
        for name in names:
            if name in seen or name not in layout.tensors:
                raise RelexError(f"{where} lists tensor {name!r} in its shards twice or unknown")
            seen.add(name)
    if seen != set(layout.tensors):
        missing = sorted(set(layout.tensors) - seen)[0]
        raise RelexError(f"{where} has tensor {missing!r} in no shard")
    if not layout.sharded and list(layout.shard_tensors) != [SINGLE_NAME]:
        raise RelexError(f"{where} is a single-file model that is not named {SINGLE_NAME}")


@dataclass(frozen=True)
class ModelFiles:
    """One model directory: its tensors, which shard holds each, and the shard order."""

    directory: Path
    tensors: dict[str, TensorInfo]
    shard_tensors: dict[str, tuple[str, ...]]  # file name -> tensor names in header order
    sharded: bool
    files: tuple[Path, ...]  # every weight file read (for fingerprints)
    config_dir: Path  # where config and tokenizer files are
    fsdp: object | None = None  # the fsdp.FsdpCheckpoint when read from verl FSDP shards
    predicted: bool = False  # written by relex_stream (a prediction), not saved by training
    identities: tuple[tuple[int, ...], ...] = ()  # per file: file_identity before its header

    def layout(self) -> ModelLayout:
        return ModelLayout(
            tensors={n: (t.dtype, t.shape) for n, t in self.tensors.items()},
            shard_tensors=dict(self.shard_tensors),
            sharded=self.sharded,
        )

    def aux_files(self) -> dict[str, bytes]:
        """Config, tokenizer and other small files that an output model needs, by name.

        A link is followed only into the model's folder or a folder its weight files' links
        lead to (a Hugging Face cache's blobs/): a link to /etc/passwd beside a downloaded base
        would otherwise be copied into OUT and into a shared store. Anything else left out (a
        folder, a FIFO, a dangling link, an odd name) is named in a warning: the output then
        lacks a file the base has.
        """
        files: dict[str, bytes] = {}
        total = 0
        homes = self._aux_homes()
        for path in sorted(self.config_dir.iterdir()):
            name = path.name
            if name == INDEX_NAME or name.endswith(AUX_EXCLUDE_SUFFIXES) or name.startswith("."):
                continue  # weights, and hidden files, are never side files
            target, why = _aux_target(path, homes)
            if target is None:
                _warn_left_out(path, why)
                continue
            if len(files) == MAX_AUX_FILES:
                raise RelexError(
                    f"there are more than {MAX_AUX_FILES} files next to the model in "
                    f"{self.config_dir}; move what is not config or tokenizer elsewhere"
                )
            limit = AUX_MAX_BYTES - total
            data = _read_regular(target, min(limit, MAX_CONFIG_BYTES) if name in JSON_AUX
                                 else limit)
            if data is None:
                _warn_left_out(path, "not a regular file once opened")
                continue
            if name in JSON_AUX and len(data) > MAX_CONFIG_BYTES:
                raise RelexError(
                    f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB, which no model's "
                    f"{name} is; fix or remove it"
                )
            if len(data) > limit:
                raise RelexError(
                    f"the files next to the model in {self.config_dir} add up to more than "
                    f"{AUX_MAX_BYTES >> 20} MiB; move what is not config or tokenizer elsewhere"
                )
            total += len(data)
            files[name] = data
        if "config.json" not in files and os.path.lexists(self.config_dir / "config.json"):
            log.warning("%s is not a readable file here (a directory, a FIFO, a dangling link "
                        "or one left out): the output has no config.json and the config's "
                        "tie_word_embeddings is taken as absent", self.config_dir / "config.json")
        for name in JSON_AUX:
            if name in files:
                _check_json_object(files[name], self.config_dir / name)
        return files

    def _aux_homes(self) -> set[Path]:
        """Folders an aux file may lie in: the config folder, and where weight files lead.

        Not where config.json leads: a config.json linked to ~/.docker/config.json would make
        that folder, and every link into it, trusted."""
        homes = {self.config_dir.resolve()}
        for path in self.files:
            try:
                homes.add(path.resolve(strict=False).parent)
            except (OSError, RuntimeError):
                continue
        return homes

    def fingerprint(self) -> dict:
        """Per weight file: size, mtime and a hash of its header (no weights read)."""
        if self.fsdp is not None:
            from .fsdp import fsdp_fingerprint

            return fsdp_fingerprint(self.fsdp)
        return {_relative(p, self.directory): header_fingerprint(p) for p in self.files}

    def without(self, name: str) -> ModelFiles:
        """The same model without tensor `name` (a tied copy the base does not store)."""
        tensors = {n: t for n, t in self.tensors.items() if n != name}
        shard_tensors = {f: tuple(n for n in names if n != name)
                         for f, names in self.shard_tensors.items()}
        return ModelFiles(self.directory, tensors, shard_tensors, self.sharded, self.files,
                          self.config_dir, self.fsdp, self.predicted, self.identities)

    def check_unchanged(self) -> None:
        """RelexError when a weight file is no longer the one whose header was read: replaced
        (a trainer re-saving the step), rewritten, or gone. Called after the reads, before a
        store commit or an output is finalised, so rows of two files never mix."""
        for path, before in zip(self.files, self.identities, strict=True):
            if file_identity(path) != before:
                raise RelexError(
                    f"{path} changed while it was read (replaced, rewritten or removed); "
                    "nothing was kept: rerun once whatever writes it has finished"
                )


# transformers (>= 4.52) saves every chat template but the default one there, and loads them
# from there (CHAT_TEMPLATE_DIR)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _aux_target(path: Path, homes: set[Path]) -> tuple[Path | None, str]:
    """The file to copy for the side file at `path`, or None and why it is left out."""
    name = path.name
    if not name.isprintable():
        return None, "a file name with characters that cannot be printed"
    try:
        target = path.resolve(strict=True)
        mode = os.stat(target).st_mode
    except RuntimeError:  # a loop of links (Python < 3.13)
        return None, "a loop of links"
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.ELOOP)
        return None, "a dangling link, or a loop of links" if missing else (
            f"cannot be read: {exc.strerror or exc}")
    if target.parent not in homes:
        return None, f"a link to {target}, outside the model's folders"
    if stat.S_ISDIR(mode):
        if name == CHAT_TEMPLATE_DIR:
            return None, ("the extra chat templates in this folder are not copied: only files "
                          "directly beside the model are; copy the folder into each output by "
                          "hand")
        return None, "a folder: only files directly beside the model are copied"
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _SPECIAL_FILES if test(mode)), "not a regular file")
        return None, kind
    if "\\" in name or len(name) > 255:  # the store keeps plain names only
        return None, "a file name with a backslash, or longer than 255 characters"
    return target, ""


def _warn_left_out(path: Path, why: str) -> None:
    """One warning line naming a side file that the outputs (and the store) will lack."""
    shown = path if path.name.isprintable() else path.parent / show(path.name)
    log.warning("%s: left out of the output (%s)", shown, why)


def file_identity(path: Path) -> tuple[int, ...]:
    """(device, inode, size, mtime, ctime) of a file; () when it cannot be stat-ed. ctime moves
    with every write, rename or link, and no user can set it back."""
    try:
        info = os.stat(path)
    except OSError:
        return ()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _read_regular(path: Path, limit: int) -> bytes | None:
    """At most limit + 1 bytes of a regular file, or None when it is not one once opened (a
    FIFO swapped in: opened without blocking, never read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return path.name


def _check_json_object(raw: bytes, path: Path) -> dict:
    """A small JSON file's bytes as an object, strictly (UTF-8, no duplicate keys, bounded)."""
    try:
        data = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, JsonProblem) as exc:
        raise RelexError(f"{path} is not valid UTF-8 JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise RelexError(f"{path} is not a JSON object; fix or remove it")
    return data


def config_of(aux_files: dict[str, bytes], where: str) -> dict:
    """The parsed config.json (an object) or {} when there is none; tie_word_embeddings, if
    present, must be true or false."""
    if "config.json" not in aux_files:
        return {}
    path = Path(where) / "config.json"
    config = _check_json_object(aux_files["config.json"], path)
    get_optional_bool(config, "tie_word_embeddings", path)
    return config


@dataclass(frozen=True)
class Checkpoint:
    """An observed checkpoint: its training step and its model files."""

    step: int
    model: ModelFiles


def _not_a_directory(what: str, path: Path) -> str:
    if path.exists():
        return (f"{what} {path} is a file, not a directory; give the directory that holds the "
                "model's files")
    return f"{what} {path} does not exist"


def _explain_non_safetensors(directory: Path) -> str:
    if (directory / "adapter_config.json").exists():
        return (
            f"{directory} holds a PEFT adapter, not a full model; merge it into the base first "
            "(peft: `model.merge_and_unload().save_pretrained(dir)`)"
        )
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        return (
            f"{directory} holds .bin/.pt weights; relex_stream reads safetensors and verl FSDP "
            "shards only (other pickle files can run code). Convert with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    for name in (SINGLE_NAME, INDEX_NAME):
        if os.path.lexists(directory / name):  # a link to nowhere, a FIFO, a device...
            return f"{directory / name} is not a regular file; relex_stream will not read it"
    return f"{directory} holds no model.safetensors, {INDEX_NAME} or verl FSDP shards"


_WARNED_BOTH: set[Path] = set()  # steps holding safetensors and FSDP shards, warned about


def find_model_dir(directory: Path) -> tuple[str, Path]:
    """('safetensors', DIR[/huggingface|/actor/huggingface]) or ('fsdp', DIR/actor or DIR)."""
    from .fsdp import find_fsdp_dir

    # The directory's own safetensors model first; then verl FSDP shards (fp32 master weights,
    # more precise than the bf16 copy verl's hf_model option saves in huggingface/); then that.
    for sub in MODEL_SUBDIRS[:1]:
        if _has_safetensors(directory / sub):
            if find_fsdp_dir(directory) is not None and directory not in _WARNED_BOTH:
                _WARNED_BOTH.add(directory)  # once: watch opens a step on every poll
                log.warning("%s holds a safetensors model and verl FSDP shards: the safetensors "
                            "model is read; move it out if it is not this step's", directory)
            return "safetensors", (directory / sub).resolve()
    fsdp_dir = find_fsdp_dir(directory)
    if fsdp_dir is not None:
        return "fsdp", fsdp_dir
    for sub in MODEL_SUBDIRS[1:]:
        if _has_safetensors(directory / sub):
            return "safetensors", (directory / sub).resolve()
    for sub in (*MODEL_SUBDIRS, "actor"):
        candidate = directory / sub
        if candidate.is_dir() and (candidate / "adapter_config.json").exists():
            raise RelexError(_explain_non_safetensors(candidate))
    raise RelexError(_explain_non_safetensors(directory))


def _has_safetensors(candidate: Path) -> bool:
    return (candidate / INDEX_NAME).is_file() or (candidate / SINGLE_NAME).is_file()


def open_model(directory: Path, config_dir: Path | None = None) -> ModelFiles:
    """Index the tensors of a safetensors model or a verl FSDP checkpoint (headers only)."""
    if not directory.is_dir():
        raise RelexError(_not_a_directory("model directory", directory))
    kind, model_dir = find_model_dir(directory)
    if kind == "fsdp":
        return _open_fsdp(model_dir, config_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        shard_names, weight_map = _read_index(index_path)
        sharded = True
        if SINGLE_NAME not in shard_names and os.path.lexists(model_dir / SINGLE_NAME):
            # transformers loads the single file, this would read the index: two models
            raise RelexError(
                f"{model_dir} holds both {SINGLE_NAME} and {INDEX_NAME} (with other shards): "
                f"which one is the model is ambiguous (transformers loads {SINGLE_NAME}); "
                "remove the one that is left over"
            )
    else:
        weight_map, shard_names, sharded = None, [SINGLE_NAME], False
    tensors: dict[str, TensorInfo] = {}
    shard_tensors: dict[str, tuple[str, ...]] = {}
    predicted = False
    identities: list[tuple[int, ...]] = []
    for shard in shard_names:
        # A shard must be named by a plain file name in the model's own directory. Its file
        # may be a link (the Hugging Face cache links snapshots into blobs/): the directory's
        # owner put it there; an index file cannot point anywhere else.
        if not is_shard_name(shard):
            raise RelexError(
                f"{index_path} points to {shard!r}, outside its directory (a shard must be a "
                "plain .safetensors file name next to the index); refusing to read it"
            )
        path = model_dir / shard
        if not path.is_file():
            raise RelexError(f"{index_path} names shard {shard!r}, which is missing")
        identities.append(file_identity(path))  # before the header: a swap after it shows
        header, data_start, raw = read_header(path)
        predicted = predicted or is_prediction(raw)
        order = sorted(header, key=lambda n: (int(header[n]["data_offsets"][0]), n))
        for name in order:
            entry = header[name]
            if name in tensors:
                raise RelexError(f"tensor {name!r} appears in two shards of {model_dir}")
            shape = tuple(int(d) for d in entry["shape"])
            tensors[name] = TensorInfo(
                name=name,
                dtype=entry["dtype"],
                shape=shape,
                pieces=(Piece(path, data_start + int(entry["data_offsets"][0]), math.prod(shape)),),
            )
        shard_tensors[shard] = tuple(order)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if tensors.get(name) is None or tensors[name].pieces[0].file.name != shard:
                raise RelexError(f"{index_path}: tensor {name!r} is not in shard {shard!r}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise RelexError(f"{index_path} does not list tensor {extra[0]!r} of its shards")
    files = tuple(model_dir / s for s in shard_names)
    model = ModelFiles(model_dir, tensors, shard_tensors, sharded, files, model_dir,
                       predicted=predicted, identities=tuple(identities))
    check_layout(model.layout(), str(model_dir))
    return model


SHARD_BYTES = 5 * 10**9  # an output of an FSDP base is split like save_pretrained does


def _open_fsdp(actor_dir: Path, config_dir: Path | None) -> ModelFiles:
    """A verl FSDP checkpoint as a model: its tensors' pieces in the rank files."""
    from .fsdp import open_fsdp_checkpoint

    ckpt = open_fsdp_checkpoint(actor_dir)
    for info in ckpt.tensors.values():  # what a safetensors header would have refused
        try:
            check_tensor(info.name, info.dtype, info.shape)
        except HeaderProblem as exc:
            raise RelexError(f"{actor_dir}: {exc}; the rank files are corrupt or crafted, "
                             "re-copy them from the training run") from None
    names = list(ckpt.tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + ckpt.tensors[name].nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += ckpt.tensors[name].nbytes
    if len(shards) == 1:
        shard_tensors = {SINGLE_NAME: tuple(names)}
    else:
        shard_tensors = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": tuple(part)
                         for i, part in enumerate(shards)}
    found = ckpt.config_dir or config_dir or actor_dir
    # after the rank files' directories were parsed (their names come from the parse): a swap
    # during the parse itself goes unseen, one during the reads does not
    identities = tuple(file_identity(p) for p in ckpt.files)
    model = ModelFiles(actor_dir, dict(ckpt.tensors), shard_tensors, len(shards) > 1,
                       tuple(ckpt.files), found, ckpt, identities=identities)
    check_layout(model.layout(), str(actor_dir))
    return model


def _read_index(index_path: Path) -> tuple[list[str], dict[str, str]]:
    """(shard file names in order of first use, weight_map) of a safetensors index file."""
    data = load_json_object(index_path, "safetensors index", MAX_INDEX_BYTES)
    weight_map = get_str_map(data, "weight_map", index_path)
    if not weight_map:
        raise RelexError(f"{index_path} has an empty weight_map; it indexes no tensor")
    return list(dict.fromkeys(weight_map.values())), weight_map


def discover_runs(runs_dir: Path, allow_none: bool = False) -> dict[int, Path]:
    """Step number -> directory, for every step directory directly inside `runs_dir`; none
    found is an error unless `allow_none` (watch: the run has not saved one yet)."""
    if not runs_dir.is_dir():
        raise RelexError(_not_a_directory("run directory", runs_dir))
    found: dict[int, Path] = {}
    for child in sorted(runs_dir.iterdir()):
        match = STEP_DIR_RE.match(child.name)
        if not match or not child.is_dir():
            if not match and _NEAR_STEP_DIR_RE.match(child.name) and child.is_dir() \
                    and child not in _WARNED_SKIPPED:
                _WARNED_SKIPPED.add(child)  # once: watch lists the directory on every poll
                log.warning("skipping %r in %s: not named like a step directory (checkpoint-N, "
                            "global_step_N, global_stepN[_hf], step_N or step-N); rename it or "
                            "pass it with --ckpt STEP=PATH", child.name, runs_dir)
            continue
        step = int(match.group(1))
        if step in found:
            raise RelexError(
                f"step {step} appears twice in {runs_dir} ({found[step].name} and {child.name}); "
                "keep one, or name checkpoints explicitly with --ckpt STEP=PATH"
            )
        found[step] = child
    if not found and not allow_none:
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
        step_text = step_text.strip()
        if not sep or not path or not re.fullmatch(r"[0-9]{1,15}", step_text, re.ASCII):
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
        check_window(window)
        chosen = chosen[-window:]
    if len(chosen) < MIN_STEPS:
        raise RelexError(
            f"need at least two observed checkpoints, got {len(chosen)}; "
            "add checkpoints or widen --steps/--window"
        )
    return chosen


def check_window(window: int) -> None:
    """A window holds at least two observed steps (a line needs two points)."""
    if window < MIN_STEPS:
        raise RelexError(f"--window must be at least {MIN_STEPS}, not {window}")


def check_same_model(
    reference: ModelLayout, where: str, checkpoints: list[Checkpoint]
) -> dict[str, str]:
    """Refuse before reading weights if names or shapes differ from the reference (the base's
    layout, or the store's); float dtypes may differ (a bf16 base with fp32 checkpoints).
    Returns each float tensor's row dtype: the widest dtype of its checkpoints, which holds
    every observed value exactly."""
    float_names = {n for n, (d, _) in reference.tensors.items() if d in FLOAT_CODES}
    row_codes: dict[str, list[str]] = {n: [] for n in float_names}
    for ckpt in checkpoints:
        names, base_names = set(ckpt.model.tensors), set(reference.tensors)
        if names != base_names:
            missing, extra = sorted(base_names - names), sorted(names - base_names)
            what = f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            raise RelexError(
                f"checkpoint at step {ckpt.step} ({ckpt.model.directory}) {what} that {where} "
                f"{'has' if missing else 'lacks'}; all checkpoints must be of one model"
            )
        for name, (dtype, shape) in reference.tensors.items():
            other = ckpt.model.tensors[name]
            if other.shape != shape:
                raise RelexError(
                    f"tensor {name!r} has shape {list(other.shape)} at step {ckpt.step} "
                    f"but {list(shape)} in {where}"
                )
            if name in float_names and other.dtype in FLOAT_CODES:
                row_codes[name].append(other.dtype)
            elif other.dtype != dtype:
                raise RelexError(
                    f"tensor {name!r} has dtype {other.dtype} at step {ckpt.step} "
                    f"but {dtype} in {where}; only floating-point tensors may change dtype"
                )
    return {name: widest(codes) for name, codes in row_codes.items() if codes}
