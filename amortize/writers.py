"""Metric writers behind one small interface: tensorboardX for real runs, a null one for tests."""

from __future__ import annotations

import pathlib
from typing import Protocol

import numpy as np


class Writer(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def image(self, name: str, image: np.ndarray, step: int) -> None: ...
    def histogram(self, name: str, values: np.ndarray, step: int) -> None: ...
    def close(self) -> None: ...


class NullWriter:
    """Discards everything (tests, `--no-log`)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        pass

    def histogram(self, name: str, values: np.ndarray, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorboardWriter:
    """Writes event files under `logdir` for TensorBoard."""

    def __init__(self, logdir: str | pathlib.Path):
        from tensorboardX import SummaryWriter  # imported here: only training needs it

        self._writer = SummaryWriter(str(logdir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        """`image`: (H, W, 3) uint8 or float in [0, 1]."""
        self._writer.add_image(name, np.asarray(image), step, dataformats="HWC")

    def histogram(self, name: str, values: np.ndarray, step: int) -> None:
        values = np.asarray(values, np.float64)
        if values.size:
            self._writer.add_histogram(name, values, step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
