"""What a run takes from the model folders it is given: each step its own weights, no step 0,
and only the model's own small files (found by a hostile-input hunt; each failed before)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.untrusted import assert_error, assert_ok, call, snapshot

SYNTH = ("--hidden", "32", "--layers", "1", "--vocab", "64", "--steps", "10-40:10")


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-files") / "traj"
    assert_ok(call("synth", "--out", root, *SYNTH))
    return root


def _copy(trajectory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "traj"
    shutil.copytree(trajectory, target, symlinks=True)
    return target


def _run(root: Path, *args: object) -> object:
    return call("run", "--target", "100", "--quiet", *args)


@pytest.mark.parametrize("how", ["huggingface-folder", "link-to-base", "linked-file",
                                 "ckpt-twice"])
def test_a_step_that_reads_the_base_or_another_step_is_refused(trajectory: Path, tmp_path: Path,
                                                               how: str) -> None:
    """Only a step folder that is the base's folder was caught: the base as a step's
    huggingface/ folder, a weight file linked to the base's, and one folder given for two
    steps all ran, with a zero delta or a repeated row."""
    root = _copy(trajectory, tmp_path)
    runs, base = root / "runs", root / "base"
    args: list[object] = ["--base", base, "--runs", runs]
    needle = "reads the same weight files as the base"
    if how == "huggingface-folder":
        for step in (10, 20, 30, 40):
            (runs / f"global_step_{step}").mkdir()
            (runs / f"checkpoint-{step}").rename(runs / f"global_step_{step}" / "huggingface")
        args = ["--base", runs / "global_step_10" / "huggingface", "--runs", runs]
    elif how == "link-to-base":
        shutil.rmtree(runs / "checkpoint-10")
        (runs / "checkpoint-10").symlink_to(base.resolve())
        needle = "is also the checkpoint of step 10"  # caught before: the folder itself
    elif how == "linked-file":
        weights = runs / "checkpoint-20" / "model.safetensors"
        weights.unlink()
        weights.symlink_to((base / "model.safetensors").resolve())
    else:
        args = ["--base", base, "--ckpt", f"10={runs / 'checkpoint-10'}",
                "--ckpt", f"20={runs / 'checkpoint-10'}", "--ckpt", f"30={runs / 'checkpoint-30'}"]
        needle = "as the checkpoint of step 10"
    assert_error(_run(root, *args, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_steps_sharing_some_files_are_fine(trajectory: Path, tmp_path: Path) -> None:
    """A content-addressed cache shares the blob of a shard that did not change: one shared
    file is not a repeated step."""
    root = _copy(trajectory, tmp_path)
    (root / "runs" / "checkpoint-10" / "tokenizer_config.json").write_text("{}")
    os.link(root / "runs" / "checkpoint-10" / "tokenizer_config.json",
            root / "runs" / "checkpoint-20" / "tokenizer_config.json")
    assert_ok(_run(root, "--base", root / "base", "--runs", root / "runs",
                   "--out", tmp_path / "out"))


def test_a_checkpoint_of_step_0_is_refused_and_steps_can_leave_it_out(trajectory: Path,
                                                                       tmp_path: Path) -> None:
    """relex took checkpoint-0 as a row at t = 0 while two-point took the base as step 0: the
    methods disagreed, silently. Step 0 is the base."""
    root = _copy(trajectory, tmp_path)
    step0 = root / "runs" / "checkpoint-0"
    shutil.copytree(root / "runs" / "checkpoint-10", step0)
    assert_error(_run(root, "--base", root / "base", "--runs", root / "runs",
                      "--out", tmp_path / "out"), "step 0, which is the base", "--steps 1-40")
    assert_error(_run(root, "--base", root / "base", "--ckpt", f"0={step0}",
                      "--ckpt", f"10={root / 'runs' / 'checkpoint-10'}",
                      "--ckpt", f"20={root / 'runs' / 'checkpoint-20'}",
                      "--out", tmp_path / "out"), "step 0, which is the base")
    assert_ok(_run(root, "--base", root / "base", "--runs", root / "runs", "--steps", "1-40",
                   "--out", tmp_path / "out"))


def test_a_link_beside_the_base_is_not_copied_out_of_its_folder(trajectory: Path,
                                                               tmp_path: Path) -> None:
    """tokenizer.json -> a file elsewhere (/etc/passwd in a downloaded base) was copied into
    OUT and into the store. Links into the model's folder, or where its weight files lead (a
    Hugging Face cache's blobs/), are still followed."""
    root = _copy(trajectory, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for OUT")
    base = root / "base"
    (base / "tokenizer.json").symlink_to(secret)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (base / "model.safetensors").rename(blobs / "weights")
    (base / "model.safetensors").symlink_to(blobs / "weights")
    (blobs / "vocab").write_text("in the cache")
    (base / "vocab.txt").symlink_to(blobs / "vocab")
    (base / "merges.txt").write_text("plain")
    result = _run(root, "--base", base, "--runs", root / "runs", "--out", tmp_path / "out")
    assert_ok(result)
    assert "tokenizer.json: left out of the output (a link to" in result.stderr
    out = tmp_path / "out" / "step-100"
    assert not (out / "tokenizer.json").exists()
    assert (out / "vocab.txt").read_text() == "in the cache"
    assert (out / "merges.txt").read_text() == "plain"
    store_bytes = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert b"not for OUT" not in store_bytes


def test_a_linked_config_does_not_make_its_folder_trusted(trajectory: Path,
                                                          tmp_path: Path) -> None:
    """config.json -> ~/.docker/config.json made that folder a trusted home: the linked config
    and tokenizer.model -> a key file beside it were copied into OUT and the store, unwarned.
    Now both are left out, each warned of once (the base's files were read, and warned
    about, twice), and the missing config is said."""
    root = _copy(trajectory, tmp_path)
    home = tmp_path / "home" / ".docker"
    home.mkdir(parents=True)
    (home / "config.json").write_text('{"auths": {"x": {"auth": "SECRET-AUTH"}}}')
    (home / "key.pem").write_text("SECRET-KEY")
    base = root / "base"
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(home / "config.json")
    (base / "tokenizer.model").symlink_to(home / "key.pem")
    result = _run(root, "--base", base, "--runs", root / "runs", "--out", tmp_path / "out")
    assert_ok(result)
    assert result.stderr.count("tokenizer.model: left out of the output") == 1, result.stderr
    assert result.stderr.count("config.json: left out of the output") == 1, result.stderr
    assert "the output has no config.json" in result.stderr
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert b"SECRET-AUTH" not in written and b"SECRET-KEY" not in written


def _plant_odd_side_files(base: Path) -> dict[str, str]:
    """Side files a run cannot copy, planted beside the base: how each is shown in a warning,
    and what the warning says of it (device nodes and sockets only where they can be made)."""
    import socket
    import stat

    (base / "tokenizer.json").symlink_to("../../blob_gone")  # a cache whose blob was deleted
    os.mkfifo(base / "vocab.json")  # never opened: it would block
    (base / "additional_chat_templates").mkdir()  # transformers' named chat templates
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    (base / "extra").mkdir()
    (base / "chat\u200btemplate.jinja").write_text("{{x}}")
    (base / "tok\nen.json").write_text("{}")
    planted = {
        "tokenizer.json": "a dangling link",
        "vocab.json": "a FIFO",
        "additional_chat_templates": "copy the folder into each output by hand",
        "extra": "a folder",
        repr("chat\u200btemplate.jinja"): "cannot be printed",
        repr("tok\nen.json"): "cannot be printed",
    }
    try:
        os.mknod(base / "merges.txt", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        planted["merges.txt"] = "a character device"
    except PermissionError:  # not root: no device node
        pass
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(str(base / "s.sock"))
            planted["s.sock"] = "a socket"
        except OSError:  # a path too long for a socket address
            pass
    return planted


def test_every_side_file_left_out_is_named_once(trajectory: Path, tmp_path: Path) -> None:
    """A dangling link, a FIFO, a device node, a socket, a non-printable name and a folder
    (transformers' additional_chat_templates/, whose templates the output tokenizer then lacks)
    beside the base were left out of the output without a word, exit 0. Each is now named in
    one warning; the chat templates' says to copy the folder by hand."""
    root = _copy(trajectory, tmp_path)
    base = root / "base"
    planted = _plant_odd_side_files(base)
    result = _run(root, "--base", base, "--runs", root / "runs", "--out", tmp_path / "out")
    assert_ok(result)
    warnings = [line for line in result.stderr.splitlines() if "left out of the output" in line]
    for shown, why in planted.items():
        named = [line for line in warnings if f"{base / shown}: left out" in line]
        assert len(named) == 1 and why in named[0], (shown, result.stderr)
    assert len(warnings) == len(planted), result.stderr
    out = tmp_path / "out" / "step-100"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("where", ["base", "step"])
def test_a_single_file_beside_an_index_of_other_shards_is_refused(trajectory: Path,
                                                                   tmp_path: Path,
                                                                   where: str) -> None:
    """A folder with model.safetensors and an index of other shards was read by the index,
    while transformers loads model.safetensors: every tensor of the prediction changed,
    silently. An index that lists model.safetensors itself is one model, and fine."""
    root = _copy(trajectory, tmp_path)
    folder = root / "base" if where == "base" else root / "runs" / "checkpoint-20"
    other = root / "runs" / "checkpoint-40" / "model.safetensors"
    shutil.copy(other, folder / "model-00001-of-00001.safetensors")
    names = list(load_file(other))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(root)
    assert_error(_run(root, "--base", root / "base", "--runs", root / "runs",
                      "--out", tmp_path / "out"), "ambiguous", str(folder.name))
    assert snapshot(root) == before and not (tmp_path / "out").exists()
    (folder / "model-00001-of-00001.safetensors").unlink()
    index["weight_map"] = dict.fromkeys(names, "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_ok(_run(root, "--base", root / "base", "--runs", root / "runs",
                   "--out", tmp_path / "out"))


@pytest.mark.parametrize("how", ["renamed-over", "rewritten-in-place"])
def test_a_checkpoint_replaced_while_it_is_read_leaves_nothing(trajectory: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               how: str) -> None:
    """A trainer re-saving a step while `run` read it (a rename over the file, or a rewrite in
    place) gave a prediction mixing tensors of both files, exit 0, and the store kept the
    mixed rows for later runs. Now the run stops with one line, writes no output, and keeps
    nothing: a rerun on the restored file equals a run that never saw the swap."""
    from relex_stream import sources

    root = _copy(trajectory, tmp_path)
    weights = (root / "runs" / "checkpoint-20" / "model.safetensors").resolve()
    other = root / "runs" / "checkpoint-30" / "model.safetensors"
    original = weights.read_bytes()
    real_read = sources.read_into
    swapped = []

    def read_then_swap(info, start, out):  # the swap lands after this file's first read
        real_read(info, start, out)
        if not swapped and info.pieces[0].file.resolve() == weights:
            swapped.append(info.name)
            if how == "renamed-over":
                shutil.copy(other, weights.with_suffix(".tmp"))
                os.replace(weights.with_suffix(".tmp"), weights)
            else:
                with open(weights, "r+b") as f:
                    f.write(other.read_bytes())

    monkeypatch.setattr(sources, "read_into", read_then_swap)
    args = ("--base", root / "base", "--runs", root / "runs", "--cache", tmp_path / "s.zarr")
    assert_error(_run(root, *args, "--out", tmp_path / "out"), "changed while it was read",
                 "checkpoint-20")
    assert swapped and not (tmp_path / "out").exists()
    monkeypatch.setattr(sources, "read_into", real_read)
    weights.write_bytes(original)
    assert_ok(_run(root, *args, "--out", tmp_path / "again"))
    assert_ok(_run(root, "--base", root / "base", "--runs", root / "runs",
                   "--cache", tmp_path / "clean.zarr", "--out", tmp_path / "clean"))
    again = load_file(tmp_path / "again" / "step-100" / "model.safetensors")
    clean = load_file(tmp_path / "clean" / "step-100" / "model.safetensors")
    assert again.keys() == clean.keys()
    assert all(torch.equal(again[n], clean[n]) for n in clean)


def test_a_huge_config_is_refused_before_it_is_parsed(trajectory: Path, tmp_path: Path) -> None:
    """A 40 MiB config.json took 36 s and 1.5 GB (and was written out again, twice as large):
    config files are held to the 4 MiB that load_json_object allows everywhere else."""
    root = _copy(trajectory, tmp_path)
    config = root / "base" / "config.json"
    config.write_text('{"model_type": "qwen2", "x": [' + "1.5," * (2 << 20) + "1.5]}")
    before = snapshot(root)
    assert_error(_run(root, "--base", root / "base", "--runs", root / "runs",
                      "--out", tmp_path / "out"), "config.json is larger than 4 MiB")
    assert snapshot(root) == before and not (tmp_path / "out").exists()


def test_inf_at_the_base_is_one_error_line_without_a_numpy_warning(trajectory: Path,
                                                                   tmp_path: Path) -> None:
    """Inf − Inf printed numpy's RuntimeWarning (two more lines) before the error line."""
    root = _copy(trajectory, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    for folder in [root / "base", *sorted((root / "runs").glob("checkpoint-*"))]:
        weights = load_file(folder / "model.safetensors")
        weights[name][1, 1] = float("inf")
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert_error(_run(root, "--base", root / "base", "--runs", root / "runs",
                      "--out", tmp_path / "out"), "holds NaN or Inf values", "overflow")
    result = _run(root, "--base", root / "base", "--runs", root / "runs", "--allow-nonfinite",
                  "--out", tmp_path / "out2")
    assert_ok(result)
    assert "RuntimeWarning" not in result.stderr, result.stderr
    out = load_file(tmp_path / "out2" / "step-100" / "model.safetensors")
    assert torch.equal(out[name], load_file(root / "base" / "model.safetensors")[name])


def _poison(folder: Path, name: str = "model.layers.0.mlp.up_proj.weight") -> None:
    weights = load_file(folder / "model.safetensors")
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_nan_checkpoint_never_reaches_the_store(trajectory: Path, tmp_path: Path) -> None:
    """watch committed a NaN checkpoint's Gram, and so did run --allow-nonfinite; every later
    read then refused the whole store as damaged, the steps before it included. Now watch
    leaves it out with a warning, and run --allow-nonfinite writes its outputs and leaves the
    store as it was."""
    root = _copy(trajectory, tmp_path)
    base, runs, store = root / "base", root / "runs", tmp_path / "store"
    assert_ok(_run(root, "--base", base, "--runs", runs, "--steps", "10-30", "--cache", store,
                   "--out", tmp_path / "o1"))
    _poison(runs / "checkpoint-40")
    before = snapshot(store)
    watched = call("watch", "--runs", runs, "--cache", store, "--base", base, "--target",
                   "100", "--interval", "0.1s", "--settle", "0.1s", "--until", "40",
                   "--device", "cpu")
    assert_ok(watched)  # left out with a warning; --until 40 has come
    assert "holds NaN or Inf values at step 40" in watched.stderr, watched.stderr
    assert "step 40 is left out" in watched.stderr and "--steps" not in watched.stderr
    result = _run(root, "--base", base, "--runs", runs, "--cache", store, "--allow-nonfinite",
                  "--out", tmp_path / "o2")
    assert_ok(result)
    assert "is left as it was" in result.stderr
    assert (tmp_path / "o2" / "step-100" / "model.safetensors").is_file()

    def contents(tree: dict) -> dict:  # rewritten with the same bytes is as it was; watch
        # records the timeline of the steps stored before it started (its catch-up)
        return {path: item[:2] for path, item in tree.items()
                if "lock" not in path and not path.startswith("timeline")}

    assert contents(snapshot(store)) == contents(before)
    result = call("run", "--cache", store, "--target", "100", "--out", tmp_path / "o3")
    assert_ok(result)
    assert "observed steps: 3 (10..30)" in result.stdout, result.stdout


def test_a_link_inside_the_store_is_named_by_its_own_path(tmp_path: Path) -> None:
    """The message named ROOT/<last part> (a path that does not exist) for a link deeper in."""
    from relex_stream.errors import RelexError
    from relex_stream.safefs import open_root, opened_dir

    (tmp_path / "store" / "gen1" / "rows").mkdir(parents=True)
    (tmp_path / "store" / "gen1" / "rows" / "g0").symlink_to(tmp_path)
    fd = open_root(tmp_path / "store")
    try:
        with pytest.raises(RelexError, match=r"^S/gen1/rows/g0 is a symbolic link"), \
                opened_dir(fd, ("gen1", "rows", "g0", "c"), False, "S"):
            pass
    finally:
        os.close(fd)


def test_a_prediction_is_never_read_back_as_an_observed_step(trajectory: Path,
                                                              tmp_path: Path) -> None:
    """run --cache S --out RUNS wrote step-300 into the runs directory, and the next run took
    the prediction as an observed checkpoint. Every file relex_stream writes says it is a
    prediction; as a base (RL continued from it) it is fine, as an observed step it is not."""
    root = _copy(trajectory, tmp_path)
    runs = root / "runs"
    assert_ok(_run(root, "--base", root / "base", "--runs", runs, "--out", tmp_path / "first"))
    assert_ok(call("run", "--cache", tmp_path / "first" / "trajectory.zarr", "--target", "300",
                   "--out", runs, "--quiet"))
    metadata = _metadata(runs / "step-300" / "model.safetensors")
    assert metadata["format"] == "pt" and "relex_stream_prediction" in metadata
    before = snapshot(tmp_path)
    assert_error(_run(root, "--base", root / "base", "--runs", runs, "--out", tmp_path / "o2"),
                 "step-300 was written by relex_stream", "--steps")
    assert_error(_run(root, "--base", root / "base", "--ckpt", f"10={runs / 'checkpoint-10'}",
                      "--ckpt", f"300={runs / 'step-300'}", "--out", tmp_path / "o2"),
                 "written by relex_stream")
    assert snapshot(tmp_path) == before
    assert_ok(_run(root, "--base", root / "base", "--runs", runs, "--steps", "1-40",
                   "--out", tmp_path / "o3"))
    assert_ok(call("run", "--base", runs / "step-300", "--ckpt", f"310={runs / 'checkpoint-40'}",
                   "--ckpt", f"320={runs / 'checkpoint-30'}", "--target", "400", "--quiet",
                   "--out", tmp_path / "o4"))


def _metadata(path: Path) -> dict:
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]
