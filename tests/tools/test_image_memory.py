"""A hostile image costs `btp-run` no more memory than a normal one: peak RSS of real processes."""

import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image


def png(width: int, height: int) -> bytes:
    """A valid 1-bit gray PNG of one colour, written row by row: the file stays small whatever it declares."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def run_measured(args: list[str], tmp_path) -> tuple[int, list[str], int]:
    """`python -m btp.cli.run ARGS` -> (exit code, stderr lines, the child's own peak RSS in bytes)."""
    with open(tmp_path / "err", "w+b") as err, open(tmp_path / "out", "w+b") as out:
        proc = subprocess.Popen([sys.executable, "-m", "btp.cli.run", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode().strip().splitlines()
    return proc.returncode, lines, usage.ru_maxrss * 1024  # Linux reports KiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_hostile_images_cost_no_more_memory_than_a_normal_one(artifact, tmp_path):
    art = str(artifact("btp"))
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "normal.png")
    (tmp_path / "wide.png").write_bytes(png(100_000, 1))
    (tmp_path / "bomb.png").write_bytes(png(20_000, 20_000))  # 400 Mpixel in a few tens of KB
    assert (tmp_path / "bomb.png").stat().st_size < 100_000 and (tmp_path / "wide.png").stat().st_size < 1_000
    code, err, normal = run_measured([art, "--image", str(tmp_path / "normal.png"), "--prompt", "Hi",
                                      "--max-new-tokens", "2"], tmp_path)
    assert code == 0, err
    for name, message in [("wide.png", "aspect ratio of 100000:1"), ("bomb.png", "decompression bomb")]:
        code, err, peak = run_measured([art, "--image", str(tmp_path / name), "--prompt", "Hi"], tmp_path)
        assert code == 2 and len(err) == 1 and err[0].startswith("btp-run: error: ") and message in err[0], err
        assert peak <= normal + 64 * 2**20, f"{name}: peak RSS {peak >> 20} MiB, normal run {normal >> 20} MiB"
