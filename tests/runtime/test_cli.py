"""What the command lines share: one-line errors, and output paths refused before the work."""

import os

import pytest

from btp.runtime import InputError
from btp.runtime.cli import check_writable, run_main


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
