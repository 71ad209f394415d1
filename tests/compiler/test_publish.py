"""Builds of one OUT with real processes: serialised by a lock, switched in atomically under loading readers,
never leaving OUT empty when killed, and cleaning what dead builds left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from btp.artifact.manifest import read_manifest
from btp.cli.compile import main as compile_main
from btp.compiler.publish import build_lock, lock_path, publish, temp_prefix
from btp.runtime import Pipeline

SAMPLE = Path(__file__).resolve().parents[2] / "tools" / "data" / "sample.png"
SMALL = ["--max-batch", "4", "--max-prompt", "256", "--max-new-tokens", "64"]  # the conftest artifacts' limits

# Loads the artifact over and over until told to stop; one JSON line per load, or the error of a failed load.
READER = r"""
import json, sys
from pathlib import Path
from PIL import Image
from btp.runtime import Pipeline
out, stop, sample = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
image = Image.open(sample).convert("RGB")
while not stop.exists():
    try:
        pipe = Pipeline.load(out)
        r = pipe.generate([image], ["What is shown?"], max_new_tokens=2)
        print(json.dumps([pipe.manifest.plan, r.kept_indices[0], r.token_ids[0]]), flush=True)
    except Exception as err:
        print("ERROR", type(err).__name__, str(err).splitlines()[0], flush=True)
"""

HOLDER = r"""
import sys, time
from pathlib import Path
from btp.compiler.publish import build_lock
with build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _compile(out, plan="btp"):
    return [sys.executable, "-m", "btp.cli.compile", "builtin:tiny-llava", "--plan", plan, "-o", str(out),
            "--force", *SMALL]


def _signature(out):
    from PIL import Image

    pipe = Pipeline.load(out)
    r = pipe.generate([Image.open(SAMPLE).convert("RGB")], ["What is shown?"], max_new_tokens=2)
    return json.loads(json.dumps([pipe.manifest.plan, r.kept_indices[0], r.token_ids[0]]))


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_two_concurrent_compiles_of_one_out_are_serialised(tmp_path):
    out = tmp_path / "art"
    procs = [subprocess.Popen(_compile(out, plan), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for plan in ("none", "none")]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        if code != 0:  # the one that came second while the first was building
            assert code == 2 and len(err.strip().splitlines()) == 1 and "is building it" in err, results
    read_manifest(out)  # whole and verified: one of the two, not a mix
    assert _siblings(out) == []


def test_readers_never_see_a_mix_while_builds_switch_the_artifact(artifact, tmp_path):
    a, b = artifact("btp"), artifact("fastv")  # b: what `_compile(out, "fastv")` builds, too
    expected = [_signature(a), _signature(b)]
    assert expected[0] != expected[1]
    out = tmp_path / "builds" / "art"
    out.parent.mkdir()
    shutil.copytree(a, out)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop), str(SAMPLE)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [reader.stdout.readline()]
        tick = time.perf_counter()
        lines.append(reader.stdout.readline())
        pace = time.perf_counter() - tick  # one load and answer on this machine now (about 0.1 s when it is idle)
        for i in range(24):  # what btp-compile --force does at its end, many times while the reader loads
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
            shutil.copytree([b, a][i % 2], tmp, dirs_exist_ok=True)
            with build_lock(out):
                publish(tmp, out)
            # Switches land while loads run, yet far enough apart that a retried load does not meet the next
            # (a busy machine slows the loads: the pace follows it).
            time.sleep(max(0.2, 2 * pace) + 0.05 * (i % 3))
        # ... and one real `btp-compile --force` (plan fastv) while the reader keeps loading.
        build = subprocess.run(_compile(out, "fastv"), capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr
    finally:
        stop.touch()
        rest, _ = reader.communicate(timeout=120)
    lines += rest.splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert errors == []
    loads = [json.loads(line) for line in lines]
    assert len(loads) >= 10
    assert all(load in expected for load in loads), "a load mixed two artifacts"
    assert expected[0] in loads and expected[1] in loads
    assert _signature(out) == expected[1]  # the real build's
    assert _siblings(out) == []


def test_a_locked_out_refuses_a_second_build_and_a_killed_build_leaves_old_or_new(artifact, tmp_path, capsys):
    """With real processes: a build holding OUT's lock makes another fail at once, touching nothing; builds
    killed at any moment leave the old or the new artifact at OUT, whole; the next build removes what they left
    (and only that)."""
    out = tmp_path / "art"
    shutil.copytree(artifact("btp"), out)
    old, new = _signature(artifact("btp")), _signature(artifact("fastv"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert compile_main(["builtin:tiny-llava", "--plan", "fastv", "-o", str(out), "--force", *SMALL]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"another btp-compile (pid {holder.pid}) is building it" in err[0]
        assert _signature(out) == old and _siblings(out) == [lock_path(out).name]
    finally:
        holder.kill()  # dies holding the lock: the kernel drops it, the file stays
        holder.wait()
    for delay in (3.0, 7.0):  # loading the model, exporting graphs
        build = subprocess.Popen(_compile(out, "fastv"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        build.send_signal(signal.SIGKILL)
        build.wait()
        assert _signature(out) in (old, new)  # loads, verified, whole
    os.makedirs(out.parent / f"{temp_prefix(out)}dead" / "onnx")
    (out.parent / ".other.tmp-keep").mkdir()
    assert compile_main(["builtin:tiny-llava", "--plan", "fastv", "-o", str(out), "--force", *SMALL]) == 0
    assert _signature(out) == new
    assert _siblings(out) == [".other.tmp-keep"]


def test_publish_falls_back_to_two_renames_where_the_exchange_is_unavailable(artifact, tmp_path, monkeypatch):
    from btp.compiler import publish as pub

    monkeypatch.setattr(pub, "_exchange", lambda a, b: False)
    out = tmp_path / "art"
    shutil.copytree(artifact("btp"), out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=tmp_path))
    shutil.copytree(artifact("fastv"), tmp, dirs_exist_ok=True)
    publish(tmp, out)
    assert _signature(out) == _signature(artifact("fastv"))
    assert _siblings(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic exchange is Linux's renameat2")
def test_the_exchange_keeps_out_in_place(tmp_path):
    """Over an existing OUT, the switch is one exchange: OUT's inode changes without OUT ever missing."""
    from btp.compiler.publish import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    assert _exchange(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"
