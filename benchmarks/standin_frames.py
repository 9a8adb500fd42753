"""The real-image frames that refinement's timings and errors are measured on.

The original notebooks worked on a 507 x 380 frame of the slide, and that frame is held out
of this repository. From the slide we do have (`../shared/data/droplets/slide_a_left.png`,
1352 x 1520) this writes, with predict's own area-averaging resize:

- `slide_4x.png`: the slide shrunk 4x (338 x 380), the notebooks' droplet scale;
- `right_4x.png`: its right half (169 x 380), held out from the `left-half` adaptation;
- `slide_3x.png`: the slide shrunk 3x (451 x 507), the frame's pixel count at a larger
  droplet scale;
- `proxy_full.png`: the stand-in for the notebooks' frame, 507 x 380: `slide_4x` with its
  right half mirrored onto its right edge (continuous at the seam). It has the frame's size
  and droplet density, not its content.

    python benchmarks/standin_frames.py OUTDIR [--slide PATH]

Then, for example, `amortize refine OUTDIR/proxy_full.png --out R --device cpu --quiet`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from amortize import io
from amortize.predict import resize

ROOT = pathlib.Path(__file__).resolve().parent.parent
SLIDE = ROOT.parent / "shared" / "data" / "droplets" / "slide_a_left.png"


def standin_frames(slide: np.ndarray) -> dict[str, np.ndarray]:
    """{name: image} of the frames described above, from the full-resolution slide."""
    quarter = resize(slide, 4.0)
    half = quarter.shape[1] // 2
    right = resize(slide[:, slide.shape[1] - 4 * (quarter.shape[1] - half):], 4.0)
    return {
        "slide_4x": quarter,
        "right_4x": right,
        "slide_3x": resize(slide, 3.0),
        "proxy_full": np.concatenate([quarter, right[:, ::-1]], axis=1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--slide", type=pathlib.Path, default=SLIDE)
    args = parser.parse_args(argv)
    if not args.slide.exists():
        print(f"error: {args.slide}: no such file (the slide lives in ../shared/data/droplets)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in standin_frames(io.read_image(args.slide)).items():
        io.write_png(args.out / f"{name}.png", image, force=True)
        print(f"{args.out / name}.png  {image.shape[1]}x{image.shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
