"""Recipe for the built-in optics weights shipped in amortize/assets/default_optics.msgpack.

Fits the optics MLP (K = 3 types, C = 3 channels) to the analytic lens-like droplet in
`amortize.optics.lens_droplet`. Deterministic for the fixed seed.

    python train/fit_default_optics.py [--steps N]
"""

import argparse
import time

from amortize.optics import DEFAULT_FIT_STEPS, DEFAULT_OPTICS_FILE, fit_default_optics, save_optics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_FIT_STEPS)
    args = parser.parse_args()
    start = time.perf_counter()
    params, mse = fit_default_optics(steps=args.steps)
    save_optics(params, DEFAULT_OPTICS_FILE)
    print(f"wrote {DEFAULT_OPTICS_FILE} (steps {args.steps}, held-out MSE {mse:.5f}, "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
