"""Recipe for the extra droplet looks shipped in amortize/assets/look_<name>.msgpack.

Fits the optics MLP (K = 3 types, C = 3 channels) to each analytic look of
`amortize.looks` (ring, disc, glow, rim, halo, outline, foam). Deterministic for the
fixed seed.

    python train/fit_looks.py [--steps N] [--only NAME]
"""

import argparse
import time

from amortize.looks import LOOKS, fit_look, look_file
from amortize.optics import save_optics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--only", choices=sorted(LOOKS))
    args = parser.parse_args()
    for name in [args.only] if args.only else sorted(LOOKS):
        start = time.perf_counter()
        params, mse = fit_look(name, steps=args.steps)
        save_optics(params, look_file(name))
        print(f"wrote {look_file(name)} (steps {args.steps}, held-out MSE {mse:.5f}, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
