"""report and backtest on stores built by the real CLI: numbers, verdicts, files and errors."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_stream.backtest import backtest
from relex_stream.cli import main as cli_main
from relex_stream.diagnostics import tensor_stats
from relex_stream.errors import RelexError
from relex_stream.methods import combination_weights, parse_method
from relex_stream.report import REPORT_FILES, finite_values, load_grams, report
from relex_stream.report_cli import REPORT_HANDLERS, add_report_parsers
from relex_stream.store import TrajectoryStore
from relex_stream.units import parse_windows
from tests.fixtures import EMBED, INT_BUFFER, LM_HEAD, ZERO_DELTA
from tests.helpers import run_cli

STEPS = list(range(10, 130, 10))  # 12 observed steps; the last 4 are held out
SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.up_proj.weight": (64, 32),
    "model.layers.1.mlp.up_proj.weight": (64, 32),
    "model.norm.weight": (32,),
}


def write_own_trajectory(root: Path, kind: str, noise: float, seed: int) -> None:
    """root/base and root/runs/checkpoint-N in float32: 'walk' (no drift) or 'line' (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    t_max = STEPS[-1]
    base = {name: 0.02 * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    direction = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    walked = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for directory, tensors in [("base", base)] + [(f"runs/checkpoint-{t}", None) for t in STEPS]:
        if tensors is None:
            step = int(directory.rsplit("-", 1)[1])
            tensors = {}
            for name, shape in SHAPES.items():
                walked[name] += 1e-3 * torch.randn(shape, generator=g)
                drift = 2e-3 * step / t_max * direction[name]
                shake = noise * 2e-3 * torch.randn(shape, generator=g)
                tensors[name] = base[name] + (walked[name] if kind == "walk" else drift + shake)
        (root / directory).mkdir(parents=True)
        save_file(tensors, str(root / directory / "model.safetensors"), metadata={"format": "pt"})
        (root / directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}))


def cli(*args: object) -> None:
    """The real CLI, in this process (saves an interpreter start per store)."""
    assert cli_main([str(a) for a in args]) == 0, args


def build_store(root: Path) -> Path:
    """Run the real CLI on root/base + root/runs; return the store it wrote."""
    cli("run", "--base", root / "base", "--runs", root / "runs", "--target", STEPS[-1] + 20,
            "--out", root / "out", "--device", "cpu", "--quiet")
    return root / "out" / "trajectory.zarr"


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    cli("synth", "--out", root / "traj", "--steps", "10-80:10", "--hidden", "32", "--vocab", "128")
    cli("run", "--base", root / "traj" / "base", "--runs", root / "traj" / "runs", "--target", 100,
        "--out", root / "out", "--device", "cpu", "--quiet")
    return root / "out" / "trajectory.zarr"


@pytest.fixture(scope="module")
def line_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("line")
    write_own_trajectory(root, "line", noise=0.1, seed=0)
    return build_store(root)


@pytest.fixture(scope="module")
def walk_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("walk")
    write_own_trajectory(root, "walk", noise=0.0, seed=1)
    return build_store(root)


def test_report_numbers_come_from_the_stored_grams(synth_store: Path) -> None:
    result = report(synth_store, null_samples=50, seed=3)
    store = TrajectoryStore.open(synth_store)
    layout = store.current.layout.tensors
    assert sorted(t.name for t in result.tensors) == sorted(layout)  # all bf16, none tied
    steps = torch.tensor(result.steps, dtype=torch.float64)
    whole = torch.zeros(len(steps), len(steps), dtype=torch.float64)
    for entry in result.tensors:
        gram = store.gram(entry.name)
        whole += gram
        assert entry.stats == tensor_stats(gram, steps, null_samples=50, seed=3)
    assert result.model == tensor_stats(whole, steps, null_samples=50, seed=3)
    assert result.by_name("model.layers.1.mlp.up_proj.weight").layer == 1
    assert result.by_name("model.layers.1.mlp.up_proj.weight").module == "mlp.up_proj"
    assert result.by_name("lm_head.weight").layer is None


def test_report_writes_json_csv_summary_and_plots(synth_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = report(synth_store.parent, out, null_samples=20)  # a run's --out works too
    names = {p.name for p in result.files}
    assert {"report.json", "report.csv", "summary.txt", "coefficients.png", "histograms.png",
            "by_layer.png", "by_module.png"} <= names
    data = json.loads((out / "report.json").read_text())
    assert len(data["tensors"]) == len(result.tensors)
    assert data["model"]["null"]["samples"] == 20
    assert len(data["tensors"][0]["coefficients"]) == len(result.steps)
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.tensors)
    assert {"explained_variance", "r_squared", "spectral_gap", "path_efficiency",
            "null_ev_p95"} <= set(rows[0])
    summary = (out / "summary.txt").read_text()
    assert "explained variance" in summary and "lowest R²" in summary and "verdict:" in summary
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int_tied_and_motionless_tensors(make_traj, tmp_path: Path) -> None:
    traj = make_traj(tied=True, steps=(10, 20, 30, 40, 50))
    cli("run", "--base", traj.base, "--runs", traj.runs, "--target", 60, "--out",
        tmp_path / "out", "--device", "cpu", "--quiet")
    result = report(tmp_path / "out", tmp_path / "rep", null_samples=10, plots=False)
    names = {t.name for t in result.tensors}
    assert INT_BUFFER not in names and LM_HEAD not in names and EMBED in names  # int, alias
    still = result.by_name(ZERO_DELTA).stats
    assert math.isnan(still.fit.explained_variance) and math.isnan(still.path_efficiency)
    assert any("never moved" in line for line in result.lines())
    data = json.loads((tmp_path / "rep" / "report.json").read_text())  # strict JSON: no NaN
    assert next(t for t in data["tensors"] if t["name"] == ZERO_DELTA)["r_squared"] is None
    checked = backtest(tmp_path / "out", holdout=2, out_dir=tmp_path / "bt", plots=False)
    assert all(math.isnan(e) for e in checked.rows[0].tensor_errors[ZERO_DELTA])
    assert all(math.isfinite(e) for row in checked.rows for e in row.errors)
    json.loads((tmp_path / "bt" / "backtest.json").read_text())


def _explicit_deltas(trajectory: Path) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Observed steps and per tensor D (K, n) float64, straight from the safetensors files."""
    base = load_file(str(trajectory / "base" / "model.safetensors"))
    steps = list(range(10, 90, 10))
    rows = [load_file(str(trajectory / "runs" / f"checkpoint-{s}" / "model.safetensors"))
            for s in steps]
    deltas = {
        name: torch.stack([r[name].double().flatten() - w0.double().flatten() for r in rows])
        for name, w0 in base.items()
    }
    return steps, deltas


def assert_relative(got: list[float], want: torch.Tensor) -> None:
    """Each value within 1e-6 relative of the explicit float64 one."""
    got_tensor = torch.tensor(got, dtype=torch.float64)
    assert torch.allclose(got_tensor, want, rtol=1e-6, atol=0), (got, want.tolist())


@pytest.mark.parametrize("spec", ["relex", "relex:rank=2,fit=poly:2", "raw-ols", "two-point",
                                  "expo:alpha=0.5"])
def test_backtest_error_equals_error_of_explicit_deltas(synth_store: Path, spec: str) -> None:
    steps, deltas = _explicit_deltas(synth_store.parents[1] / "traj")
    result = backtest(synth_store, holdout=3, windows=[4], methods=[spec])
    (row,) = result.rows
    window, targets = [1, 2, 3, 4], [5, 6, 7]  # the last 4 of the 5 steps before the held-out 3
    error_sq = torch.zeros(len(targets), dtype=torch.float64)
    norm_sq = torch.zeros(len(targets), dtype=torch.float64)
    for name, d in deltas.items():
        weights = combination_weights(parse_method(spec), d[window] @ d[window].T,
                                      torch.tensor([steps[i] for i in window]),
                                      [steps[j] for j in targets])
        miss = (d[targets] - weights @ d[window]).norm(dim=1) ** 2
        error_sq += miss
        norm_sq += d[targets].norm(dim=1) ** 2
        want = (miss / (d[targets].norm(dim=1) ** 2)).sqrt()
        assert_relative(row.tensor_errors[name], want)
    assert_relative(row.errors, (error_sq / norm_sq).sqrt())
    assert row.window_steps == [20, 30, 40, 50] and row.heldout_steps == [60, 70, 80]
    assert row.distances == [10.0, 20.0, 30.0]


def test_planted_line_ranks_relex_first_and_says_extrapolate(line_store: Path) -> None:
    result = backtest(line_store, holdout=4)
    by_method = {row.method: row for row in result.rows}
    relex = by_method["relex"]
    assert relex.mean_error < by_method["raw-ols"].mean_error < by_method["two-point"].mean_error
    assert result.ranking()[0].method == "relex"
    assert relex.reach == 40.0 and "stays under 0.3 at every held-out step" in relex.verdict
    assert "do not extrapolate" not in "\n".join(result.lines())
    diagnosis = report(line_store, null_samples=200)
    assert diagnosis.straight is True
    assert diagnosis.model.ev_above_null and diagnosis.model.r2_above_null


def test_random_walk_is_inside_its_null_and_says_do_not_extrapolate(walk_store: Path) -> None:
    diagnosis = report(walk_store, null_samples=200)
    low, _, high = diagnosis.model.null.explained_variance
    assert low <= diagnosis.model.fit.explained_variance <= high
    assert diagnosis.straight is False
    assert any("not distinguishable from a random walk" in line for line in diagnosis.lines())
    result = backtest(walk_store, holdout=4, methods=["relex", "raw-ols", "two-point"])
    for row in result.rows:
        assert row.reach is None and "do not extrapolate" in row.verdict, row.verdict


def test_backtest_windows_methods_and_files(synth_store: Path, tmp_path: Path) -> None:
    methods = ["relex", "relex:rank=2", "two-point:from=0", "expo:alpha=0.5"]
    result = backtest(synth_store, holdout=2, windows=parse_windows("3,all"), methods=methods,
                      threshold=0.5, out_dir=tmp_path / "bt")
    assert [(r.method, r.window) for r in result.rows] == [(m, w) for w in (3, 6) for m in methods]
    expo = [r for r in result.rows if r.method == "expo:alpha=0.5"]
    assert expo[0].errors == expo[1].errors  # ExPO ignores the window and the target
    data = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert len(data["rows"]) == 8 and data["holdout_steps"] == [70, 80]
    assert (tmp_path / "bt" / "backtest.png").read_bytes()[:4] == b"\x89PNG"
    text = "\n".join(result.lines())
    assert "held-out step" in text and "relex:rank=2 [window 3]" in text
    assert "lowest mean error" in text


def test_cli_handlers(synth_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_report_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(synth_store), "--null-samples", "10"])
    REPORT_HANDLERS[args.command](args)
    assert "pass --out DIR" in capsys.readouterr().out
    args = parser.parse_args(["backtest", str(synth_store), "--holdout", "2", "--windows", "4,all",
                              "--methods", "relex", "two-point:from=30,to=60", "--threshold",
                              "0.25", "--out", str(tmp_path / "bt"), "--no-plots"])
    REPORT_HANDLERS[args.command](args)
    out = capsys.readouterr().out
    assert "two-point:from=30,to=60 [window 4]" in out and "under 0.25" in out
    assert not (tmp_path / "bt" / "backtest.png").exists()


@pytest.mark.skipif(
    "report" not in __import__("relex_stream.cli").cli.build_parser().format_help(),
    reason="report/backtest not yet hooked into cli.py",
)
def test_commands_through_python_m(synth_store: Path, tmp_path: Path) -> None:
    proc = run_cli("report", synth_store, "--out", tmp_path / "rep", "--no-plots")
    assert "whole model" in proc.stdout
    proc = run_cli("backtest", synth_store, "--holdout", "3", "--methods", "relex", "raw-ols")
    assert "lowest mean error" in proc.stdout
    proc = run_cli("backtest", synth_store, "--holdout", "9", expect_rc=2)
    assert "--holdout 9" in proc.stderr


@pytest.mark.parametrize("call,needle", [
    (lambda s: backtest(s, holdout=7), "hold out 1 to 6"),
    (lambda s: backtest(s, holdout=0), "hold out 1 to 6"),
    (lambda s: backtest(s, holdout=2, windows=[7]), "a window holds 2 to 6 steps"),
    (lambda s: backtest(s, holdout=2, windows=[1]), "a window holds 2 to 6 steps"),
    (lambda s: backtest(s, holdout=2, methods=["reconstruct"]), "cannot predict held-out"),
    (lambda s: backtest(s, holdout=2, methods=["two-point:from=10,to=60"], windows=[3]),
     "not among the observed steps"),
    (lambda s: backtest(s, holdout=2, threshold=0), "positive"),
    (lambda s: backtest(s, holdout=2, methods=["relex:rank=0"]), "between 1 and"),
    (lambda s: report(s, null_samples=-1), "--null-samples"),
    (lambda s: report(s.parent / "nothing-here"), "no trajectory store"),
    (lambda s: parse_windows("3,half", "--windows"), "--windows"),
])
def test_user_mistakes_raise_relex_error(synth_store: Path, call, needle: str) -> None:
    with pytest.raises(RelexError, match=needle):
        call(synth_store)


def test_not_a_store_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("{}")
    with pytest.raises(RelexError, match="not a relex_stream store"):
        load_grams(tmp_path / "junk")


def test_randomized_grams_are_refused(make_traj, tmp_path: Path) -> None:
    traj = make_traj(steps=(10, 20, 30, 40, 50))
    cli("run", "--base", traj.base, "--runs", traj.runs, "--target", 60, "--out",
        tmp_path / "out", "--device", "cpu", "--quiet", "--svd", "randomized")
    with TrajectoryStore.open(tmp_path / "out" / "trajectory.zarr") as store:
        assert store.record(store.group_of(EMBED)).kinds[EMBED] == "randomized"
    with pytest.raises(RelexError, match="--svd exact"):
        report(tmp_path / "out", null_samples=5)


def test_missing_matplotlib_says_how_to_fix(
    synth_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RelexError, match="--no-plots"):
        report(synth_store, tmp_path / "rep", null_samples=5)
    result = report(synth_store, tmp_path / "rep", null_samples=5, plots=False)
    assert not any(p.suffix == ".png" for p in result.files)
    assert all(math.isfinite(t.stats.fit.explained_variance) for t in result.tensors)


def test_support_is_the_share_of_elements_that_ever_changed(synth_store: Path,
                                                            tmp_path: Path) -> None:
    trajectory = synth_store.parent.parent / "traj"
    _, deltas = _explicit_deltas(trajectory)
    result = report(synth_store, tmp_path / "rep", null_samples=5, plots=False)
    total = changed = 0
    for entry in result.tensors:
        want = int((deltas[entry.name] != 0).any(dim=0).sum())  # bf16 → float64 is exact
        assert entry.support == want, entry.name
        total, changed = total + entry.numel, changed + want
    assert 0 < changed < total  # the drift profile leaves some elements alone
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["support_fraction"] == pytest.approx(changed / total)
    assert f"{100 * changed / total:.1f}% of the parameters changed" in result.lines()[0]


def test_report_and_backtest_never_write_through_a_link(synth_store: Path, tmp_path: Path) -> None:
    """A link planted in --out under a file name report or backtest writes is replaced by the
    file, and what it points to is left as it was (files are written beside and renamed)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    names = {"report": ["report.json", "report.csv", "summary.txt", "coefficients.png"],
             "backtest": ["backtest.json", "backtest.txt", "backtest.png"]}
    for command, files in names.items():
        out = tmp_path / command
        out.mkdir()
        for name in files:
            (out / name).symlink_to(victim)
        extra = ["--holdout", "2"] if command == "backtest" else ["--null-samples", "5"]
        cli(command, synth_store, "--out", out, *extra, "--overwrite")
        for name in files:
            assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert victim.read_text() == "not yours"


@pytest.mark.parametrize("command", ["report", "backtest"])
def test_files_already_in_out_are_replaced_only_with_overwrite(
        synth_store: Path, tmp_path: Path, command: str) -> None:
    """report --out ~/notes replaced the user's summary.txt without a word; now a file of a
    name report or backtest writes is kept unless --overwrite, and a rerun needs it too."""
    extra = ["--holdout", "2"] if command == "backtest" else ["--null-samples", "5"]
    out = tmp_path / "notes"
    out.mkdir()
    mine = out / ("summary.txt" if command == "report" else "backtest.txt")
    mine.write_text("my notes")
    proc = run_cli(command, synth_store, "--out", out, *extra, expect_rc=2)
    assert "--overwrite" in proc.stderr and mine.name in proc.stderr
    assert mine.read_text() == "my notes" and sorted(out.iterdir()) == [mine]
    cli(command, synth_store, "--out", out, *extra, "--overwrite")
    assert mine.read_text() != "my notes"
    run_cli(command, synth_store, "--out", out, *extra, expect_rc=2)  # a rerun: same rule
    cli(command, synth_store, "--out", out, *extra, "--overwrite")


@pytest.mark.parametrize("command", ["report", "backtest"])
def test_out_that_is_a_file_or_inside_the_store_is_one_error(synth_store: Path, tmp_path: Path,
                                                             command: str) -> None:
    """--out a file gave a FileExistsError traceback; --out inside the store wrote files into
    it. Both are one error line, and the store is left as it was."""
    extra = ["--holdout", "2"] if command == "backtest" else ["--null-samples", "5"]
    before = sorted(p.relative_to(synth_store) for p in synth_store.rglob("*"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, needle in ((a_file, "cannot make --out"), (synth_store, "inside the store"),
                        (synth_store / "reports", "inside the store")):
        proc = run_cli(command, synth_store, "--out", out, *extra, expect_rc=2)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert sorted(p.relative_to(synth_store) for p in synth_store.rglob("*")) == before
    beside = synth_store.parent  # a run's OUT, which holds the store: fine
    assert run_cli(command, synth_store, "--out", beside, *extra).returncode == 0


def test_plots_write_nothing_under_home_nor_leave_temporary_files(synth_store: Path,
                                                                    tmp_path: Path) -> None:
    """matplotlib's first import wrote its font cache under ~/.cache (outside OUT); it now
    goes to a temporary directory the command removes. A user's MPLCONFIGDIR is kept."""
    home, scratch, own = tmp_path / "home", tmp_path / "tmp", tmp_path / "own-mpl"
    for path in (home, scratch, own):
        path.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("XDG_", "MPL"))}
    env |= {"HOME": str(home), "TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    commands = (["report", synth_store, "--out", tmp_path / "rep", "--null-samples", "5"],
                ["backtest", synth_store, "--holdout", "2", "--out", tmp_path / "bt"])
    for args in commands:
        subprocess.run([sys.executable, "-m", "relex_stream", *map(str, args)], env=env,
                       check=True, capture_output=True, timeout=300)
    assert list(home.rglob("*")) == [] and list(scratch.iterdir()) == []
    assert (tmp_path / "rep" / "coefficients.png").is_file()
    subprocess.run([sys.executable, "-m", "relex_stream", "report", str(synth_store), "--out",
                    str(tmp_path / "rep2"), "--null-samples", "5"],
                   env=env | {"MPLCONFIGDIR": str(own)}, check=True, capture_output=True,
                   timeout=300)
    assert any(own.iterdir())  # the user's choice: matplotlib's cache is there


def test_a_verdict_on_a_held_out_step_that_did_not_move_says_so() -> None:
    """A held-out step whose delta is zero has no relative error (0 / 0): the verdict read
    "has error nan, above the threshold 0.3"."""
    import math

    from relex_stream.backtest import verdict

    reach, line = verdict("relex", [10, 20], [math.nan, 0.1], 0.3)
    assert reach is None and "nan" not in line and "undefined" in line
    reach, line = verdict("relex", [10, 20], [0.1, math.nan], 0.3)
    assert reach == 10 and "nan" not in line and "undefined" in line


def test_a_bad_mplbackend_and_a_sigterm_leave_no_trace(synth_store: Path, tmp_path: Path) -> None:
    """MPLBACKEND=foo made matplotlib's import raise ValueError (a traceback, exit 1; watch only
    after building its store); SIGTERM during a report left $TMPDIR/relex-stream-matplotlib-*
    behind (atexit does not run on a signal)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MPL")}
    env |= {"TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "foo",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "relex_stream", "report", str(synth_store),
                           "--out", str(tmp_path / "rep"), "--null-samples", "5"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rep" / "coefficients.png").is_file()
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal\nfrom relex_stream import plots\n"
         "plots.pyplot()\nos.kill(os.getpid(), signal.SIGTERM)\n"],
        env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -15, killed.stderr
    assert list(scratch.iterdir()) == []


def test_no_plots_with_overwrite_removes_the_old_plots(synth_store: Path, tmp_path: Path) -> None:
    """report --overwrite --no-plots kept the PNGs of the report before beside the new JSON:
    one folder describing two stores."""
    out = tmp_path / "rep"
    cli("report", synth_store, "--out", out, "--null-samples", "5")
    cli("backtest", synth_store, "--holdout", "2", "--out", out)
    assert (out / "by_layer.png").is_file() and (out / "backtest.png").is_file()
    cli("report", synth_store, "--out", out, "--null-samples", "5", "--no-plots", "--overwrite")
    cli("backtest", synth_store, "--holdout", "2", "--out", out, "--no-plots", "--overwrite")
    assert not list(out.glob("*.png"))
    assert (out / "summary.txt").is_file() and (out / "backtest.json").is_file()


def test_a_method_given_twice_to_backtest_is_refused(synth_store: Path) -> None:
    """`backtest --methods relex relex` printed every row twice; run refuses a repeat."""
    with pytest.raises(RelexError, match="twice"):
        backtest(synth_store, holdout=2, methods=["relex", "raw-ols", "relex"])


def _contents(out: Path) -> dict[str, bytes | None]:
    """Every entry of `out`: a file's bytes, None for a directory."""
    return {p.name: None if p.is_dir() else p.read_bytes() for p in sorted(out.iterdir())}


COMMANDS = {  # command -> (first run's flags, a rerun's flags whose files differ)
    "report": (["--null-samples", "5"], ["--null-samples", "6"]),
    "backtest": (["--holdout", "2"], ["--holdout", "1"]),
}


@pytest.mark.parametrize("command", ["report", "backtest"])
def test_a_directory_under_a_file_name_leaves_the_earlier_files_whole(
        synth_store: Path, tmp_path: Path, command: str) -> None:
    """With --overwrite and a directory where summary.txt (backtest.png) goes, report.json and
    report.csv were replaced before the write that failed: one folder describing two stores."""
    first, second = COMMANDS[command]
    out = tmp_path / "out"
    cli(command, synth_store, "--out", out, *first)
    blocked = out / ("summary.txt" if command == "report" else "backtest.png")
    blocked.unlink()
    blocked.mkdir()
    before = _contents(out)
    proc = run_cli(command, synth_store, "--out", out, *second, "--overwrite", expect_rc=2)
    assert proc.stderr.count("\n") == 1 and blocked.name in proc.stderr, proc.stderr
    assert _contents(out) == before


@pytest.mark.parametrize("command", ["report", "backtest"])
@pytest.mark.parametrize("plots", [True, False])
def test_a_full_disk_leaves_the_earlier_files_or_none(
        synth_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
        plots: bool) -> None:
    """A disk that fills up at the second file kept the first replaced (a fresh --out kept 4 of
    7 files); --overwrite --no-plots removed the old PNGs before any work. Now every file is
    written beside its name first: a failure leaves the earlier set whole, and no temporary."""
    from relex_stream import safefs

    first, second = COMMANDS[command]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    cli(command, synth_store, "--out", out, *first)
    before = _contents(out)
    real, calls = safefs.write_all, []

    def fills_up(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(safefs, "write_all", fills_up)
    flags = [*second, *([] if plots else ["--no-plots"])]
    for target, extra in ((out, ["--overwrite"]), (fresh, [])):
        calls.clear()
        with pytest.raises(RelexError, match="No space left on device"):
            REPORT_HANDLERS[command](_parsed(command, synth_store, target, *flags, *extra))
    assert _contents(out) == before
    assert _contents(fresh) == {}


def _parsed(command: str, *args: object) -> argparse.Namespace:
    """The namespace the CLI parser makes of `command STORE --out OUT FLAGS`."""
    parser = argparse.ArgumentParser()
    add_report_parsers(parser.add_subparsers(dest="command"))
    store, out, *flags = args
    return parser.parse_args([command, str(store), "--out", str(out), *map(str, flags)])


def test_weights_that_stop_moving_give_a_whole_report(tmp_path: Path) -> None:
    """A run whose later checkpoints repeat the first (GRPO with all-equal rewards) has
    explained variances 1.0 and 0.9999999999999999: numpy found no room for 5 bins between them
    and report ended in a ValueError traceback (exit 1), 4 of its 7 files written."""
    traj = tmp_path / "traj"
    cli("synth", "--out", traj, "--steps", "10,20", "--layers", "1", "--hidden", "32",
        "--vocab", "64")
    shutil.rmtree(traj / "runs" / "checkpoint-20")
    for step in (20, 30):
        shutil.copytree(traj / "runs" / "checkpoint-10", traj / "runs" / f"checkpoint-{step}")
    cli("run", "--base", traj / "base", "--runs", traj / "runs", "--target", 100, "--out",
        tmp_path / "out", "--device", "cpu", "--quiet")
    result = report(tmp_path / "out", tmp_path / "rep", null_samples=5)
    explained = finite_values([t.stats.fit.explained_variance for t in result.tensors])
    assert 0 < max(explained) - min(explained) < 1e-12  # the case: apart only by rounding
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(REPORT_FILES)


NAN = math.nan
ODD_VALUES = {  # explained variance (or R², or errors) per tensor that plots must draw
    "ulps apart": [1.0, 1 - 2**-53, 1 - 2**-52, 1 - 2**-53],
    "constant": [0.5] * 6,
    "one tensor": [0.7],
    "with NaN": [NAN, 0.9, NAN, 0.95],
    "all NaN": [NAN, NAN],
    "tiny": [5e-324, 1e-323, 0.0],
}


@pytest.mark.parametrize("case", ODD_VALUES)
def test_every_plot_draws_degenerate_numbers(case: str) -> None:
    """Constant values, one tensor, NaN, and values a few ulps apart each give a PNG."""
    from relex_stream import plots

    values = ODD_VALUES[case]
    n = len(values)
    modules = [f"kind{i % 2}" for i in range(n)]
    layers = [i if i % 3 else None for i in range(n)]
    steps = [10.0 * (i + 1) for i in range(n)]
    figures = [
        plots.coefficient_trajectories([("t", steps, values, values[0], 0.0, values[-1])]),
        plots.histograms(values, values, values[0], NAN),
        plots.by_layer(layers, modules, [64] * n, values, values),
        plots.by_module(modules, [64] * n, values, values),
        plots.backtest_errors([("relex", "window 2", steps, values)], 0.3),
    ]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in figures)


@pytest.mark.parametrize("command", ["report", "backtest"])
def test_a_plot_that_fails_is_left_out_with_a_warning(
        synth_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, command: str) -> None:
    """Whatever matplotlib raises on odd numbers reached the user as a traceback after part of
    the files were written. Now that figure is left out (its old file removed: it would
    describe another store), a warning names it, and the other files are written."""
    from relex_stream import plots

    first, second = COMMANDS[command]
    out = tmp_path / "out"
    cli(command, synth_store, "--out", out, *first)
    broken = "by_layer" if command == "report" else "backtest_errors"

    def fails(*args: object) -> bytes:
        raise ValueError("Too many bins for data range")

    monkeypatch.setattr(plots, broken, fails)
    REPORT_HANDLERS[command](_parsed(command, synth_store, out, *second, "--overwrite"))
    left_out = "by_layer.png" if command == "report" else "backtest.png"
    assert not (out / left_out).exists()
    assert f"{left_out} is left out" in caplog.text and "Too many bins" in caplog.text
    names = REPORT_FILES if command == "report" else ("backtest.json", "backtest.txt")
    assert {p.name for p in out.iterdir()} == set(names) - {left_out}


def test_backtest_rows_name_the_alpha_used(synth_store: Path, tmp_path: Path) -> None:
    """Two alphas equal to 6 digits gave two rows "expo:alpha=0.123457" with the same-looking
    label, and backtest.json named an alpha neither run used."""
    methods = ["expo:alpha=0.1234567", "expo:alpha=0.1234568"]
    backtest(synth_store, holdout=2, methods=methods, out_dir=tmp_path / "bt", plots=False)
    data = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert [row["method"] for row in data["rows"]] == methods


def _png_height(png: bytes) -> int:
    """Pixel height from a PNG's IHDR chunk."""
    return int.from_bytes(png[20:24], "big")


def test_by_module_shows_at_most_40_module_types(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """by_module.png grew a row per module type without bound: 1,800 names outside the layer
    pattern gave a 69,498 px PNG (1.2 GB of memory, a minute). It now shows the 40 types with
    the most elements and says how many it leaves out."""
    g = torch.Generator().manual_seed(0)
    sizes = {f"t{i}.weight": 4 + i for i in range(120)}  # 120 module types, t119 the largest
    base = {name: torch.randn(size, generator=g) for name, size in sizes.items()}
    for directory, scale in [("base", 0.0)] + [(f"runs/checkpoint-{t}", t) for t in (10, 20, 30)]:
        tensors = {name: value + scale * 1e-3 * torch.randn(value.shape, generator=g)
                   for name, value in base.items()}
        (tmp_path / directory).mkdir(parents=True)
        save_file(tensors, str(tmp_path / directory / "model.safetensors"))
        (tmp_path / directory / "config.json").write_text(json.dumps({"model_type": "x"}))
    build_store(tmp_path)
    with caplog.at_level("INFO"):
        report(tmp_path / "out", tmp_path / "rep", null_samples=0)
    # 40 rows of 0.35 in plus 1.8 in at 110 dpi; 120 rows made 4,818 px
    assert _png_height((tmp_path / "rep" / "by_module.png").read_bytes()) <= 1750
    assert "80 module type(s) with the fewest elements left out" in caplog.text


def test_the_module_types_shown_are_those_with_the_most_elements() -> None:
    from relex_stream.plots import largest_kinds

    modules = ["a", "b", "a", "c", "d"]
    numels = [5, 20, 5, 9, 11]  # a: 10 in all
    assert largest_kinds(modules, numels, limit=2) == (["b", "d"], 2)
    assert largest_kinds(modules, numels, limit=9) == (["a", "b", "c", "d"], 0)


def test_a_path_that_is_no_store_is_refused_in_report_and_backtest_words(tmp_path: Path) -> None:
    """`report RUNS` said "pass another --cache, or remove it": report and backtest have no
    --cache, and removing the runs directory is poor advice. They now ask for the store."""
    (tmp_path / "runs" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "zarr.json").write_text("{}")
    for path in ("runs", "a-file", "fake"):
        for call in (lambda p: report(p, null_samples=0), lambda p: backtest(p, holdout=1)):
            with pytest.raises(RelexError) as caught:
                call(tmp_path / path)
            message = str(caught.value)
            assert "--cache" not in message and "remove it" not in message, message
            assert "pass the trajectory.zarr that `run` wrote" in message, message
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["checkpoint-10"]
