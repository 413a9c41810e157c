"""relex_stream.synth profiles: 'planted' (default), realistic 'drift' and a pure random 'walk'."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from relex_stream import synth
from relex_stream.errors import RelexError
from relex_stream.synth import (
    DRIFT_LR,
    _base_and_directions,
    _bf16_exact,
    qwen2_config,
    qwen2_shapes,
    simulate,
    write_trajectory,
)


def _bits(directory: Path) -> torch.Tensor:
    tensors = load_file(directory / "model.safetensors")
    return torch.cat([tensors[name].flatten().view(torch.int16) for name in sorted(tensors)])


def _load(out: Path, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    base = _bits(out / "base")
    rows = torch.stack([_bits(out / "runs" / f"checkpoint-{s}") for s in steps])
    return base, rows


def test_planted_is_the_default(tmp_path: Path) -> None:
    steps = [10, 20, 30]
    write_trajectory(tmp_path / "a", steps, seed=4)
    write_trajectory(tmp_path / "b", steps, seed=4, profile="planted", noise=0.1)
    for name in ["base", "runs/checkpoint-10", "runs/checkpoint-30"]:
        assert (tmp_path / "a" / name / "model.safetensors").read_bytes() == (
            tmp_path / "b" / name / "model.safetensors"
        ).read_bytes()


def test_drift_changes_few_bf16_elements(tmp_path: Path) -> None:
    """Consecutive steps: >99% unchanged step to step, 70-97% never changed over 30 steps."""
    steps = list(range(1, 31))
    write_trajectory(tmp_path / "d", steps, seed=1, hidden=128, profile="drift")
    base, rows = _load(tmp_path / "d", steps)
    previous = torch.cat([base[None], rows[:-1]])
    unchanged_consecutive = (rows == previous).float().mean().item()
    never_changed = (rows == base).all(dim=0).float().mean().item()
    assert unchanged_consecutive > 0.99
    assert 0.7 < never_changed < 0.97
    assert never_changed < 1.0 and (rows[-1] != base).any()
    # the change is a drift: the last step moved further from the base than the first
    assert (rows[-1] != base).sum() > 3 * (rows[0] != base).sum()


def test_drift_base_is_the_planted_base(tmp_path: Path) -> None:
    write_trajectory(tmp_path / "p", [1, 2], seed=2)
    write_trajectory(tmp_path / "d", [1, 2], seed=2, profile="drift")
    assert torch.equal(_bits(tmp_path / "p" / "base"), _bits(tmp_path / "d" / "base"))


def test_walk_is_a_visible_random_walk(tmp_path: Path) -> None:
    steps = list(range(10, 81, 10))
    write_trajectory(tmp_path / "w", steps, seed=3, profile="walk")
    tensors = [
        load_file(tmp_path / "w" / "runs" / f"checkpoint-{s}" / "model.safetensors") for s in steps
    ]
    base = load_file(tmp_path / "w" / "base" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([t[name].float() - base[name].float() for t in tensors]).flatten(1)
    rms = deltas.pow(2).mean(dim=1).sqrt()
    assert 1.5e-3 < rms[-1].item() < 2.6e-3  # ~2e-3 at the last step
    assert rms[0].item() < 0.6 * rms[-1].item()  # spreads like sqrt(t)
    assert abs(deltas[-1].mean().item()) < 0.05 * rms[-1].item()  # zero mean: no drift
    increments = deltas[1:] - deltas[:-1]
    cosine = torch.nn.functional.cosine_similarity(increments[1:], increments[:-1], dim=1)
    assert cosine.abs().max().item() < 0.1  # independent increments


def test_fast_path_matches_every_step_simulation() -> None:
    """Consecutive steps: the listed-steps path and the step-by-step fp32 master are the same."""
    g = torch.Generator().manual_seed(0)
    base, directions = _base_and_directions({"w": (1000, 200), "norm.weight": (200,)}, g)
    base = {name: _bf16_exact(w) for name, w in base.items()}
    steps = list(range(1, 11))
    runs = [
        [
            t
            for _, t in simulate(
                base,
                directions,
                steps,
                torch.Generator().manual_seed(1),
                "drift",
                lr=1e-6,
                every_step=every,
                save_dtype="float32",
            )
        ]
        for every in (False, True)
    ]
    for fast, slow in zip(*runs, strict=True):
        for name in base:
            assert torch.equal(fast[name], slow[name])
    # strided steps: same distribution, different draws
    fast = [
        t["w"]
        for _, t in simulate(
            base, directions, [5, 10], torch.Generator().manual_seed(2), "drift", lr=1e-6
        )
    ]
    slow = [
        t["w"]
        for _, t in simulate(
            base,
            directions,
            [5, 10],
            torch.Generator().manual_seed(3),
            "drift",
            lr=1e-6,
            every_step=True,
        )
    ]
    for a, b in zip(fast, slow, strict=True):
        changed_a = (a != base["w"].to(torch.bfloat16)).float().mean().item()
        changed_b = (b != base["w"].to(torch.bfloat16)).float().mean().item()
        assert abs(changed_a - changed_b) < 0.01


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(RelexError, match="profile"):
        write_trajectory(tmp_path / "x", [1, 2], profile="sine")


# --------------------------------------------------------------------------- dtypes


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def _header_dtypes(directory: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118
    return dtypes


def test_fp32_checkpoints_are_the_master_weights(tmp_path: Path) -> None:
    """bf16 base, fp32 checkpoints: each is the fp32 master whose bf16 rounding a bf16 run saves."""
    steps = [1, 2, 3, 10]
    common = {"seed": 5, "hidden": 32, "vocab": 96, "profile": "drift"}
    write_trajectory(tmp_path / "f", steps, save_dtype="float32", base_dtype="bfloat16", **common)
    write_trajectory(tmp_path / "b", steps, **common)
    assert _header_dtypes(tmp_path / "f" / "base") == {"BF16"}
    assert _header_dtypes(tmp_path / "f" / "runs" / "checkpoint-1") == {"F32"}
    config = json.loads((tmp_path / "f" / "runs" / "checkpoint-1" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    base = _tensors(tmp_path / "f" / "base")
    assert _tensors(tmp_path / "b" / "base").keys() == base.keys()
    previous = {name: t.float() for name, t in base.items()}
    for step in steps:
        fp32 = _tensors(tmp_path / "f" / "runs" / f"checkpoint-{step}")
        bf16 = _tensors(tmp_path / "b" / "runs" / f"checkpoint-{step}")
        name = "model.layers.1.mlp.up_proj.weight"
        assert fp32[name].dtype == torch.float32
        assert torch.equal(fp32[name].to(torch.bfloat16), bf16[name])
        changed = (fp32[name] != previous[name]).float().mean().item()
        step_size = (fp32[name] - previous[name]).abs().max().item()
        assert changed > 0.99  # almost every fp32 element moves at every saved step ...
        assert step_size < 10 * DRIFT_LR * (step if step == 1 else 7)  # ... by a few lr
        previous = fp32
    # the master starts at the bf16 base: step 1 is one small step away from it
    one = _tensors(tmp_path / "f" / "runs" / "checkpoint-1")
    assert all((one[n] - base[n].float()).abs().max() < 10 * DRIFT_LR for n in base)


def test_every_step_takes_the_same_steps_as_consecutive_saves(tmp_path: Path) -> None:
    """every_step with step 6 alone gives the master a listing of 1..6 holds at 6, bit for bit."""
    common = {"hidden": 32, "vocab": 64, "profile": "drift", "save_dtype": "float32", "seed": 2}
    write_trajectory(tmp_path / "all", [1, 2, 3, 4, 5, 6], **common)
    write_trajectory(tmp_path / "every", [0, 6], every_step=True, **common)
    write_trajectory(tmp_path / "jump", [0, 6], **common)
    six = (tmp_path / "all" / "runs" / "checkpoint-6" / "model.safetensors").read_bytes()
    assert (tmp_path / "every" / "runs" / "checkpoint-6" / "model.safetensors").read_bytes() == six
    jump = _tensors(tmp_path / "jump" / "runs" / "checkpoint-6")
    every = _tensors(tmp_path / "every" / "runs" / "checkpoint-6")
    name = "model.embed_tokens.weight"
    assert not torch.equal(jump[name], every[name])  # one step of 6: other draws, same spread
    base = _tensors(tmp_path / "jump" / "runs" / "checkpoint-0")[name]
    spread = [(t[name] - base).std().item() for t in (jump, every)]
    assert 0.8 < spread[0] / spread[1] < 1.25
    assert torch.equal(base, _tensors(tmp_path / "all" / "base")[name].float())


def test_fp32_base_with_bf16_checkpoints(tmp_path: Path) -> None:
    """The reverse case: the master starts at the unrounded fp32 base; checkpoints are bf16."""
    write_trajectory(
        tmp_path / "r", [1, 2], hidden=32, vocab=64, profile="drift", base_dtype="float32"
    )
    write_trajectory(tmp_path / "b", [1, 2], hidden=32, vocab=64, profile="drift")
    assert _header_dtypes(tmp_path / "r" / "base") == {"F32"}
    assert _header_dtypes(tmp_path / "r" / "runs" / "checkpoint-2") == {"BF16"}
    base32 = _tensors(tmp_path / "r" / "base")["model.layers.0.mlp.down_proj.weight"]
    base16 = _tensors(tmp_path / "b" / "base")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(base32.to(torch.bfloat16), base16)  # the same W_0, saved in fp32
    assert not torch.equal(base32, base16.float())


def test_float16_saves(tmp_path: Path) -> None:
    write_trajectory(tmp_path / "h", [1, 2], hidden=32, vocab=64, save_dtype="float16")
    assert _header_dtypes(tmp_path / "h" / "base") == {"F16"}
    assert _header_dtypes(tmp_path / "h" / "runs" / "checkpoint-2") == {"F16"}


# --------------------------------------------------------------------------- shapes


def test_qwen25_1_5b_shapes_match_transformers() -> None:
    """The 1.5B config is a real Qwen2 config: transformers builds exactly our tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = {"intermediate": 8960, "heads": 12, "kv_heads": 2}
    config = qwen2_config(1536, 28, 151936, True, **sizes)
    assert config["head_dim"] == 128
    assert sum(math.prod(s) for s in qwen2_shapes(config).values()) == 1_543_714_304
    two_layers = qwen2_config(1536, 2, 151936, True, **sizes)  # every layer has the same shapes
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**two_layers))
    theirs = {n: tuple(p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight"}
    assert qwen2_shapes(two_layers) == theirs


def test_written_model_with_custom_heads_loads(tmp_path: Path) -> None:
    """heads·head_dim != hidden, GQA and a custom intermediate size: transformers loads and runs."""
    from transformers import AutoModelForCausalLM

    out = write_trajectory(
        tmp_path / "m", [1, 2], hidden=48, layers=2, vocab=80, intermediate=72, heads=4,
        kv_heads=2, head_dim=16, profile="drift", save_dtype="float32", shard_bytes=20_000,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out / "runs" / "checkpoint-2")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (72, 48)
    assert model.dtype == torch.float32
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 80) and torch.isfinite(logits).all()
    saved = _tensors(out / "runs" / "checkpoint-2")
    loaded = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(loaded, saved["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"save_dtype": "float64"}, "save_dtype"),
        ({"base_dtype": "int8"}, "base_dtype"),
        ({"heads": 6, "kv_heads": 4}, "multiple of kv_heads"),
        ({"head_dim": 7}, "even"),
        ({"intermediate": 0}, "intermediate"),
        ({"delay_s": -1.0}, "delay"),
        ({"lr": float("nan"), "profile": "drift"}, "lr"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict, needle: str) -> None:
    with pytest.raises(RelexError, match=needle):
        write_trajectory(tmp_path / "x", [1, 2], **options)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- watching and growing


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _look(out: Path, final: dict[str, bytes], seen: dict[str, list[str]]) -> None:
    """One look at a growing trajectory: note partial files, early indexes, configs late."""
    for directory in [out / "base", *(out / "runs").glob("checkpoint-*")]:
        where = directory.relative_to(out)
        sizes = {p.name: p.stat().st_size for p in directory.glob("*") if p.is_file()}
        partial = [
            f"{where}/{name}"
            for name, size in sizes.items()
            if name.endswith(".safetensors") and size < len(final[f"{where}/{name}"])
        ]
        seen["partial"] += partial
        if "model.safetensors.index.json" in sizes:
            seen["index before its shards"] += partial
        if any(k.endswith(".safetensors") for k in sizes) and "config.json" not in sizes:
            seen["shards before config"].append(str(where))


def test_a_watcher_sees_files_appear_one_by_one(tmp_path: Path) -> None:
    """delay_s: checkpoints arrive apart, shards are seen half-written, the index comes last."""
    import threading

    options = {"hidden": 32, "vocab": 64, "profile": "drift", "shard_bytes": 12_000}
    write_trajectory(tmp_path / "ref", [1, 2], **options)
    final = _all_bytes(tmp_path / "ref")
    out = tmp_path / "live"
    kwargs = {**options, "delay_s": 0.2}
    writer = threading.Thread(target=write_trajectory, args=(out, [1, 2]), kwargs=kwargs)
    seen: dict[str, list[str]] = {"partial": [], "index before its shards": []}
    seen["shards before config"] = []
    writer.start()
    while writer.is_alive():
        _look(out, final, seen)
        time.sleep(0.005)
    writer.join()
    assert any(k.startswith("runs/checkpoint-") for k in seen["partial"])
    assert not seen["index before its shards"] and not seen["shards before config"]
    assert _all_bytes(out) == final  # pacing changes when bytes appear, not which


@pytest.mark.parametrize(
    "options",
    [
        {"profile": "drift", "save_dtype": "float32", "base_dtype": "bfloat16"},
        {"profile": "drift", "every_step": True, "shard_bytes": 30_000},
        {"profile": "walk", "lr": 1e-4, "save_dtype": "float16"},
    ],
)
def test_appending_gives_the_one_go_bytes(tmp_path: Path, options: dict) -> None:
    common = {"seed": 9, "hidden": 32, "vocab": 64, **options}
    write_trajectory(tmp_path / "one", [2, 4, 6, 9, 12], **common)
    write_trajectory(tmp_path / "grown", [2, 4], **common)
    write_trajectory(tmp_path / "grown", [2, 4, 6], append=True, **common)  # skips 2, 4
    write_trajectory(tmp_path / "grown", [9, 12], append=True, **common)
    assert _all_bytes(tmp_path / "grown") == _all_bytes(tmp_path / "one")
    recorded = json.loads((tmp_path / "grown" / "synth.json").read_text())
    assert recorded["steps"] == [2, 4, 6, 9, 12]


def test_blocks_split_large_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors larger than a block: written, gathered in memory and appended all agree."""
    monkeypatch.setattr(synth, "BLOCK", 1000)
    common = {"hidden": 32, "vocab": 64, "profile": "drift", "save_dtype": "float32"}
    write_trajectory(tmp_path / "one", [1, 3, 4], **common)
    write_trajectory(tmp_path / "grown", [1], append=True, **common)
    write_trajectory(tmp_path / "grown", [3, 4], append=True, **common)
    assert _all_bytes(tmp_path / "grown") == _all_bytes(tmp_path / "one")
    spec = synth.make_spec([1, 3, 4], **common)
    for step, tensors in synth.iter_tensors(spec, [1, 3, 4]):
        where = "base" if step is None else f"runs/checkpoint-{step}"
        saved = _tensors(tmp_path / "one" / where)
        assert saved.keys() == tensors.keys()
        assert all(torch.equal(saved[n], tensors[n]) for n in saved)
    embed = _tensors(tmp_path / "one" / "base")["model.embed_tokens.weight"].flatten()
    assert embed[:1000].std() > 0.01 and not torch.equal(embed[:1000], embed[1000:2000])


def test_append_refusals(tmp_path: Path) -> None:
    common = {"hidden": 32, "vocab": 64, "profile": "drift"}
    write_trajectory(tmp_path / "d", [1, 2], **common)
    with pytest.raises(RelexError, match="lr=2e-07"):
        write_trajectory(tmp_path / "d", [3], append=True, lr=1e-6, **common)
    with pytest.raises(RelexError, match="after it"):
        write_trajectory(tmp_path / "d", [0], append=True, **common)
    with pytest.raises(RelexError, match="either append or overwrite"):
        write_trajectory(tmp_path / "d", [3], append=True, overwrite=True, **common)
    (tmp_path / "d" / "runs" / "checkpoint-3").mkdir()
    with pytest.raises(RelexError, match="did not finish"):
        write_trajectory(tmp_path / "d", [3], append=True, **common)
    write_trajectory(tmp_path / "p", [1, 2], hidden=32, vocab=64)
    with pytest.raises(RelexError, match="planted"):
        write_trajectory(tmp_path / "p", [3], append=True, hidden=32, vocab=64)
    write_trajectory(tmp_path / "w", [1, 2], hidden=32, vocab=64, profile="walk")
    with pytest.raises(RelexError, match="give lr"):
        write_trajectory(tmp_path / "w", [3], append=True, hidden=32, vocab=64, profile="walk")
    (tmp_path / "other").mkdir()
    with pytest.raises(RelexError, match="synth.json"):
        write_trajectory(tmp_path / "other", [1], append=True, **common)
    with pytest.raises(RelexError, match="already exists"):
        write_trajectory(tmp_path / "d", [1, 2], **common)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_rounding_to_the_saved_dtype_matches_torch(dtype: str) -> None:
    """synth rounds in numpy: the same bits as torch's .to(dtype), ties, subnormals and Inf too."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        0.02 * torch.randn(100_000, generator=g),
        torch.randn(1000, generator=g) * 1e-40,  # fp32 subnormals
        torch.randn(1000, generator=g) * 1e5,  # beyond fp16's range: Inf
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38]),
    ])  # fmt: skip
    high = torch.randint(0, 0x7F7F, (1000,), generator=g, dtype=torch.int32)  # finite, positive
    ties = (high << 16 | 0x8000).view(torch.float32)  # exactly halfway between two bf16
    values = torch.cat([values, ties, -ties])
    saved = synth._saved(values.numpy(), dtype)
    theirs = values.to(synth.DTYPES[dtype][0])
    bits = torch.int16 if theirs.itemsize == 2 else torch.int32
    ours = torch.from_numpy(saved.view(np.int16 if saved.itemsize == 2 else np.int32))
    assert torch.equal(ours, theirs.view(bits))
    assert torch.equal(torch.from_numpy(synth._held(saved)), theirs.float())


def test_overwrite_replaces_only_a_trajectory_synth_wrote(tmp_path: Path) -> None:
    common = {"hidden": 32, "vocab": 64}
    write_trajectory(tmp_path / "ours", [1, 2], **common)
    write_trajectory(tmp_path / "ours", [1, 2, 3], overwrite=True, **common)  # its own: replaced
    assert (tmp_path / "ours" / "runs" / "checkpoint-3").is_dir()
    (tmp_path / "empty").mkdir()
    write_trajectory(tmp_path / "empty", [1, 2], overwrite=True, **common)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "ours" / "notes.txt").write_text("keep me too")
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    (tmp_path / "file").write_text("a file")
    for name in ("mine", "ours", "link", "file"):
        before = sorted(p.name for p in (tmp_path / name).rglob("*")) if name != "file" else []
        with pytest.raises(RelexError, match="synth"):
            write_trajectory(tmp_path / name, [1, 2], overwrite=True, **common)
        if name != "file":
            assert sorted(p.name for p in (tmp_path / name).rglob("*")) == before
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "a file"


def test_refuses_a_trajectory_the_disk_or_memory_cannot_hold(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Checked before a byte is written: a hostile --hidden/--layers once wrote 11 GB before
    anyone noticed it would need 147,000 TiB."""
    from collections import namedtuple

    import psutil

    common = {"hidden": 32, "vocab": 64}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage(10**6, 0, 10**5))
    with pytest.raises(RelexError, match="free; choose smaller shapes"):
        write_trajectory(tmp_path / "disk", [1, 2], **common)
    assert not (tmp_path / "disk").exists()
    monkeypatch.undo()
    memory = psutil.virtual_memory()._replace(available=1000)
    monkeypatch.setattr(synth.psutil, "virtual_memory", lambda: memory)
    with pytest.raises(RelexError, match="fp32 master weights"):
        write_trajectory(tmp_path / "memory", [1, 2], profile="drift", **common)
    assert not (tmp_path / "memory").exists()
    write_trajectory(tmp_path / "planted", [1, 2], **common)  # keeps no master


@pytest.mark.parametrize("damage", ["deep", "fifo", "list"])
def test_append_to_a_damaged_record_is_one_error(tmp_path: Path, damage: str) -> None:
    """synth.json is read as every JSON input is: a deeply nested one (a RecursionError), a FIFO
    (waited on forever) or the wrong type each give the one refusal."""
    import os

    common = {"hidden": 32, "vocab": 64, "profile": "drift"}
    write_trajectory(tmp_path / "d", [1, 2], **common)
    record = tmp_path / "d" / synth.SPEC_FILE
    record.unlink()
    if damage == "fifo":
        os.mkfifo(record)
    else:
        record.write_text("[" * 100_000 if damage == "deep" else "[1, 2]")
    with pytest.raises(RelexError, match="cannot be appended"):
        write_trajectory(tmp_path / "d", [3], append=True, **common)


def test_synth_overwrite_replaces_only_what_synth_wrote(tmp_path: Path) -> None:
    """A file synth does not write inside base/ or runs/ makes --overwrite refuse with one
    line, deleting nothing; without it, --overwrite replaces the trajectory."""
    from tests.untrusted import assert_error, assert_ok, call

    args = ["synth", "--out", tmp_path / "s", "--steps", "10-20:10", "--hidden", "16",
            "--layers", "1", "--vocab", "32"]
    assert_ok(call(*args))
    assert_ok(call(*args, "--overwrite"))
    for planted in ("runs/notes.txt", "base/tokenizer.json", "runs/checkpoint-10/extra/x",
                    "runs/global_step_5/x"):
        (tmp_path / "s" / planted).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / planted).write_text("mine")
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert_error(call(*args, "--overwrite"), "not written by synth")
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
        (tmp_path / "s" / planted).unlink()
        if planted.count("/") > 1:  # the directory made for it goes too
            (tmp_path / "s" / planted).parent.rmdir()


def test_synth_every_step_is_bounded(tmp_path: Path) -> None:
    """--every-step walks every step: a last step of 10**8 is refused before anything is
    written (it allocated GBs, then died with a MemoryError traceback)."""
    from tests.untrusted import assert_error, call

    assert_error(call("synth", "--out", tmp_path / "s", "--steps", "1,100000000",
                      "--every-step", "--profile", "drift", "--hidden", "16", "--layers", "1",
                      "--vocab", "32"), "--every-step")
    assert not (tmp_path / "s").exists()


def test_synth_layers_are_bounded_before_the_shapes_are_listed(tmp_path: Path) -> None:
    """--layers 16777216 listed 200M tensor shapes (7 GB, a minute) before the size check."""
    from tests.untrusted import assert_error, call

    assert_error(call("synth", "--out", tmp_path / "s", "--layers", "16777216"), "layers")
    assert not (tmp_path / "s").exists()
