"""One input's output files, which appear all together or not at all.

`predict` and `refine` write several files per image (a table, pictures, a JSON summary). A
run killed between two of them would leave an image half done, and a rerun could not tell
it from a finished one. So each image's files are first written under temporary names
beside their targets, then renamed into place one by one, the JSON summary last: an image
whose JSON is there (with every other file) is complete; one with some files but not all
was interrupted, and is redone.

A rerun without `--force` skips complete images made with the same settings, redoes
incomplete ones and refuses to replace complete ones made with other settings (a model, a
threshold or a scale that differ), which `--force` overwrites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import threading
from typing import Iterator

from amortize import io
from amortize.errors import BadArgument, BadInput

@dataclasses.dataclass
class FilesRun:
    """What a folder run did: images written, images skipped (complete from an earlier run),
    errors (one per failed input), and the signal that stopped it early, if any."""

    done: int = 0
    skipped: int = 0
    errors: list = dataclasses.field(default_factory=list)
    stopped: str | None = None

    @property
    def exit_code(self) -> int:
        """The CLI's: 130 or 143 if stopped by SIGINT or SIGTERM, 1 if an input failed or
        none was done, else 0."""
        if self.stopped:
            return 128 + int(getattr(signal, self.stopped))
        return 1 if self.errors or self.done + self.skipped == 0 else 0


#: What `OutputSet.status` finds.
ABSENT, PARTIAL, COMPLETE, OTHER_SETTINGS, FOREIGN = (
    "absent", "partial", "complete", "other settings", "foreign")


class OutputSet:
    """The files `<out>/<stem>.<kind>` of one input (the last kind must be "json").

    A commit first writes a journal (`.<stem>.amortize-commit`), then removes an earlier
    JSON, renames the files into place, the JSON last, and removes the journal: files
    with a journal beside them are this program's, left by an interrupted commit.

    Args:
        out: the output folder (made when the first file is staged).
        stem: the input's name without its suffix.
        kinds: file kinds, e.g. ["csv", "overlay.png", "json"].
        settings: what decides the outputs' content (the command, the input file, the
            model and options), kept in the JSON under "settings"; complete outputs with
            other settings are not skipped.
    """

    def __init__(self, out: pathlib.Path, stem: str, kinds: list[str], settings: dict):
        if kinds[-1] != "json":
            raise ValueError("the JSON summary must be the last output")
        self.out = pathlib.Path(out)
        self.targets = {kind: self.out / f"{stem}.{kind}" for kind in kinds}
        self.journal = self.out / f".{stem}.amortize-commit"
        self.settings = json.loads(json.dumps({**settings, "outputs": kinds}))  # as it will read back
        self._staged: dict[str, pathlib.Path] = {}

    def status(self) -> str:
        """ABSENT (none of the files), COMPLETE (every file, made with the same settings),
        PARTIAL (this program's, incomplete: an interrupted commit, or a file of a complete
        set removed), OTHER_SETTINGS (a summary JSON made with other settings) or FOREIGN
        (files this program cannot tell as its own: not to be overwritten without force)."""
        present = {kind: path.exists() for kind, path in self.targets.items()}
        if self.journal.exists():
            return PARTIAL
        if not any(present.values()):
            return ABSENT
        if not present["json"]:
            return FOREIGN
        try:
            meta = json.loads(self.targets["json"].read_text())
        except (OSError, ValueError):
            return FOREIGN
        if not isinstance(meta, dict) or "settings" not in meta:
            return FOREIGN
        if meta["settings"] != self.settings:
            return OTHER_SETTINGS
        return COMPLETE if all(present.values()) else PARTIAL

    def stage(self, kind: str, data: bytes) -> None:
        """Write one file's content under a temporary name beside its target."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._staged[kind] = io.temp_beside(self.targets[kind], data)

    def stage_json(self, meta: dict) -> None:
        self.stage("json", io.json_bytes({**meta, "settings": self.settings}))

    def commit(self) -> None:
        """Rename every staged file into place, the JSON last (the mark of completion),
        under a journal that marks the files as this program's until the JSON is there."""
        if set(self._staged) != set(self.targets):
            missing = ", ".join(sorted(set(self.targets) - set(self._staged)))
            raise ValueError(f"outputs not staged: {missing}")
        io.write_bytes(self.journal, io.json_bytes(self.settings), force=True)
        # An earlier JSON goes first: until the new one is in place, the set is incomplete.
        with contextlib.suppress(FileNotFoundError):
            self.targets["json"].unlink()
        for kind, target in self.targets.items():
            io.publish(self._staged.pop(kind), target)
        self.journal.unlink()

    def discard(self) -> None:
        """Remove whatever was staged and not committed."""
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()


def input_identity(path: pathlib.Path) -> dict:
    """What names an input file in `OutputSet` settings: its full path, size and modification
    time (another file of the same name, or the same file edited, is another input)."""
    try:
        info = path.stat()
    except OSError:
        return {"input": str(path)}
    return {"input": str(path.resolve()), "input_bytes": info.st_size, "input_mtime_ns": info.st_mtime_ns}


def plan(path: pathlib.Path, outputs: OutputSet, seen: dict[str, pathlib.Path], force: bool,
         report) -> bool:
    """Whether `path` must be computed: False for complete outputs of the same settings
    (skipped), True otherwise; incomplete outputs are redone and `report` gets a line.

    Raises:
        BadInput: an earlier input of this run has the same stem, or complete outputs made
            with other settings exist and `force` is False.
    """
    stem = outputs.targets["json"].name[: -len(".json")]
    if stem in seen:
        raise BadInput(path, f"same output name as {seen[stem]} (rename one of them)")
    seen[stem] = path
    if force:
        return True
    status = outputs.status()
    if status == COMPLETE:
        return False
    if status == OTHER_SETTINGS:
        raise BadInput(outputs.targets["json"], "exists from a run with other settings or another "
                                                "input (use --force to overwrite)")
    if status == FOREIGN:
        existing = next(t for t in outputs.targets.values() if t.exists())
        raise BadInput(existing, "exists and is not a complete output of amortize (use --force to "
                                 "overwrite)")
    if status == PARTIAL:
        report(f"note: {path}: outputs of an interrupted run are incomplete; redoing them")
    return True


def check_out_dir(out: pathlib.Path) -> bool:
    """Reject an --out that cannot be a folder, before any work; returns whether it exists.

    Raises:
        BadArgument: it is a file, or lies under one, or cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise BadArgument(out, "--out exists and is not a directory")
    parent = out if out.exists() else io.existing_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadArgument(out, "output directory is not writable")
    return out.exists()


def remove_if_empty(out: pathlib.Path, existed: bool) -> None:
    """Remove an --out folder this run made and left empty (every input failed)."""
    if not existed:
        with contextlib.suppress(OSError):
            out.rmdir()


class StopRequests:
    """SIGINT and SIGTERM ask a folder run to stop after the image at hand (a second one
    stops at once), and `notify` gets one line saying so; elsewhere than in the main
    thread, signals keep their handlers.

        with StopRequests() as stop:
            for path in files:
                if stop.requested:
                    break
    """

    def __init__(self, notify=None):
        self.requested: str | None = None
        self._notify = notify
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:  # the second: stop now (what was staged is discarded)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._notify is not None:  # refining an image can take minutes: say it was heard
            with contextlib.suppress(Exception):  # a handler must not fail on a busy stream
                self._notify(f"note: {self.requested} received; stopping after the image at hand "
                             "(send it again to stop now)")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored by the caller: stays so
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staged(outputs: OutputSet) -> Iterator[OutputSet]:
    """`outputs`, whose staged files are removed if the block does not commit them."""
    try:
        yield outputs
    finally:
        outputs.discard()
