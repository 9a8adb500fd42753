"""XLA settings amortize runs faster with on the CPU, applied before JAX starts a backend.

XLA reads `XLA_FLAGS` once, when the first computation starts its backend, so `amortize`
sets them on import (the CLI and the Python API alike). A flag the user already set in
`XLA_FLAGS` is left as it is, and `AMORTIZE_XLA_DEFAULTS=1` leaves every flag at XLA's own
default.

- YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`). jaxlib 0.10 hands
  element-wise and small-matrix fusions to YNNPACK by default; for our programs, whose
  matrices are the optics MLP's (widths 32, 16, 8) over hundreds of thousands of pixels,
  XLA's own loops are faster. On the 2-core AMD EPYC VM (`BENCHMARKS.md`): a refinement
  step on the slide at 4x 0.25 s instead of 0.40 s, a training step 207 ms instead of
  333 ms, predict on a 2028 x 1520 image 177 ms instead of 221 ms. The flag is only set
  for the jaxlib series it was measured on: XLA aborts on a flag it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os

#: (flag name, value) pairs, and the jaxlib (major, minor) series each was measured on.
CPU_FLAGS = (("xla_cpu_experimental_ynn_fusion_type", "", ((0, 10),)),)
#: Set to 1 to leave XLA's defaults alone.
KEEP_DEFAULTS_ENV = "AMORTIZE_XLA_DEFAULTS"


def jaxlib_series() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, or None when it cannot be read."""
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def with_cpu_flags(xla_flags: str, series: tuple[int, int] | None) -> str:
    """`xla_flags` with amortize's CPU flags added, except those it already sets and those
    not measured on jaxlib `series`."""
    added = [f"--{name}={value}" for name, value, tested in CPU_FLAGS
             if series in tested and name not in xla_flags]
    return " ".join([xla_flags.strip()] + added).strip()


def apply_cpu_flags() -> None:
    """Add amortize's CPU flags to the environment's `XLA_FLAGS` (see the module notes)."""
    if os.environ.get(KEEP_DEFAULTS_ENV, "") not in ("", "0"):
        return
    os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_series())
