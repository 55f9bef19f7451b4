"""The one atomic writer: a finished write replaces the destination whole; a failed one leaves it as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from peft_clip_adapter.atomic import atomic_path, remove_abandoned, temporary_prefix, write_text


def test_a_file_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_a_folder_replaces_the_old_folder(tmp_path):
    target = tmp_path / "checkpoint"
    for content in ("first", "second"):
        with atomic_path(target) as path:
            path.mkdir()
            (path / "state.txt").write_text(content)
    assert (target / "state.txt").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_an_error_while_writing_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    write_text(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as path:
        path.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]


def test_a_writer_that_writes_nothing_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(OSError, match="Nothing was written for .*empty.json"), atomic_path(tmp_path / "empty.json"):
        pass


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path):
    # A file-size limit makes writes fail with EFBIG ("File too large"), as a full or quota-bound disk does.
    script = f"""
        import resource, signal
        from peft_clip_adapter.atomic import write_text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_text({str(tmp_path / "training_curves.png")!r}, "x" * 100_000)
        except OSError as error:
            print(error)
    """
    (tmp_path / "training_curves.png").write_text("old")
    output = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert output.returncode == 0, output.stderr
    assert "Could not write" in output.stdout and "training_curves.png" in output.stdout
    assert "File too large" in output.stdout
    assert (tmp_path / "training_curves.png").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["training_curves.png"]


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "cache.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = temporary_prefix(target).rsplit("-", 2)[0]
    (tmp_path / f"{prefix}-{dead.stdout.strip()}-abc").write_text("left by a killed run")
    (tmp_path / f"{temporary_prefix(target)}def").write_text("being written by this process")
    remove_abandoned(target)
    assert sorted(os.listdir(tmp_path)) == [f"{temporary_prefix(target)}def"]
