"""Score models on the hand-checked windows of other kinds of droplet images (issue 36).

    python benchmarks/real_kinds.py --model checkpoints/default --model checkpoints/general \
        --out /tmp/kinds [--json figures.json]

For each model and each set of benchmarks/real_truth (emulsion, condensation), runs with the
`amortize` console script, writing everything under --out:

    amortize predict IMAGE --out OUT/<model>/<set> --checkpoint MODEL [--scale S]
    amortize evaluate --pred OUT/<model>/<set> --truth benchmarks/real_truth/<set> --rmin R

(R = 3 px for the condensation set, whose faint specks below 3 px are "don't care"; 0 for the
emulsion). Prints each command with its wall time, then a Markdown table of F1 (precision,
recall), centre RMSE and median radius error against issue 36's targets. Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from slide_targets import amortize  # noqa: E402  (one way to run and time a CLI command)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TRUTH = ROOT / "benchmarks" / "real_truth"
#: set -> (image, rmin px)
SETS = {
    "emulsion": (SHARED / "emulsion" / "droplets.png", 0.0),
    "condensation": (SHARED / "condensation" / "condensation.jpg", 3.0),
}


def measure(model: str, out: pathlib.Path, scale: str | None) -> dict:
    figures = {}
    for name, (image, rmin) in SETS.items():
        pred = out / pathlib.Path(model).name / name
        extra = ["--scale", scale] if scale else []
        _, seconds = amortize("predict", str(image), "--out", str(pred), "--checkpoint", model,
                              "--quiet", "--force", *extra)
        metrics = json.loads(amortize("evaluate", "--pred", str(pred), "--truth",
                                      str(TRUTH / name), "--rmin", f"{rmin:g}")[0])
        metrics["predict_s"] = seconds
        figures[name] = metrics
    return figures


def table(results: dict) -> str:
    rows = ["| model | set | F1 (precision, recall) | centre RMSE | median radius error |"
            " target (zero-shot / adapted) |", "| --- | --- | --- | --- | --- | --- |"]
    for model, figures in results.items():
        for name, m in figures.items():
            rows.append(
                f"| `{model}` | {name} | {m['f1']:.3f} ({m['precision']:.3f}, {m['recall']:.3f}) "
                f"| {m['position_rmse_px']:.2f} px | {100 * m['median_radius_rel_error']:.1f} % "
                f"| F1 ≥ 0.85 / ≥ 0.92, radius ≤ 8 % |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeat)")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--scale", default=None, help="passed to predict (default: predict's own)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    for name, (image, _) in SETS.items():
        if not image.exists():
            sys.exit(f"{image}: not found (the {name} set needs ../shared beside the repository)")
    results = {model: measure(model, args.out, args.scale) for model in args.model}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
