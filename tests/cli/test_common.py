"""What the command lines share: exit codes, one-line errors, deprecated spellings, and output paths refused
before the work."""

import argparse
import os

import pytest

from btp.cli.common import add_alias, check_writable, run_main
from btp.runtime import BtpError, BuildError, DataError, InputError


def test_writable_paths_pass(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    check_writable(tmp_path / "new.png", "--plot")
    check_writable(tmp_path / "old.json", "-o")
    check_writable(tmp_path, "--save", directory=True)
    check_writable(tmp_path / "a" / "b", "--save", directory=True, parents=True)
    check_writable(tmp_path / "a" / "r.json", "--out", parents=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # nothing was created


@pytest.mark.parametrize(
    ("where", "kwargs", "found"),
    [
        ("file.txt/x.png", {}, "file.txt is not a directory"),
        ("file.txt/a/b", {"directory": True, "parents": True}, "file.txt is not a directory"),
        ("missing/x.png", {}, "missing does not exist"),
        (".", {}, "expected a writable file path, found a directory"),
        ("file.txt", {"directory": True}, "expected a writable directory path, found a file"),
    ],
)
def test_unwritable_paths_are_one_line_input_errors(tmp_path, where, kwargs, found):
    (tmp_path / "file.txt").write_text("x")
    path = tmp_path / where
    with pytest.raises(InputError) as err:
        check_writable(path, "--opt", **kwargs)
    assert str(err.value).startswith(f"--opt {path}: expected a writable ") and found in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(InputError, match="parent directory .*ro is not writable"):
            check_writable(ro / "x.png", "--plot")
    finally:
        ro.chmod(0o700)


def test_run_main_turns_the_error_into_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert run_main(lambda: check_writable(tmp_path / "f" / "p.png", "--plot"), False, "btp-x") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"btp-x: error: --plot {tmp_path}/f/p.png: expected a writable file path, found {tmp_path}/f is "
                   "not a directory"]


def test_exit_codes_say_what_happened(capsys):
    def bad_input():
        raise DataError("prompts.jsonl:3: expected an object, found a list")

    def bug():
        raise KeyError("stage9")

    assert run_main(lambda: 0, False, "btp-x") == 0
    assert run_main(lambda: 1, False, "btp-x") == 1  # a check that found a mismatch
    assert capsys.readouterr().err == ""
    assert run_main(bad_input, False, "btp-x") == 2
    assert capsys.readouterr().err == "btp-x: error: prompts.jsonl:3: expected an object, found a list\n"
    assert run_main(bug, False, "btp-x") == 3
    assert capsys.readouterr().err.splitlines() == [
        "btp-x: internal error: KeyError: 'stage9' (run with --debug for the traceback)"]
    with pytest.raises(KeyError):
        run_main(bug, True, "btp-x")


def test_every_error_class_is_a_btp_error_from_one_module():
    from btp.compiler.build import BuildError as from_build
    from btp.compiler.calibration_data import DataError as from_data
    from btp.compiler.publish import BuildError as from_publish

    assert from_build is from_publish is BuildError and from_data is DataError  # the old import paths still work
    assert issubclass(BuildError, BtpError) and issubclass(DataError, InputError)
    assert BuildError.__module__ == DataError.__module__ == "btp.runtime.errors"


def test_an_old_spelling_sets_the_same_option_and_is_left_out_of_help():
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=8)
    add_alias(p, "--new-tokens", "max_new_tokens", type=int)
    assert p.parse_args([]).max_new_tokens == 8
    assert p.parse_args(["--new-tokens", "3"]).max_new_tokens == 3
    assert p.parse_args(["--new-tokens", "3", "--max-new-tokens", "5"]).max_new_tokens == 5
    assert "--new-tokens" not in p.format_help() and "--max-new-tokens" in p.format_help()


def test_library_errors_name_their_parameter_and_command_lines_their_flag(capsys):
    err = BuildError("must be >= 1, got 0", option="max_batch")
    assert str(err) == "max_batch must be >= 1, got 0"  # what a library caller reads

    def fail():
        raise err

    assert run_main(fail, False, "btp-x") == 2
    assert capsys.readouterr().err == "btp-x: error: --max-batch must be >= 1, got 0\n"
    assert run_main(fail, False, "btp-x", {"max_batch": "--batch-limit"}) == 2
    assert capsys.readouterr().err == "btp-x: error: --batch-limit must be >= 1, got 0\n"
    assert run_main(fail, False, "btp-x", options={"other": 1}) == 2  # a command without that option: the name
    assert capsys.readouterr().err == "btp-x: error: max_batch must be >= 1, got 0\n"
    placed = BuildError("out exists; pass {option} to replace it", option="force")
    assert str(placed) == "out exists; pass force to replace it"
    assert placed.render() == "out exists; pass --force to replace it"


def test_library_messages_do_not_name_command_line_flags():
    """Flags are the command lines' to add: no message a library raises spells one (comments, help and hints
    about another command aside, which name a command first)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    raised = re.compile(r"raise \w+Error\((?:f?\"[^\"]*\"\s*)+")
    offenders = []
    for package in ("artifact", "backends", "compiler", "graphs", "runtime", "tools", "toy"):
        for path in sorted((root / package).glob("*.py")):
            for match in raised.finditer(path.read_text()):
                if re.search(r"(?<![\w-])--[a-z]", match.group(0)) and "btp-" not in match.group(0):
                    offenders.append(f"{path.relative_to(root)}: {match.group(0)[:80]}")
    assert not offenders, offenders
