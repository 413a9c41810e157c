"""Values typed by users (CLI flags) and set in the environment: strict, bounded, one RelexError.

Python's int(), float() and regex \\d accept Arabic-Indic ('١٠') and fullwidth ('１０') digits,
float() accepts '1_000', 'nan' and 'inf', and nothing bounded the numbers. The parsers are used
through the module (`units.parse_bytes`) so that these tests also run against older versions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relex_stream import units
from relex_stream.errors import RelexError

NON_ASCII_DIGITS = ["١٠", "１０", "१०", "٣"]


def refuses(fn, *args, **kwargs) -> str:
    """fn(*args, **kwargs) must raise a one-line RelexError; its message."""
    with pytest.raises(RelexError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4G", 4 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("4 G", 4 * 2**30),
        ("64K", 64 * 1024),
        ("2m", 2 * 2**20),
        ("100", 100),
        ("100B", 100),
        ("1P", 2**50),
        (" 4G ", 4 * 2**30),
        (1024, 1024),
    ],
)
def test_parse_bytes_accepts(text: str | int, expected: int) -> None:
    assert units.parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        *(d + "G" for d in NON_ASCII_DIGITS),
        "4\u212a",  # KELVIN SIGN: re.IGNORECASE alone matches it with [k]
        "4G\u0131B",  # dotless i, which IGNORECASE matches with [i]
        "99999999999999999999T",  # parsed to an int of ~2**106 before
        "9" * 5000,
        "2P",
        "1.5P",
        "0",
        "0G",
        "0.5",
        "-1G",
        "nan",
        "inf",
        "1e3",
        "1_000",
        "0x10",
        "",
        " ",
        "G",
        "4ib",
        "4GG",
        "4 G B",
    ],
)
def test_parse_bytes_refuses(text: str) -> None:
    refuses(units.parse_bytes, text)


@pytest.mark.parametrize("value", [0, -1, 2**51, True, 1.5, None])
def test_parse_bytes_refuses_non_sizes(value: object) -> None:
    refuses(units.parse_bytes, value)


def test_format_bytes_unchanged() -> None:
    assert units.format_bytes(1536) == "1.50 KiB" and units.format_bytes(12) == "12 B"


# ----------------------------------------------------------------------------- steps


def test_step_selection_accepts() -> None:
    assert units.parse_steps("1-5,10,20-40:10") == [1, 2, 3, 4, 5, 10, 20, 30, 40]
    assert units.parse_steps(" 10 , 20 ") == [10, 20]
    wide = units.parse_step_selection("1-99999999999999")  # a filter: never expanded
    assert wide.keeps(123456) and not wide.keeps(0)
    assert units.parse_steps(f"0,{2**53}") == [0, 2**53]


@pytest.mark.parametrize(
    "text",
    [
        *NON_ASCII_DIGITS,
        "١-٥",
        "1-５",
        "9" * 5000,  # int() raised ValueError: a traceback before
        str(2**53 + 1),
        "1-99999999999999999999",
        "10,,20",
        "10,",
        "",
        " ",
        "1-",
        "-5",
        "5-1",
        "1-10:0",
        "1-10:",
        "1_0",
        "1e3",
        "10.0",
    ],
)
def test_step_selection_refuses(text: str) -> None:
    refuses(units.parse_step_selection, text)


def test_step_list_expansion_is_bounded() -> None:
    """Expanding 1-2000000 (what synth writes) is refused; as a filter it is fine."""
    refuses(units.parse_steps, "1-2000000")
    assert units.parse_step_selection("1-2000000").keeps(1_999_999)
    assert len(units.parse_steps("1-1000000")) == 1_000_000


def test_parse_step() -> None:
    assert units.parse_step("100", "--ckpt") == 100
    for bad in (*NON_ASCII_DIGITS, "", "-1", "1.0", str(2**53 + 1), "9" * 5000, "1_0"):
        assert "--ckpt" in refuses(units.parse_step, bad, "--ckpt")


# ----------------------------------------------------------------------------- targets


def test_parse_targets_accepts() -> None:
    assert units.parse_targets("500") == [500.0]
    assert units.parse_targets("500,750.5, 1000 ") == [500.0, 750.5, 1000.0]
    assert units.parse_targets("1e3,-5,.5") == [1000.0, -5.0, 0.5]
    assert units.parse_targets(f"{2**53},-{2**53}") == [2.0**53, -(2.0**53)]


@pytest.mark.parametrize(
    "text",
    [
        *NON_ASCII_DIGITS,
        "nan",
        "NaN",
        "inf",
        "-inf",
        "infinity",
        "1e999",
        "1e99999",
        "9" * 400,
        "0x10",
        "0x1p3",
        "1_000",
        "500,,600",
        "500,",
        ",500",
        " ",
        "",
        "500, ,600",
        "abc",
        str(2**53 + 2),
        str(2**53 + 1),  # rounds to 2**53 as a float: it was accepted, and step-2**53 written
        f"-{2**53 + 1}",
        f"{2**53}.5",
        "9007199254740992.0000000001",
        "-1e16",
    ],
)
def test_parse_targets_refuses(text: str) -> None:
    refuses(units.parse_targets, text)


def test_step_label_unchanged() -> None:
    assert units.step_label(500.0) == "500" and units.step_label(512.5) == "512.5"


# ----------------------------------------------------------------------------- new value kinds


def test_parse_positive_int() -> None:
    assert units.parse_positive_int("8", "--workers", 64) == 8
    assert units.parse_positive_int(8, "--workers", 64) == 8
    for bad in ("0", "65", "-1", "", "8.0", "1_0", "٣", True, "9" * 5000):
        assert "--workers" in refuses(units.parse_positive_int, bad, "--workers", 64)


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30.0), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5s", 1.5),
     ("45", 45.0), (" 2 m ", 120.0)],
)  # fmt: skip
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert units.parse_duration(text, "--interval") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["0s", "0", "0ms", "-1s", "1d", "8d", "200h", "s", "", "1e3s", "nan", "inf", "١٠s",
             "1_0s", "1.s", "10 seconds", "9" * 5000]
)  # fmt: skip
def test_parse_duration_refuses(text: str) -> None:
    assert "--interval" in refuses(units.parse_duration, text, "--interval")


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0.0s", " 0 h"])
def test_parse_duration_takes_zero_in_any_spelling_only_when_asked(text: str) -> None:
    assert units.parse_duration(text, "--settle", zero=True) == 0.0
    assert "--settle" in refuses(units.parse_duration, text, "--settle")


@pytest.mark.parametrize("text, ok", [("0.1s", True), ("100ms", True), ("99ms", False),
                                      ("0.001s", False), ("0.05", False)])  # fmt: skip
def test_parse_duration_minimum(text: str, ok: bool) -> None:
    if ok:
        assert units.parse_duration(text, "--interval", minimum=0.1) == pytest.approx(0.1)
    else:
        assert "at least 0.1" in refuses(units.parse_duration, text, "--interval", minimum=0.1)


def test_parse_windows() -> None:
    assert units.parse_windows("10,20,all", "--window") == [10, 20, None]
    assert units.parse_windows("all", "--windows") == [None]
    assert units.parse_windows(" 4 , 8 ", "--windows") == [4, 8]
    assert units.parse_windows(None, "--window") == [None]
    for bad in ("1", "0", "10,10", "all,all", "10,,20", "", "ALL", "١٠", "4.0", "-4", "2000000"):
        assert "--windows" in refuses(units.parse_windows, bad, "--windows")


# ----------------------------------------------------------------------------- environment


def test_torchrun_env() -> None:
    from relex_stream.envvars import torchrun_env

    assert torchrun_env({}) is None
    assert torchrun_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert torchrun_env({"WORLD_SIZE": "4", "RANK": "3"}) == (3, 4, 0)
    assert torchrun_env({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"}) == (1, 4, 1)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "٣", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "-1"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": " 2", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "9" * 30, "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "١"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": ""}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ],
)
def test_torchrun_env_refuses(env: dict[str, str], names: str) -> None:
    from relex_stream.envvars import torchrun_env

    message = refuses(torchrun_env, env)
    assert names in message and "torchrun" in message


def test_message_rank_never_raises() -> None:
    from relex_stream.envvars import message_rank

    assert message_rank({}) == 0
    assert message_rank({"WORLD_SIZE": "4", "RANK": "2"}) == 2
    assert message_rank({"WORLD_SIZE": "abc", "RANK": "2"}) == 0
    assert message_rank({"WORLD_SIZE": "4", "RANK": "٢"}) == 0


def test_omp_num_threads() -> None:
    from relex_stream.envvars import omp_num_threads, omp_num_threads_is_set

    assert omp_num_threads({}) is None and not omp_num_threads_is_set({})
    assert omp_num_threads({"OMP_NUM_THREADS": ""}) is None
    assert omp_num_threads({"OMP_NUM_THREADS": "4"}) == 4
    assert omp_num_threads({"OMP_NUM_THREADS": "8,2"}) == 8
    assert omp_num_threads_is_set({"OMP_NUM_THREADS": "junk"})
    for bad in ("0", "x", "٤", "4,", "-1", "1.5", "99999999"):
        assert "OMP_NUM_THREADS" in refuses(omp_num_threads, {"OMP_NUM_THREADS": bad})


def test_relex_test_device_and_int_variables() -> None:
    from relex_stream.envvars import read_env_int, relex_test_device

    assert relex_test_device({}) == "cpu" and relex_test_device({"RELEX_TEST_DEVICE": ""}) == "cpu"
    assert relex_test_device({"RELEX_TEST_DEVICE": "cuda"}) == "cuda"
    for bad in ("gpu", "CUDA", "cuda:0", " cpu"):
        assert "RELEX_TEST_DEVICE" in refuses(relex_test_device, {"RELEX_TEST_DEVICE": bad})
    assert read_env_int("RELEX_FUZZ_EXAMPLES", 200, 1, 10**6, {}) == 200
    assert read_env_int("RELEX_FUZZ_EXAMPLES", 200, 1, 10**6, {"RELEX_FUZZ_EXAMPLES": "5"}) == 5
    for bad in ("0", "x", "1e3", "٥"):
        env = {"RELEX_FUZZ_EXAMPLES": bad}
        assert "RELEX_FUZZ_EXAMPLES" in refuses(read_env_int, "RELEX_FUZZ_EXAMPLES", 200, 1, 9, env)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "٤", "4,"])
def test_malformed_omp_num_threads_is_one_error_line_before_torch_loads(
        tmp_path: Path, value: str) -> None:
    """torch's OpenMP runtime reads OMP_NUM_THREADS as torch loads and only warns: the CLI checks
    it first, so the user sees one error line, not libgomp's warning and a run."""
    env = _child_env(OMP_NUM_THREADS=value)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "run", "--base", str(tmp_path / "b"), "--runs",
         str(tmp_path / "r"), "--target", "100", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "OMP_NUM_THREADS" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "env, names",
    [
        ({}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "a b", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "höst", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "h" * 300, "MASTER_PORT": "29500"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999999"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "٢٩٥٠٠"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}, "MASTER_PORT"),
    ],
)
def test_master_address_refuses(env: dict[str, str], names: str) -> None:
    """torch's own errors for these were tracebacks; an empty host retried for two hours."""
    from relex_stream.envvars import master_address

    assert names in refuses(master_address, env)


def test_master_address() -> None:
    from relex_stream.envvars import master_address

    assert master_address({"MASTER_ADDR": "node-0", "MASTER_PORT": "29500"}) == ("node-0",
                                                                                 29500)


def test_an_unknown_master_host_is_one_error_line(tmp_path) -> None:
    """Under torchrun's variables with a host that does not resolve: one error line at once,
    not torch's rendezvous retrying until its timeout."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="",
               MASTER_ADDR="no.such.host.invalid", MASTER_PORT="29555", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "synth", "--out", str(tmp_path / "t"), "--steps",
         "10-30:10", "--hidden", "16", "--layers", "1", "--vocab", "32"],
        env={k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    t = tmp_path / "t"
    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "run", "--base", str(t / "base"), "--runs",
         str(t / "runs"), "--target", "100", "--out", str(tmp_path / "o"), "--device", "cpu",
         "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "MASTER_ADDR" in proc.stderr and "does not resolve" in proc.stderr


def test_gomp_cpu_affinity() -> None:
    """libgomp hangs on 'abc', '0:2', '1 abc' and exits the process on '1-0' or '0-1:0'."""
    from relex_stream.envvars import gomp_cpu_affinity

    for good in ("", "0", "0-7", "0 2 4-6", "0,1", "0-15:2", " 3 ", "0\t1", "0,,1", "65535"):
        gomp_cpu_affinity({"GOMP_CPU_AFFINITY": good})
    for bad in ("abc", "0:2", "1 abc", "1-0", "0-1:0", "0-1:", "0-", "-1", "٣", "0x1",
                "65536", "0-99999999", "0 - 1", "0-1 :2"):
        assert "GOMP_CPU_AFFINITY" in refuses(gomp_cpu_affinity, {"GOMP_CPU_AFFINITY": bad})


def _child_env(**update: str) -> dict[str, str]:
    """This environment, with this checkout importable and `update` set."""
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), **update)


def _cli(tmp_path: Path, env_update: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relex_stream", *args], capture_output=True,
                          text=True, env=_child_env(**env_update), timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(
    "name, value",
    [("GOMP_CPU_AFFINITY", "abc"), ("GOMP_CPU_AFFINITY", "0:2"), ("GOMP_CPU_AFFINITY", "1-0"),
     ("TQDM_NCOLS", "x"), ("TQDM_MININTERVAL", "abc"), ("TORCH_LOGS", "zzz")],
)
def test_variables_libraries_read_as_they_load_are_one_error_line(
        tmp_path: Path, name: str, value: str) -> None:
    """libgomp hung on the first three (even for --help); tqdm and torch raised tracebacks."""
    proc = _cli(tmp_path, {name: value}, "--help")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]


def test_run_with_closed_standard_streams_writes_its_output(tmp_path: Path) -> None:
    """With stderr closed (`2>&-`) the run exited 1 before writing anything (sys.stderr is
    None); and a file opened then would have taken fd 2, where C libraries write warnings."""
    made = _cli(tmp_path, {}, "synth", "--out", "t", "--steps", "1-3", "--hidden", "32",
                "--layers", "1")
    assert made.returncode == 0, made.stderr
    args = ["run", "--base", "t/base", "--runs", "t/runs", "--target", "9", "--out", "o",
            "--device", "cpu"]
    proc = subprocess.run(
        ["sh", "-c", 'exec "$0" -m relex_stream "$@" <&- >&- 2>&-', sys.executable, *args],
        env=_child_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0
    config = (tmp_path / "o" / "step-9" / "config.json").read_text()
    assert config.startswith("{")  # nothing else landed in the first file opened


def test_a_full_standard_output_is_named_as_such(tmp_path: Path) -> None:
    """stdout on a full disk read 'No space left on device: check the disk and the paths',
    as if the outputs had failed; they were complete, only the printed summary was lost."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    made = _cli(tmp_path, {}, "synth", "--out", "t", "--steps", "1-3", "--hidden", "32",
                "--layers", "1")
    assert made.returncode == 0, made.stderr
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "relex_stream", "run", "--base", "t/base", "--runs", "t/runs",
             "--target", "9", "--out", "o", "--device", "cpu"],
            stdout=full, stderr=subprocess.PIPE, text=True, env=_child_env(), timeout=120,
            cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write to standard output" in lines[0], proc.stderr
    assert (tmp_path / "o" / "step-9" / "model.safetensors").is_file()


@pytest.mark.parametrize("module", ["torch", "tqdm"])
def test_a_ctrl_c_while_starting_is_one_line(tmp_path: Path, module: str) -> None:
    """Importing torch takes seconds, and a Ctrl-C then printed a 20-40 line traceback (the
    command's own handler was not installed yet). A stand-in module that is interrupted as it
    loads makes the moment exact."""
    fake = tmp_path / "fake" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    checkout = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-m", "relex_stream", "report", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}:{checkout}"))
    assert proc.returncode == 130
    assert proc.stderr.splitlines() == ["error: interrupted while starting; nothing was written"]
