"""One input's outputs: staged, committed together, and told apart on a rerun."""

import json
import signal

import pytest

from amortize import outputs
from amortize.outputs import (
    ABSENT, COMPLETE, FOREIGN, OTHER_SETTINGS, PARTIAL, OutputSet, StopRequests, staged,
)

KINDS = ["csv", "overlay.png", "json"]


def commit(out, settings, stem="a"):
    files = OutputSet(out, stem, KINDS, settings)
    with staged(files):
        files.stage("csv", b"x,y\n")
        files.stage("overlay.png", b"png")
        files.stage_json({"count": 0})
        files.commit()
    return files


def test_a_commit_goes_from_absent_to_complete_and_leaves_no_journal(tmp_path):
    files = OutputSet(tmp_path / "out", "a", KINDS, {"threshold": 0.4})
    assert files.status() == ABSENT and not (tmp_path / "out").exists()
    commit(tmp_path / "out", {"threshold": 0.4})
    assert files.status() == COMPLETE
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.csv", "a.json", "a.overlay.png"]
    assert json.loads((tmp_path / "out" / "a.json").read_text())["settings"]["outputs"] == KINDS
    assert OutputSet(tmp_path / "out", "a", KINDS, {"threshold": 0.5}).status() == OTHER_SETTINGS
    # A file of a complete set removed: incomplete, and ours.
    (tmp_path / "out" / "a.overlay.png").unlink()
    assert files.status() == PARTIAL


def test_files_without_our_json_are_foreign_unless_a_journal_marks_them_ours(tmp_path):
    (tmp_path / "a.csv").write_text("x,y,radius,presence\n")  # a simulation's ground truth
    files = OutputSet(tmp_path, "a", KINDS, {})
    assert files.status() == FOREIGN
    (tmp_path / "a.json").write_text("{}")  # a JSON that amortize did not write
    assert files.status() == FOREIGN
    (tmp_path / "a.json").unlink()
    files.journal.write_text("{}")  # a commit was interrupted here
    assert files.status() == PARTIAL


def test_nothing_staged_is_left_when_the_block_fails(tmp_path):
    files = OutputSet(tmp_path, "a", KINDS, {})
    with pytest.raises(RuntimeError), staged(files):
        files.stage("csv", b"x")
        raise RuntimeError("the overlay failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not staged: json, overlay.png"):
        files.stage("csv", b"x")
        files.commit()


def test_an_inherited_ignore_of_sigint_is_kept(monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # handled
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outputs.FilesRun(stopped="SIGINT").exit_code == 130
