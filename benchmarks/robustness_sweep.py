#!/usr/bin/env python3
"""Robustness sweep of issue 34: 54 bad inputs, faults and interruptions against the
`amortize` console script (`predict`, `train`, `simulate`).

Every case runs the CLI in a subprocess (with a timeout), in its own folder under a temporary
directory, with inputs this script builds itself (simulated scenes from `amortize simulate`,
images drawn with Pillow/numpy, a tiny training run of `train/tiny.toml`). For each case it
records the command, the exit code, the first stderr line, the files written and a verdict,
`clean` or `NOT clean` with the reasons, judged against the case's own expectations (exit
code, one stderr line and no traceback, outputs complete or absent, no `*.tmp` left, good
images still written, ...).

    .venv/bin/python benchmarks/robustness_sweep.py --skip-slow --out sweep.md
    .venv/bin/python benchmarks/robustness_sweep.py --only "kill -9"

It prints a Markdown table and a total line ("N of 54 clean") on stdout, and progress on
stderr. Cases run one at a time. Runs get a private compilation cache (AMORTIZE_CACHE_DIR in
the temporary directory, warmed by the set-up), so your ~/.cache is neither read nor filled.
Needs only the standard library, numpy and Pillow. On 2 cores the whole sweep took 7.7 min
(the 10000 x 10000 image case ~3 min of it, and ~5 GB of memory; --skip-slow leaves it out);
against the code before the fixes, whose failing runs are slower, 9.3 min with --skip-slow.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
PREFIX = {"predict": "amortize predict:", "train": "amortize train:", "simulate": "amortize simulate:"}
OUTPUT_KINDS = (".csv", ".json", ".overlay.png")  # what predict writes per image
RUN_TIMEOUT = 300  # s, per subprocess unless a case says otherwise
BAR = re.compile(r"\d+%\|")  # a tqdm progress-bar segment
# This process opens only images it made or the outputs of the runs (a 10000 x 10000 overlay
# must not raise Pillow's decompression-bomb warning here, where it would be mistaken for
# the run's).
Image.MAX_IMAGE_PIXELS = None


# ---------------------------------------------------------------------------------------
# Running the CLI


class Proc:
    """One finished (or killed) run of the console script."""

    def __init__(self, args, rc, stdout, stderr, seconds, maxrss_kb, timed_out):
        self.args, self.rc, self.stdout, self.stderr = args, rc, stdout, stderr
        self.seconds, self.maxrss_kb, self.timed_out = seconds, maxrss_kb, timed_out

    @property
    def lines(self) -> list[str]:
        """Non-blank stderr lines (split on newlines only)."""
        return [line for line in self.stderr.split("\n") if line.strip()]

    @property
    def segments(self) -> list[str]:
        """Non-blank stderr pieces, split on newlines and carriage returns."""
        return [s.strip() for s in re.split(r"[\r\n]", self.stderr) if s.strip()]

    @property
    def first_line(self) -> str:
        """The first stderr line that is not just a progress bar."""
        segs = [s for s in self.segments if not (BAR.search(s) and "amortize" not in s)]
        return segs[0] if segs else ""

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def rc_text(self) -> str:
        return "timeout" if self.timed_out else str(self.rc)


class Handle:
    """A running console script; reaped with os.wait4 so that its peak memory is known."""

    def __init__(self, args, popen, out_path, err_path):
        self.args, self.popen, self.out_path, self.err_path = args, popen, out_path, err_path
        self.t0 = time.monotonic()
        self.rc = None
        self.maxrss_kb = None
        self.seconds = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self):
        if self.rc is None:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
                self.popen.returncode = self.rc
                self.maxrss_kb = usage.ru_maxrss
                self.seconds = time.monotonic() - self.t0
        return self.rc

    def wait(self, timeout: float) -> bool:
        """True if it exited within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(60)

    def finish(self, timeout: float) -> Proc:
        timed_out = not self.wait(timeout)
        if timed_out:
            self.kill()
        return Proc(self.args, self.rc, self.out_path.read_text(errors="replace"),
                     self.err_path.read_text(errors="replace"), self.seconds or 0.0, self.maxrss_kb,
                     timed_out)


class Sweep:
    """Shared state: the executable, the temporary folders, the environment, the fixtures."""

    def __init__(self, exe: pathlib.Path, root: pathlib.Path, seed: int):
        self.exe = exe
        self.root = root
        self.rng = random.Random(seed)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cache = root / "cache"  # shared by every run that does not set its own
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AMORTIZE_")}
        self.env["AMORTIZE_CACHE_DIR"] = str(self.cache)
        self.env.pop("PYTHONWARNINGS", None)
        self.n_runs = 0
        self.fixtures = Fixtures(self)

    def start(self, args: list[str], cwd: pathlib.Path, env: dict | None = None) -> Handle:
        self.n_runs += 1
        out = self.logs / f"{self.n_runs:03d}.out"
        err = self.logs / f"{self.n_runs:03d}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            # As from a terminal: SIGINT not ignored. A sweep started in the background by a
            # shell without job control inherits SIGINT ignored, and a program rightly keeps
            # an inherited "ignore" (Python itself then never raises KeyboardInterrupt).
            popen = subprocess.Popen([str(self.exe), *args], cwd=cwd, env=env or self.env,
                                     stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return Handle(args, popen, out, err)

    def run(self, args: list[str], cwd: pathlib.Path, env: dict | None = None,
            timeout: float = RUN_TIMEOUT) -> Proc:
        return self.start(args, cwd, env).finish(timeout)


class SetupError(Exception):
    """A fixture could not be built."""


class Fixtures:
    """Inputs shared by several cases, built on first use."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.dir = sweep.root / "fixtures"
        self.dir.mkdir(exist_ok=True)
        self._scenes = None
        self._tiny = None
        self._warm = False

    def scenes(self) -> list[pathlib.Path]:
        """20 simulated 128 x 96 scenes (Pillow-drawn discs if `simulate` fails)."""
        if self._scenes is None:
            out = self.dir / "sim"
            p = self.sweep.run(["simulate", "--out", "sim", "--n", "20", "--size", "128", "96",
                                "--seed", "0", "--quiet"], cwd=self.dir)
            scenes = sorted(out.glob("*.png")) if out.is_dir() else []
            if p.rc != 0 or len(scenes) != 20:
                print(f"  set-up: simulate failed (rc {p.rc_text}: {p.first_line[:100]}); "
                      "drawing scenes with Pillow instead", file=sys.stderr)
                out = self.dir / "drawn"
                out.mkdir(exist_ok=True)
                scenes = [draw_scene(out / f"scene_{i:05d}.png", seed=i) for i in range(20)]
            self._scenes = scenes
        return self._scenes

    def good(self, i: int = 0) -> pathlib.Path:
        return self.scenes()[i]

    def warm(self) -> None:
        """One predict, so that the shared compilation cache and program store are warm."""
        if not self._warm:
            self._warm = True
            p = self.sweep.run(["predict", str(self.good(0)), "--out", "warm", "--quiet"], cwd=self.dir)
            if p.rc != 0:
                print(f"  set-up: warm-up predict failed (rc {p.rc_text}: {p.first_line[:100]})",
                      file=sys.stderr)

    def tiny_recipe(self) -> pathlib.Path:
        path = self.dir / "tiny.toml"
        if not path.exists():
            shutil.copy(REPO / "train" / "tiny.toml", path)
        return path

    def tiny_workdir(self) -> pathlib.Path:
        """A finished `train/tiny.toml` run with two checkpoint steps (copy it before use)."""
        if self._tiny is None:
            w = self.dir / "tiny_w"
            p = self.sweep.run(["train", "--config", str(self.tiny_recipe()), "--workdir", str(w),
                                "--no-log", "--quiet"], cwd=self.dir)
            steps = checkpoint_steps(w)
            if p.rc != 0:
                raise SetupError(f"tiny training failed (rc {p.rc_text}: {p.first_line[:100]})")
            if len(steps) < 2:
                # Make a second, earlier step by copying the one there is.
                if not steps:
                    raise SetupError("tiny training saved no checkpoint")
                src = w / "checkpoints" / str(steps[-1])
                shutil.copytree(src, w / "checkpoints" / str(max(steps[-1] - 1, 0)))
            self._tiny = w
        return self._tiny


# ---------------------------------------------------------------------------------------
# Inputs


def draw_scene(path: pathlib.Path, seed: int, size=(128, 96)) -> pathlib.Path:
    """A light background with a few dark discs (the fallback good image)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(0.6, 0.8, 3)
    for _ in range(8):
        cx, cy, r = rng.uniform(8, w - 8), rng.uniform(8, h - 8), rng.uniform(3, 7)
        d = np.hypot(xx - cx, yy - cy)
        img[d < r] = rng.uniform(0.1, 0.35, 3)
    img += rng.normal(0, 0.01, img.shape)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def stream_png(path: pathlib.Path, width: int, height: int, bit_depth: int, color_type: int, rows) -> None:
    """Write a PNG row by row (filter 0), without ever holding the image in memory."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)))
        pending = bytearray()
        for row in rows:
            pending += comp.compress(b"\x00" + row)
            if len(pending) > 1 << 20:
                f.write(chunk(b"IDAT", bytes(pending)))
                pending.clear()
        pending += comp.flush()
        f.write(chunk(b"IDAT", bytes(pending)))
        f.write(chunk(b"IEND", b""))


def huge_bilevel_png(path: pathlib.Path, side: int = 20000) -> pathlib.Path:
    """A side x side 1-bit PNG (Pillow mode "1"): white with a few black squares."""
    white = b"\xff" * (side // 8)
    marked = bytearray(white)
    for i in range(100, side // 8, 250):
        marked[i:i + 3] = b"\x00\x00\x00"
    marked = bytes(marked)
    stream_png(path, side, side, 1, 0, (marked if (y // 24) % 40 == 5 else white for y in range(side)))
    return path


def big_tiled_png(path: pathlib.Path, scene: pathlib.Path, side: int = 10000) -> pathlib.Path:
    """A side x side 8-bit RGB PNG tiled with copies of `scene` (a good image)."""
    with Image.open(scene) as im:
        tile = np.asarray(im.convert("RGB"))
    th, tw = tile.shape[:2]
    reps = -(-side // tw)
    strip = np.tile(tile, (1, reps, 1))[:, :side]  # one row of tiles, side px wide
    rows = (strip[y % th].tobytes() for y in range(side))
    stream_png(path, side, side, 8, 2, rows)
    return path


def check_header(path: pathlib.Path, size: tuple[int, int], mode: str) -> None:
    with Image.open(path) as im:
        if im.size != size or im.mode != mode:
            raise SetupError(f"{path.name} reads as {im.size} {im.mode}, not {size} {mode}")


def checkpoint_steps(workdir_or_model: pathlib.Path) -> list[int]:
    d = workdir_or_model / "checkpoints"
    d = d if d.is_dir() else workdir_or_model
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def step_dir(workdir_or_model: pathlib.Path, which: int = -1) -> pathlib.Path:
    d = workdir_or_model / "checkpoints"
    d = d if d.is_dir() else workdir_or_model
    return d / str(checkpoint_steps(workdir_or_model)[which])


def data_files(step: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a checkpoint step (tensorstore/ocdbt `d/` folders)."""
    files = [p for p in step.rglob("*") if p.is_file() and p.parent.name == "d"]
    if not files:
        files = sorted((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)[-1:]
    return files


def truncate_files(files: list[pathlib.Path]) -> None:
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


def zero_files(files: list[pathlib.Path]) -> None:
    for f in files:
        f.write_bytes(bytes(f.stat().st_size))


def copy_images(paths, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder / p.name)
    return folder


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------------------------------
# A case and its checks


def tree(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under `folder`."""
    found = {}
    if folder.is_dir():
        for dirpath, _, names in os.walk(folder):
            for name in names:
                p = pathlib.Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                found[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return found


def image_state(out: pathlib.Path, stem: str) -> str:
    have = [k for k in OUTPUT_KINDS if (out / f"{stem}{k}").exists()]
    if len(have) == len(OUTPUT_KINDS):
        try:
            json.loads((out / f"{stem}.json").read_text())
            with Image.open(out / f"{stem}.overlay.png") as im:
                im.verify()  # the whole PNG is there, its chunks' checksums right
            header = (out / f"{stem}.csv").read_text().split("\n", 1)[0]
            if not header.startswith("x,y,"):
                return "corrupt csv"
        except Exception as err:  # noqa: BLE001
            return f"corrupt ({type(err).__name__})"
        return "complete"
    return "absent" if not have else "partial (" + ", ".join(have) + ")"


def tmp_files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp")) if folder.is_dir() else []


class Case:
    """One case being run: its folder, its runs and its verdict."""

    def __init__(self, sweep: Sweep, number: int, name: str, verb: str):
        self.sweep, self.number, self.name, self.verb = sweep, number, name, verb
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50]
        self.dir = sweep.root / "cases" / f"{number:02d}-{slug}"
        self.dir.mkdir(parents=True)
        self.fx = sweep.fixtures
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.key: Proc | None = None
        self.rc_text: str | None = None  # overrides the key run's exit code in the table
        self.first_text: str | None = None  # and its first stderr line
        self.commands: list[str] = []
        self.command_text: str | None = None
        self.before: dict | None = None
        self.skipped: str | None = None
        self.seconds = 0.0

    # running
    def snapshot(self) -> None:
        if self.before is None:
            self.before = tree(self.dir)

    def start(self, args: list[str], env: dict | None = None) -> Handle:
        self.snapshot()
        self.commands.append(" ".join(shlex.quote(a) for a in args))
        return self.sweep.start(args, self.dir, env)

    def run(self, args: list[str], env: dict | None = None, timeout: float = RUN_TIMEOUT,
            key: bool | None = None) -> Proc:
        p = self.start(args, env).finish(timeout)
        self.record(p, key)
        return p

    def record(self, p: Proc, key: bool | None = None) -> None:
        if key or (key is None and self.key is None):
            self.key = p
        if p.timed_out:
            self.fail(f"`{p.args[0]}` timed out")

    def sub_run(self, args: list[str], judge) -> Proc:
        """One of several runs of the same check: the table shows the first that fails."""
        before = len(self.problems)
        p = self.run(args, key=None)
        judge(p)
        if len(self.problems) > before and not getattr(self, "_failed_key", False):
            self.key, self._failed_key = p, True
        return p

    # judging
    def fail(self, reason: str) -> None:
        self.problems.append(reason)

    def check(self, ok: bool, reason: str) -> bool:
        if not ok:
            self.fail(reason)
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    def expect_rc(self, p: Proc, allowed, what: str = "") -> None:
        allowed = (allowed,) if isinstance(allowed, int) else tuple(allowed)
        if not p.timed_out and p.rc not in allowed:
            want = " or ".join(str(a) for a in allowed)
            self.fail(f"{what}exit {p.rc}, expected {want}")

    def expect_no_traceback(self, p: Proc, what: str = "") -> None:
        if p.traceback:
            self.fail(f"{what}traceback on stderr ({len(p.lines)} lines)")

    def expect_lines(self, p: Proc, n: int, what: str = "") -> None:
        """Exactly `n` stderr lines, none a traceback, the first not `Traceback`."""
        lines = p.lines
        if lines and lines[0].startswith("Traceback"):
            self.fail(f"{what}first stderr line is `Traceback`")
        self.expect_no_traceback(p, what)
        if len(lines) != n:
            self.fail(f"{what}{len(lines)} stderr lines, expected {n}")

    def expect_prefixed(self, p: Proc, what: str = "", most: int | None = None) -> None:
        """Every stderr line is the verb's own (`amortize VERB: ...`), and at most `most`."""
        self.expect_no_traceback(p, what)
        others = [line for line in p.lines if not line.startswith(PREFIX[self.verb])]
        if others:
            self.fail(f"{what}stderr line not from amortize: `{others[0].strip()[:60]}`")
        if most is not None and len(p.lines) > most:
            self.fail(f"{what}{len(p.lines)} stderr lines, expected at most {most}")

    def one_line_error(self, p: Proc, rc=1, what: str = "") -> None:
        self.expect_rc(p, rc, what)
        self.expect_lines(p, 1, what)

    def expect_outputs(self, out: pathlib.Path, stems, state: str = "complete", what: str = "") -> None:
        for stem in stems:
            got = image_state(out, stem)
            if got != state:
                self.fail(f"{what}{stem}: outputs {got}, expected {state}")

    def expect_complete_or_absent(self, out: pathlib.Path, stems, what: str = "") -> None:
        bad = {s: image_state(out, s) for s in stems}
        bad = {s: v for s, v in bad.items() if v not in ("complete", "absent")}
        if bad:
            s, v = next(iter(bad.items()))
            self.fail(f"{what}{len(bad)} image(s) half-written (e.g. {s}: {v})")

    def expect_empty(self, folder: pathlib.Path, what: str) -> None:
        files = tree(folder)
        if files:
            names = ", ".join(n if len(n) < 40 else n[:37] + "..." for n in sorted(files)[:3])
            self.fail(f"{what} not empty ({len(files)} files: {names})")

    def expect_no_tmp(self, folder: pathlib.Path, what: str = "") -> None:
        left = tmp_files(folder)
        if left:
            self.fail(f"{what}{len(left)} *.tmp left ({left[0]})")

    # the table row
    def files_written(self) -> str:
        after = tree(self.dir)
        before = self.before or {}
        written = sorted(k for k, v in after.items() if before.get(k) != v)
        if not written:
            return "none"
        groups: dict[str, list[str]] = {}
        for w in written:
            head, _, rest = w.partition(os.sep)
            groups.setdefault(head if rest else ".", []).append(rest or head)
        parts = []
        for head, names in groups.items():
            shown = ", ".join(names) if len(names) <= 4 else f"{len(names)} files"
            parts.append(shown if head == "." else f"{head}/: {shown}")
        return f"{len(written)}: " + "; ".join(parts)

    def verdict(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        text = "clean" if not self.problems else "NOT clean: " + "; ".join(self.problems)
        return text + ("" if not self.notes else " (" + "; ".join(self.notes) + ")")

    @property
    def clean(self) -> bool:
        return not self.skipped and not self.problems


# ---------------------------------------------------------------------------------------
# The cases

CASES: list[tuple[str, str, bool, object]] = []  # (verb, name, slow, function)


def case(verb: str, name: str, slow: bool = False):
    def register(fn):
        CASES.append((verb, name, slow, fn))
        return fn
    return register


def predict_args(*inputs, out="out", extra=()) -> list[str]:
    return ["predict", *map(str, inputs), "--out", out, "--quiet", *extra]


def _predict_one(c: Case, make):
    """Run predict on the one input `make(in_folder)` returns: (that path, the run)."""
    c.fx.warm()
    inp = c.dir / "in"
    inp.mkdir()
    path = make(inp)
    return path, c.run(predict_args(path.relative_to(c.dir)))


def bad_single_input(c: Case, make) -> None:
    """One bad input: one line, exit 1, nothing written."""
    path, p = _predict_one(c, make)
    c.one_line_error(p, 1)
    if p.lines and path.name not in p.lines[0]:
        c.fail("the line does not name the file")
    c.expect_empty(c.dir / "out", "--out")


def good_variant(c: Case, make) -> None:
    """A supported image format: written, exit 0, nothing on stderr."""
    path, p = _predict_one(c, make)
    c.expect_rc(p, 0)
    c.expect_lines(p, 0)
    c.expect_outputs(c.dir / "out", [path.stem])


@case("predict", "missing file")
def _(c):
    bad_single_input(c, lambda d: d / "missing.png")


@case("predict", "empty file (0 bytes)")
def _(c):
    def make(d):
        (d / "empty.png").write_bytes(b"")
        return d / "empty.png"
    bad_single_input(c, make)


@case("predict", "text file renamed .png")
def _(c):
    def make(d):
        (d / "notes.png").write_text("droplet counts, see lab book p. 12\n" * 20)
        return d / "notes.png"
    bad_single_input(c, make)


@case("predict", "truncated PNG")
def _(c):
    def make(d):
        data = c.fx.good(0).read_bytes()
        (d / "cut.png").write_bytes(data[: len(data) // 2])
        return d / "cut.png"
    bad_single_input(c, make)


@case("predict", "truncated JPEG")
def _(c):
    def make(d):
        full = d / "full.jpg.src"
        with Image.open(c.fx.good(0)) as im:
            im.convert("RGB").save(full, format="JPEG", quality=90)
        data = full.read_bytes()
        full.unlink()
        (d / "cut.jpg").write_bytes(data[: len(data) // 2])
        return d / "cut.jpg"
    bad_single_input(c, make)


@case("predict", "1x1 image")
def _(c):
    def make(d):
        Image.new("RGB", (1, 1), (120, 120, 120)).save(d / "dot.png")
        return d / "dot.png"
    bad_single_input(c, make)


@case("predict", "CMYK JPEG")
def _(c):
    # Either read (written, exit 0, silent) or refused in one line (exit 1).
    c.fx.warm()
    inp = c.dir / "in"
    inp.mkdir()
    with Image.open(c.fx.good(1)) as im:
        im.convert("CMYK").save(inp / "cmyk.jpg", format="JPEG", quality=90)
    p = c.run(predict_args("in/cmyk.jpg"))
    if p.rc == 0:
        c.expect_lines(p, 0)
        c.expect_outputs(c.dir / "out", ["cmyk"])
        c.note("read")
    else:
        c.one_line_error(p, 1)
        c.expect_empty(c.dir / "out", "--out")
        c.note("refused")


@case("predict", "16-bit grey PNG")
def _(c):
    def make(d):
        with Image.open(c.fx.good(2)) as im:
            grey = np.asarray(im.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(d / "grey16.png")
        check_header(d / "grey16.png", (grey.shape[1], grey.shape[0]), "I;16")
        return d / "grey16.png"
    good_variant(c, make)


@case("predict", "RGBA PNG")
def _(c):
    def make(d):
        with Image.open(c.fx.good(3)) as im:
            rgba = im.convert("RGBA")
        alpha = Image.linear_gradient("L").resize(rgba.size)
        rgba.putalpha(alpha)
        rgba.save(d / "rgba.png")
        return d / "rgba.png"
    good_variant(c, make)


@case("predict", "palette PNG")
def _(c):
    def make(d):
        with Image.open(c.fx.good(4)) as im:
            im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(d / "palette.png")
        return d / "palette.png"
    good_variant(c, make)


@case("predict", "float TIFF with NaN and inf")
def _(c):
    def make(d):
        with Image.open(c.fx.good(5)) as im:
            a = np.asarray(im.convert("L"), np.float32) / 255.0
        a[10, 10] = np.nan
        a[20, 30] = np.inf
        a[40, 50] = -np.inf
        Image.fromarray(a, mode="F").save(d / "float.tif")
        return d / "float.tif"
    bad_single_input(c, make)


@case("predict", "directory with no images")
def _(c):
    c.fx.warm()
    (c.dir / "in").mkdir()
    (c.dir / "in" / "README.txt").write_text("no images here\n")
    p = c.run(predict_args("in"))
    c.one_line_error(p, (1, 2))
    c.expect_empty(c.dir / "out", "--out")


@case("predict", "directory with one bad and one good image")
def _(c):
    c.fx.warm()
    inp = copy_images([c.fx.good(0)], c.dir / "in")
    (inp / "bad.png").write_text("not an image\n")
    p = c.run(predict_args("in"))
    c.one_line_error(p, 1)
    if p.lines and "bad.png" not in p.lines[0]:
        c.fail("the line does not name bad.png")
    c.expect_outputs(c.dir / "out", [c.fx.good(0).stem])
    c.expect_outputs(c.dir / "out", ["bad"], "absent")


@case("predict", "two inputs with the same stem")
def _(c):
    c.fx.warm()
    name = c.fx.good(0).name
    copy_images([c.fx.good(0)], c.dir / "a")
    (c.dir / "b").mkdir()
    shutil.copy(c.fx.good(1), c.dir / "b" / name)  # another image, the same name
    p = c.run(predict_args(f"a/{name}", f"b/{name}"))
    stem = c.fx.good(0).stem
    # One is written; the other is refused in one line, never silently overwriting it.
    c.one_line_error(p, 1)
    c.expect_outputs(c.dir / "out", [stem])


@case("predict", "--out is an existing file")
def _(c):
    c.fx.warm()
    (c.dir / "out").write_text("keep me\n")
    p = c.run(predict_args(c.fx.good(0)))
    c.one_line_error(p, 2)
    c.check((c.dir / "out").read_text() == "keep me\n", "the file given as --out was changed")


@case("predict", "--out not writable")
def _(c):
    c.fx.warm()
    out = c.dir / "out"
    out.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(out)], capture_output=True)
        if r.returncode != 0:
            c.skipped = "running as root and chattr +i is not available"
            return
        c.note("root: made immutable with chattr +i")
    else:
        out.chmod(0o555)
    try:
        p = c.run(predict_args(c.fx.good(0)))
        c.one_line_error(p, (1, 2))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        else:
            out.chmod(0o755)
    c.expect_empty(out, "--out")


@case("predict", "bad --threshold (0, 1.5, abc)")
def _(c):
    for value in ("0", "1.5", "abc"):
        c.sub_run(predict_args(c.fx.good(0), extra=("--threshold", value)),
                  lambda p: c.one_line_error(p, 2, f"--threshold {value}: "))
    c.expect_empty(c.dir / "out", "--out")


@case("predict", "bad --scale out of range (-1, 0)")
def _(c):
    for value in ("-1", "0"):
        c.sub_run(predict_args(c.fx.good(0), extra=(f"--scale={value}",)),
                  lambda p: c.one_line_error(p, 2, f"--scale {value}: "))
    c.expect_empty(c.dir / "out", "--out")


@case("predict", "bad --scale not a number (nan, abc)")
def _(c):
    for value in ("nan", "abc"):
        c.sub_run(predict_args(c.fx.good(0), extra=("--scale", value)),
                  lambda p: c.one_line_error(p, 2, f"--scale {value}: "))
    c.expect_empty(c.dir / "out", "--out")


def bad_checkpoint(c: Case, make) -> None:
    c.fx.warm()
    ck = make()
    p = c.run(predict_args(c.fx.good(0), extra=("--checkpoint", str(ck.relative_to(c.dir)))))
    c.one_line_error(p, (1, 2))
    c.expect_empty(c.dir / "out", "--out")


@case("predict", "--checkpoint folder missing")
def _(c):
    bad_checkpoint(c, lambda: c.dir / "no-such-model")


@case("predict", "--checkpoint is a file")
def _(c):
    def make():
        (c.dir / "model.msgpack").write_bytes(b"\x00" * 64)
        return c.dir / "model.msgpack"
    bad_checkpoint(c, make)


@case("predict", "--checkpoint empty folder")
def _(c):
    def make():
        (c.dir / "model").mkdir()
        return c.dir / "model"
    bad_checkpoint(c, make)


@case("predict", "checkpoint with a missing config")
def _(c):
    def make():
        ck = c.dir / "model"
        shutil.copytree(REPO / "checkpoints" / "default", ck)
        step = step_dir(ck)
        if not (step / "config").is_dir():
            raise SetupError(f"{step} has no config item")
        shutil.rmtree(step / "config")
        return ck
    bad_checkpoint(c, make)


def damaged_newest_predict(c: Case, damage) -> None:
    """Newest step damaged, an intact earlier one: one warning line, exit 0, written."""
    c.fx.warm()
    w = c.dir / "run"
    shutil.copytree(c.fx.tiny_workdir(), w)
    steps = checkpoint_steps(w)
    damage(data_files(step_dir(w)))
    c.note(f"steps {steps}, newest damaged")
    p = c.run(predict_args(c.fx.good(0), extra=("--checkpoint", "run")))
    c.expect_rc(p, 0)
    c.expect_lines(p, 1)
    c.expect_outputs(c.dir / "out", [c.fx.good(0).stem])


@case("predict", "checkpoint with a truncated newest step")
def _(c):
    damaged_newest_predict(c, truncate_files)


@case("predict", "checkpoint with zeroed data")
def _(c):
    damaged_newest_predict(c, zero_files)


@case("predict", "20000x20000 1-bit PNG beside a good image")
def _(c):
    c.fx.warm()
    inp = copy_images([c.fx.good(0)], c.dir / "in")
    huge_bilevel_png(inp / "huge.png")
    check_header(inp / "huge.png", (20000, 20000), "1")
    p = c.run(predict_args("in"))
    c.one_line_error(p, 1)
    if p.lines and "huge.png" not in p.lines[0]:
        c.fail("the line does not name huge.png")
    c.expect_outputs(c.dir / "out", [c.fx.good(0).stem])
    c.expect_outputs(c.dir / "out", ["huge"], "absent")


@case("predict", "10000x10000 image", slow=True)
def _(c):
    c.fx.warm()
    (c.dir / "in").mkdir()
    big_tiled_png(c.dir / "in" / "big.png", c.fx.good(0))
    check_header(c.dir / "in" / "big.png", (10000, 10000), "RGB")
    p = c.run(predict_args("in/big.png"), timeout=600)
    c.note(f"{p.seconds:.0f} s, peak RSS {(p.maxrss_kb or 0) / 2**20:.1f} GB")
    c.check("DecompressionBomb" not in p.stderr, "raw DecompressionBomb warning on stderr")
    if p.rc == 0:
        c.expect_prefixed(p, most=1)
        c.expect_outputs(c.dir / "out", ["big"])
        if image_state(c.dir / "out", "big") == "complete":
            count = json.loads((c.dir / "out" / "big.json").read_text()).get("count")
            c.note(f"count {count} in {(10000 // 128) * (10000 // 96)}+ tiled copies of a scene")
            c.check(bool(count), "no droplet found in a frame tiled with a scene where they are")
    else:
        c.one_line_error(p, 1)
        c.check(bool(re.search(r"pixel|10000", p.first_line, re.I)), "the line does not give the size or limit")


@case("predict", "multi-page TIFF, blank page 0, droplets on page 1")
def _(c):
    c.fx.warm()
    (c.dir / "in").mkdir()
    with Image.open(c.fx.good(6)) as im:
        page1 = im.convert("RGB")
    page0 = Image.new("RGB", page1.size, (185, 185, 185))
    page0.save(c.dir / "in" / "stack.tif", save_all=True, append_images=[page1])
    p = c.run(predict_args("in/stack.tif"))
    c.expect_rc(p, (0, 1))
    c.expect_lines(p, 1)
    c.check(bool(re.search(r"page", p.stderr, re.I)), "nothing says the file has 2 pages (silent)")
    if p.rc == 0:
        c.expect_outputs(c.dir / "out", ["stack"])


@case("predict", "rerun into the same --out without --force")
def _(c):
    c.fx.warm()
    copy_images([c.fx.good(i) for i in range(3)], c.dir / "in")
    first = c.run(predict_args("in"), key=False)
    c.expect_rc(first, 0, "first run: ")
    before = tree(c.dir / "out")
    p = c.run(predict_args("in"), key=True)
    c.expect_rc(p, 0, "rerun: ")
    c.expect_prefixed(p, "rerun: ", most=1)
    c.expect_outputs(c.dir / "out", [c.fx.good(i).stem for i in range(3)])
    c.check(tree(c.dir / "out") == before, "rerun changed the complete outputs")


@case("predict", "rerun with --force")
def _(c):
    c.fx.warm()
    copy_images([c.fx.good(i) for i in range(3)], c.dir / "in")
    first = c.run(predict_args("in"), key=False)
    c.expect_rc(first, 0, "first run: ")
    before = tree(c.dir / "out")
    p = c.run(predict_args("in", extra=("--force",)), key=True)
    c.expect_rc(p, 0, "rerun: ")
    c.expect_lines(p, 0, "rerun: ")
    c.expect_outputs(c.dir / "out", [c.fx.good(i).stem for i in range(3)])
    after = tree(c.dir / "out")
    c.check(all(after.get(k) != v for k, v in before.items()), "--force did not rewrite the outputs")
    c.expect_no_tmp(c.dir / "out")


@case("predict", "--out holds unrelated files")
def _(c):
    c.fx.warm()
    out = c.dir / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    p = c.run(predict_args(c.fx.good(0)))
    c.check((out / "notes.txt").read_text() == "mine\n", "the unrelated file was changed")
    readme = (REPO / "README.md").read_text()
    says_refused = bool(re.search(r"non-empty\s+output\s+(directory|folder)\s+is\s+refused", readme))
    if p.rc == 0:
        c.expect_lines(p, 0)
        c.expect_outputs(out, [c.fx.good(0).stem])
        c.check(not says_refused, "wrote into it, but the README says a non-empty output directory is refused")
        c.note("written")
    else:
        c.one_line_error(p, 2)
        c.check(set(tree(out)) == {"notes.txt"}, "refused, yet files were written")
        c.note("refused")


def output_files(out: pathlib.Path) -> int:
    """Final-named outputs in `out` (not temporary or hidden files)."""
    if not out.is_dir():
        return 0
    return sum(1 for p in out.iterdir() if not p.name.startswith(".") and not p.name.endswith(".tmp"))


def interrupted_folder(c: Case, sig: int, label: str) -> None:
    """A 20-image folder predict stopped by `sig` at a random moment, then rerun.

    The moment: once a random number (1-40) of the 60 output files is there, plus a random
    0-0.2 s, so that at least a third of the folder is still to do when the signal comes.
    """
    c.fx.warm()
    stems = [p.stem for p in c.fx.scenes()]
    copy_images(c.fx.scenes(), c.dir / "in")
    out = c.dir / "out"
    for attempt in range(3):
        if out.exists():
            shutil.rmtree(out)
        target = c.sweep.rng.randint(1, 40) if attempt < 2 else 1
        delay = c.sweep.rng.uniform(0.0, 0.2) if attempt < 2 else 0.0
        h = c.start(predict_args("in"))
        while h.poll() is None and output_files(out) < target:
            if time.monotonic() - h.t0 > RUN_TIMEOUT:
                break
            time.sleep(0.01)
        time.sleep(delay)
        done_before = sum(image_state(out, s) == "complete" for s in stems)
        if h.poll() is None:
            t_sig = time.monotonic() - h.t0
            os.kill(h.pid, sig)
            break
        c.commands.pop()
        c.note(f"attempt {attempt + 1} finished before the signal")
    else:
        c.fail("could not signal the run before it finished (3 tries)")
        return
    p = h.finish(60)
    c.record(p, key=True)
    done = sum(image_state(out, s) == "complete" for s in stems)
    c.note(f"{label} at {t_sig:.1f} s, with {done_before}/20 images complete; {done}/20 complete after it")
    if sig != signal.SIGKILL:
        c.check(not p.timed_out, f"did not stop within 60 s of {label}")
        if done_before < len(stems):
            c.check(p.rc != 0, f"exit 0 after {label} with {len(stems) - done_before} images to go")
            # It may finish the images at hand: predict encodes up to 4 same-size images together.
            c.check(done - done_before <= 4, f"{label} did not stop the run ({done - done_before} "
                    "more images done after it, more than one batch of 4)")
        c.expect_prefixed(p, f"after {label}: ", most=2)  # "received; stopping", "stopped"
        c.expect_no_tmp(out, f"after {label}: ")
    c.expect_complete_or_absent(out, stems, f"after {label}: ")
    rerun = c.run(predict_args("in"), key=False)
    c.expect_rc(rerun, 0, "rerun: ")
    c.expect_prefixed(rerun, "rerun: ")
    missing = [s for s in stems if image_state(out, s) != "complete"]
    c.check(not missing, f"after rerun: {len(missing)} of 20 images not complete")
    c.expect_no_tmp(out, "after rerun: ")
    c.rc_text = f"{p.rc_text} → {rerun.rc_text}"
    c.first_text = f"{p.first_line or '(none)'} → {rerun.first_line or '(none)'}"
    c.command_text = (f"predict in/ (20 images) --out out --quiet; {label} at a random moment; "
                      "same command again")


@case("predict", "kill -9 during a folder predict, then rerun")
def _(c):
    interrupted_folder(c, signal.SIGKILL, "kill -9")


@case("predict", "SIGINT during a folder predict, then rerun")
def _(c):
    interrupted_folder(c, signal.SIGINT, "SIGINT")


@case("predict", "SIGTERM during a folder predict, then rerun")
def _(c):
    interrupted_folder(c, signal.SIGTERM, "SIGTERM")


@case("predict", "leftover *.tmp in --out")
def _(c):
    """Two leftovers: one the product itself leaves (a folder run killed -9 the moment a
    temporary file shows), and one named as the version the issue was found on named them
    (tempfile.mkstemp(prefix=".<name>.", suffix=".tmp"), an hour old). The next run removes
    both and completes the folder."""
    c.fx.warm()
    stems = [p.stem for p in c.fx.scenes()]
    copy_images(c.fx.scenes(), c.dir / "in")
    out = c.dir / "out"
    h = c.start(predict_args("in"))
    own = None
    while h.poll() is None and time.monotonic() - h.t0 < RUN_TIMEOUT:
        try:
            temps = [n for n in os.listdir(out) if n.endswith(".tmp")]
        except OSError:
            temps = []
        if temps:
            os.kill(h.pid, signal.SIGKILL)
            own = temps
            break
        time.sleep(0.002)
    c.record(h.finish(60), key=False)
    left = tmp_files(out)
    if own and left:
        c.note(f"killed with its own {left[0]} left")
    else:
        c.note("could not catch a temporary file of its own (only the old-style one tested)")
    out.mkdir(exist_ok=True)
    old_style = out / f".{stems[0]}.csv.k2f9x1qa.tmp"
    old_style.write_text("x,y,radius\n1,2")
    os.utime(old_style, (time.time() - 3600, time.time() - 3600))
    p = c.run(predict_args("in"), key=True)
    c.expect_rc(p, 0)
    c.expect_prefixed(p, most=1)
    missing = [s for s in stems if image_state(out, s) != "complete"]
    c.check(not missing, f"{len(missing)} of 20 images not complete")
    remaining = set(tmp_files(out))
    if old_style.name in remaining:
        c.fail(f"the old-style leftover {old_style.name} was not removed")
    if remaining - {old_style.name}:
        c.fail(f"its own leftover {sorted(remaining - {old_style.name})[0]} was not removed")
    c.command_text = ("predict in/ (20 images) --out out --quiet, kill -9 when a *.tmp shows; add "
                      f"an old-style {old_style.name}; same command again")


@case("predict", "every input fails: no --out created")
def _(c):
    c.fx.warm()
    (c.dir / "in").mkdir()
    (c.dir / "in" / "empty.png").write_bytes(b"")
    p = c.run(predict_args("in/missing.png", "in/empty.png"))
    c.expect_rc(p, 1)
    c.expect_lines(p, 2)
    c.expect_prefixed(p)
    c.check(not (c.dir / "out").exists(), "--out was created")


@case("predict", "error lines vs the progress bar (stderr not a terminal)")
def _(c):
    c.fx.warm()
    inp = copy_images([c.fx.good(i) for i in range(4)], c.dir / "in")
    (inp / "bad.png").write_text("not an image\n")
    p = c.run(["predict", "in", "--out", "out"])  # no --quiet: the bar is on
    c.expect_rc(p, 1)
    c.expect_no_traceback(p)
    glued, stray, errors = [], [], 0
    for line in p.lines:
        segs = [s for s in line.split("\r") if s.strip()]
        msgs = [s for s in segs if PREFIX["predict"] in s]
        errors += len(msgs)
        if msgs and (len(segs) > 1 or not segs[0].startswith(PREFIX["predict"])):
            glued.append(line)
        elif not msgs and not all(BAR.search(s) for s in segs):
            stray.append(line)
    c.check(not glued, f"an error line is glued to the progress bar: `{glued[0].strip()[-70:] if glued else ''}`")
    c.check(not stray, f"stray stderr line `{stray[0].strip()[:60] if stray else ''}`")
    c.check(errors == 1, f"{errors} error lines for bad.png, expected 1")
    c.expect_outputs(c.dir / "out", [c.fx.good(i).stem for i in range(4)])


@case("predict", "malicious pickle planted in the program store")
def _(c):
    cache = c.dir / "cache"
    env = dict(c.sweep.env, AMORTIZE_CACHE_DIR=str(cache))
    first = c.run(predict_args(c.fx.good(0), out="out1"), env=env, key=False)
    c.expect_rc(first, 0, "first run: ")
    store = cache / "programs"
    files = [p for p in store.rglob("*") if p.is_file()] if store.is_dir() else []
    if not files:
        c.fail("set-up: the first run stored no programs to replace (nothing tested)")
        return
    marker = c.dir / "MARKER"
    payload = pickle.dumps(_Payload(f"touch {shlex.quote(str(marker))}"))
    for f in files:
        f.write_bytes(payload)
    c.note(f"{len(files)} store files replaced")
    p = c.run(predict_args(c.fx.good(0), out="out2"), env=env, key=True)
    c.check(not marker.exists(), "the planted pickle RAN (MARKER created)")
    c.expect_rc(p, 0)
    c.expect_prefixed(p, most=1)
    c.expect_outputs(c.dir / "out2", [c.fx.good(0).stem])
    c.command_text = ("AMORTIZE_CACHE_DIR=cache predict good --out out1; replace programs/* with a "
                      "pickle running 'touch MARKER'; predict good --out out2")


@case("predict", "cache folder owned by another uid")
def _(c):
    if os.geteuid() != 0:
        c.skipped = "needs root to chown the cache folder to another uid"
        return
    c.fx.warm()
    cache = c.dir / "cache"
    cache.mkdir()
    os.chown(cache, 12345, 12345)
    env = dict(c.sweep.env, AMORTIZE_CACHE_DIR=str(cache))
    p = c.run(predict_args(c.fx.good(0)), env=env)
    c.expect_rc(p, 0)
    c.expect_lines(p, 1)
    c.expect_prefixed(p)
    c.expect_outputs(c.dir / "out", [c.fx.good(0).stem])
    c.expect_empty(cache, "the foreign cache folder")
    c.command_text = "AMORTIZE_CACHE_DIR=cache (owner uid 12345) predict good --out out"


# --- train


def tiny_text() -> str:
    return (REPO / "train" / "tiny.toml").read_text()


def set_train_field(text: str, field: str, value: str) -> str:
    """`field = value` in the recipe's [train] table (replaced, or added at its top)."""
    pattern = re.compile(rf"(?m)^{re.escape(field)}\s*=.*$")
    train = text.index("[train]")
    head, body = text[:train], text[train:]
    if pattern.search(body):
        return head + pattern.sub(f"{field} = {value}", body, count=1)
    return head + body.replace("[train]", f"[train]\n{field} = {value}", 1)


def bad_recipe(c: Case, text: str | None, rc=2) -> None:
    recipe = c.dir / "recipe.toml"
    if text is not None:
        recipe.write_text(text)
    p = c.run(["train", "--config", "recipe.toml", "--workdir", "run", "--no-log", "--quiet"])
    c.one_line_error(p, rc)
    c.expect_empty(c.dir / "run", "the workdir")


@case("train", 'recipe with weight_decay = "1e-4"')
def _(c):
    bad_recipe(c, set_train_field(tiny_text(), "weight_decay", '"1e-4"'))


@case("train", "recipe with steps = 4.5")
def _(c):
    bad_recipe(c, set_train_field(tiny_text(), "steps", "4.5"))


@case("train", "recipe with batch_size = 2.0")
def _(c):
    bad_recipe(c, set_train_field(tiny_text(), "batch_size", "2.0"))


@case("train", "recipe that is not TOML")
def _(c):
    bad_recipe(c, "[train\nsteps: 4\n", rc=(1, 2))


@case("train", "missing recipe")
def _(c):
    bad_recipe(c, None, rc=(1, 2))


@case("train", "recipe with an unknown field")
def _(c):
    bad_recipe(c, set_train_field(tiny_text(), "learning_rat", "0.001"), rc=(1, 2))


@case("train", "--init without --data")
def _(c):
    shutil.copy(REPO / "train" / "tiny.toml", c.dir / "recipe.toml")
    p = c.run(["train", "--config", "recipe.toml", "--init", str(REPO / "checkpoints" / "default"),
               "--workdir", "run", "--no-log", "--quiet"])
    c.one_line_error(p, 2)
    c.expect_empty(c.dir / "run", "the workdir")


@case("train", "--data folder with no images")
def _(c):
    shutil.copy(REPO / "train" / "adapt_tiny.toml", c.dir / "recipe.toml")
    (c.dir / "data").mkdir()
    (c.dir / "data" / "notes.txt").write_text("no images\n")
    p = c.run(["train", "--config", "recipe.toml", "--data", "data", "--workdir", "run",
               "--no-log", "--quiet"])
    c.one_line_error(p, (1, 2))
    c.expect_empty(c.dir / "run", "the workdir")


def final_metrics(p: Proc) -> dict | None:
    for line in reversed(p.stdout.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


@case("train", "kill -9 during training, then resume")
def _(c):
    """The tiny recipe for 100 steps with a checkpoint every 10, killed -9 once a random one
    of the steps 10-50 is saved (plus 0-0.3 s), resumed, and compared with an uninterrupted
    run: the final metrics (loss and all) must be the same."""
    steps, every = 100, 10
    text = set_train_field(set_train_field(tiny_text(), "steps", str(steps)), "checkpoint_every", str(every))
    (c.dir / "recipe.toml").write_text(text)
    args = lambda w: ["train", "--config", "recipe.toml", "--workdir", w, "--no-log"]  # noqa: E731
    ref = c.run(args("ref"), key=False)  # uninterrupted, for comparison
    c.expect_rc(ref, 0, "uninterrupted run: ")
    run = c.dir / "run"
    for attempt in range(3):
        if run.exists():
            shutil.rmtree(run)
        target = c.sweep.rng.choice(range(every, steps // 2 + 1, every)) if attempt < 2 else every
        delay = c.sweep.rng.uniform(0.0, 0.3) if attempt < 2 else 0.0
        h = c.start(args("run") + ["--quiet"])
        while h.poll() is None and not any(s >= target for s in checkpoint_steps(run)):
            if time.monotonic() - h.t0 > RUN_TIMEOUT:
                break
            time.sleep(0.01)
        time.sleep(delay)
        if h.poll() is None:
            os.kill(h.pid, signal.SIGKILL)
        killed = h.finish(60)
        on_disk = checkpoint_steps(run)
        if killed.rc == -signal.SIGKILL and on_disk and max(on_disk) < steps:
            break
        c.commands.pop()
        c.note(f"attempt {attempt + 1}: the run ended before the kill (steps on disk {on_disk})")
    else:
        c.fail("could not kill the run before it finished (3 tries)")
        return
    c.record(killed, key=False)
    p = c.run(args("run"), key=True)
    c.expect_rc(p, 0, "resume: ")
    c.expect_no_traceback(p, "resume: ")
    stray = [s for s in p.segments if not BAR.search(s) and not s.startswith(PREFIX["train"])]
    c.check(not stray, f"resume: stray stderr `{stray[0][:60] if stray else ''}`")
    got, want = final_metrics(p), final_metrics(ref)
    timing = {"wall_seconds", "scenes_per_second", "readout_seconds"}
    if got is None or want is None:
        c.fail("no final metrics to compare")
    else:
        diff = sorted(k for k in set(got) | set(want) if k not in timing and got.get(k) != want.get(k))
        c.check(not diff, f"resumed run differs from an uninterrupted one in {', '.join(diff)}")
        if not diff:
            c.note(f"final metrics identical to an uninterrupted run's (loss {got.get('loss')})")
    c.note(f"killed {delay:.2f} s after step {target} was saved, steps on disk {on_disk}")
    c.rc_text = f"{killed.rc_text} → {p.rc_text}"
    c.command_text = (f"train recipe.toml (tiny, {steps} steps, checkpoint every {every}) --workdir run "
                      "--no-log; kill -9 mid-run; same command again; compared with an uninterrupted run")


@case("train", "truncated newest checkpoint on resume")
def _(c):
    shutil.copy(c.fx.tiny_recipe(), c.dir / "recipe.toml")
    w = c.dir / "run"
    shutil.copytree(c.fx.tiny_workdir(), w)
    steps = checkpoint_steps(w)
    truncate_files(data_files(step_dir(w)))
    c.note(f"steps {steps}, newest truncated")
    p = c.run(["train", "--config", "recipe.toml", "--workdir", "run", "--no-log", "--quiet"])
    c.expect_rc(p, 0)
    c.expect_lines(p, 1)
    c.check(bool(checkpoint_steps(w)) and max(checkpoint_steps(w)) >= max(steps),
            "the run did not get back to its last step")


# --- simulate


def sim_args(*extra, out="out") -> list[str]:
    return ["simulate", "--out", out, "--n", "2", "--size", "64", "64", "--quiet", *extra]


@case("simulate", 'config with density = "30"')
def _(c):
    (c.dir / "sim.toml").write_text('[simulation.scene]\ndensity = "30"\n')
    p = c.run(sim_args("--config", "sim.toml"))
    c.one_line_error(p, 2)
    c.expect_empty(c.dir / "out", "--out")


def simulate_bad_request(name: str, request: list[str]) -> None:
    """A bad --n or --size: one line, exit 2, no output folder."""

    @case("simulate", name)
    def _(c):
        p = c.run(["simulate", "--out", "out", *request, "--quiet"])
        c.one_line_error(p, 2)
        c.expect_empty(c.dir / "out", "--out")


simulate_bad_request("--n 0", ["--n", "0", "--size", "64", "64"])
simulate_bad_request("--size 4 4", ["--n", "2", "--size", "4", "4"])
simulate_bad_request("--size 0 10", ["--n", "2", "--size", "0", "10"])


@case("simulate", "existing non-empty --out without --force")
def _(c):
    (c.dir / "out").mkdir()
    (c.dir / "out" / "keep.txt").write_text("mine\n")
    p = c.run(sim_args())
    c.one_line_error(p, (1, 2))
    c.check(set(tree(c.dir / "out")) == {"keep.txt"}, "files were written into it")
    c.check((c.dir / "out" / "keep.txt").read_text() == "mine\n", "keep.txt was changed")


# ---------------------------------------------------------------------------------------
# The table


def cell(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(cases: list[Case], root: pathlib.Path | None = None) -> str:
    def short(text: str, case: Case | None = None) -> str:  # paths in the sweep's folder, shorter
        if case is not None:
            text = text.replace(f"{case.dir}/", "")
        return text.replace(f"{root}/fixtures/", "$FX/") if root else text

    rows = ["| # | case | command | exit | first stderr line | files written | s | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        command = c.command_text or ("; ".join(c.commands) if c.commands else "-")
        first = c.first_text or (c.key.first_line if c.key else "")
        rc = c.rc_text or (c.key.rc_text if c.key else "-")
        rows.append("| " + " | ".join([
            str(c.number), cell(f"{c.verb}: {c.name}"), "`" + cell(short(command), 160) + "`", cell(rc),
            ("`" + cell(short(first, c), 120) + "`") if first else "", cell(c.files_written(), 160),
            f"{c.seconds:.1f}", cell(("**NOT clean**" + c.verdict()[9:]) if c.verdict().startswith("NOT") else c.verdict()),
        ]) + " |")
    return "\n".join(rows)


def header(sweep: Sweep) -> str:
    """What was tested, where and when (one line)."""
    try:
        version = subprocess.run([str(sweep.exe), "--version"], capture_output=True, text=True,
                                 timeout=60, env=sweep.env).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = "amortize (version unknown)"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return (f"Robustness sweep (issue 34), {time.strftime('%Y-%m-%d %H:%M')}: {version} "
            f"({sweep.exe}), repository at {commit or '?'} plus any uncommitted changes, "
            f"{os.cpu_count()} CPUs, running as {'root' if os.geteuid() == 0 else 'uid ' + str(os.geteuid())}.")


def default_exe() -> pathlib.Path:
    return pathlib.Path(sys.executable).parent / "amortize"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amortize", type=pathlib.Path, default=default_exe(),
                        help="the console script to test (default: the one next to this Python)")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only cases whose 'verb: name' contains this (repeatable)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the 10000x10000 image")
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    args = parser.parse_args(argv)

    selected = []
    for number, (verb, name, slow, fn) in enumerate(CASES, 1):
        full = f"{verb}: {name}"
        if args.only and not any(s.lower() in full.lower() for s in args.only):
            continue
        if slow and args.skip_slow:
            continue
        selected.append((number, verb, name, fn))
    if args.list:
        for number, verb, name, _ in selected:
            print(f"{number:2d}. {verb}: {name}")
        return 0
    if not args.amortize.exists():
        parser.error(f"{args.amortize}: no such executable")

    root = pathlib.Path(tempfile.mkdtemp(prefix="amortize-sweep-"))
    sweep = Sweep(args.amortize.resolve(), root, args.seed)
    print(f"sweep: {len(selected)} of {len(CASES)} cases in {root}", file=sys.stderr)
    t_start = time.monotonic()
    done: list[Case] = []
    try:
        for number, verb, name, fn in selected:
            c = Case(sweep, number, name, verb)
            t0 = time.monotonic()
            try:
                fn(c)
            except SetupError as err:
                c.fail(f"set-up failed: {err}")
            except Exception as err:  # noqa: BLE001 - a bug of this script: say so, carry on
                c.fail(f"SWEEP SCRIPT ERROR {type(err).__name__}: {err}")
                traceback.print_exc()
            c.seconds = time.monotonic() - t0
            done.append(c)
            print(f"[{len(done)}/{len(selected)}] {verb}: {name}: {c.verdict()[:200]} ({c.seconds:.1f} s)",
                  file=sys.stderr)
    finally:
        wall = time.monotonic() - t_start
        n_clean = sum(c.clean for c in done)
        skipped = sum(bool(c.skipped) for c in done)
        if len(done) == len(CASES):
            total = f"**{n_clean} of {len(CASES)} clean**"
        else:
            total = f"**{n_clean} of {len(done)} clean** ({len(done)} of the {len(CASES)} cases run)"
        if skipped:
            total += f"; {skipped} skipped (not counted as clean)"
        total += f"; sweep took {wall / 60:.1f} min."
        text = header(sweep) + "\n\n" + table(done, root) + "\n\n" + total + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            for d in root.rglob("*"):  # an immutable folder left by an interrupted case
                if d.is_dir() and d.name == "out":
                    subprocess.run(["chattr", "-i", str(d)], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
    return 0 if n_clean == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
