"""Recipe for the built-in optics weights shipped in amortize/assets/.

Fits the optics (K = 3 types, C = 3 channels) to the analytic lens-like droplet in
`amortize.optics.lens_droplet`: the free MLP (default_optics.msgpack) or, with --anchored,
the anchored geometry with its edge blur (default_optics_anchored.msgpack), the start of
the default model's adaptation. Deterministic for the fixed seed.

    python train/fit_default_optics.py [--anchored] [--steps N]
"""

import argparse
import time

from amortize.optics import (
    ANCHORED_OPTICS_FILE, DEFAULT_FIT_STEPS, DEFAULT_OPTICS_FILE, edge_blur, fit_default_optics, save_optics,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_FIT_STEPS)
    parser.add_argument("--anchored", action="store_true", help="fit the anchored geometry")
    args = parser.parse_args()
    start = time.perf_counter()
    params, mse = fit_default_optics(steps=args.steps, anchored=args.anchored)
    path = ANCHORED_OPTICS_FILE if args.anchored else DEFAULT_OPTICS_FILE
    save_optics(params, path)
    blur = f", edge blur {float(edge_blur(params)):.3f} px" if args.anchored else ""
    print(f"wrote {path} (steps {args.steps}, held-out MSE {mse:.5f}{blur}, "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
