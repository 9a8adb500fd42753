"""Measure a model against the real-image geometry targets (issue 35), with the CLI.

    python benchmarks/slide_targets.py --model checkpoints/default --out /tmp/targets [--no-refine]

Runs, with the `amortize` console script and writing everything under --out:

1. slide: `predict` of ../shared/data/droplets/slide_a_left.png, scored by `evaluate
   --partial-truth` on the hand-checked droplets of benchmarks/slide_truth;
2. refine: `refine` of the same slide from the model, scored the same way, with the
   reconstruction RMSE before (predict's) and after from refine's JSON;
3. heldout5: the held-out hard-core scenes with the built-in look (`simulate --seed 20261121
   --min-separation 0.5`, 20 scenes of 512 x 384), `predict`, `evaluate --rmin 2`;
4. learned look: the same scenes drawn with the model's own decoder (`simulate --look
   MODEL`), `predict`, `evaluate --rmin 2`.

Prints each command with its wall time, then a Markdown table of the figures and targets;
`--json` also writes them. Needs ../shared (the slide); the simulated sets are made here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "droplets" / "slide_a_left.png"
TRUTH = ROOT / "benchmarks" / "slide_truth"
HELDOUT = ["--n", "20", "--size", "512", "384", "--seed", "20261121", "--min-separation", "0.5"]
BINS = ("r<3", "3<=r<6", "6<=r<12", "r>=12")


def amortize(*args: str) -> tuple[str, float]:
    """Run one CLI command; returns (stdout, wall seconds). Echoes the command."""
    exe = shutil.which("amortize") or str(pathlib.Path(sys.executable).with_name("amortize"))
    line = "amortize " + " ".join(args)
    start = time.perf_counter()
    res = subprocess.run([exe, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"[{seconds:7.1f} s] {line}", file=sys.stderr)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {line}\n{res.stderr}")
    return res.stdout, seconds


def evaluate(pred: pathlib.Path, truth: pathlib.Path, *extra: str) -> dict:
    return json.loads(amortize("evaluate", "--pred", str(pred), "--truth", str(truth), *extra)[0])


def measure(model: str, out: pathlib.Path, refine: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    slide_pred = out / "slide_pred"
    amortize("predict", str(SLIDE), "--out", str(slide_pred), "--checkpoint", model, "--reconstruction",
             "--quiet", "--force")
    figures["slide"] = evaluate(slide_pred, TRUTH, "--partial-truth")
    figures["slide"]["recon_rmse"] = json.loads((slide_pred / f"{SLIDE.stem}.json").read_text())["recon_rmse"]
    if refine:
        slide_ref = out / "slide_refined"
        _, seconds = amortize("refine", str(SLIDE), "--out", str(slide_ref), "--checkpoint", model, "--quiet",
                              "--force")
        figures["refine"] = evaluate(slide_ref, TRUTH, "--partial-truth")
        result = json.loads((slide_ref / f"{SLIDE.stem}.json").read_text())
        figures["refine"].update(recon_rmse_before=result["recon_rmse_before"],
                                 recon_rmse_after=result["recon_rmse_after"], wall_s=round(seconds, 1))
    heldout = out / "heldout5"
    if not (heldout / "manifest.json").exists():
        amortize("simulate", "--out", str(heldout), *HELDOUT, "--quiet", "--force")
    amortize("predict", str(heldout), "--out", str(out / "heldout5_pred"), "--checkpoint", model, "--quiet",
             "--force")
    figures["heldout5"] = evaluate(out / "heldout5_pred", heldout, "--rmin", "2")
    look = out / "learned_look"
    amortize("simulate", "--out", str(look), *HELDOUT, "--look", model, "--quiet", "--force")
    amortize("predict", str(look), "--out", str(out / "learned_look_pred"), "--checkpoint", model, "--quiet",
             "--force")
    figures["learned_look"] = evaluate(out / "learned_look_pred", look, "--rmin", "2")
    return figures


def _f(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(f: dict) -> str:
    rows = ["| set | measure | measured | target |", "| --- | --- | --- | --- |"]

    def slide_rows(name: str, m: dict) -> None:
        rows.append(f"| {name} | F1 (precision, recall; partial truth) | {_f(m['f1'])} "
                    f"({_f(m['precision'])}, {_f(m['recall'])}) | ≥ 0.95 |")
        rows.append(f"| {name} | centre RMSE | {_f(m['position_rmse_px'], 2)} px | ≤ 0.6 px |")
        for b in BINS:
            v = m["bias_by_radius"][b]
            rows.append(f"| {name} | mean (dx, dy), {b} (n = {v['n']}) | ({_f(v['mean_dx_px'], 2)}, "
                        f"{_f(v['mean_dy_px'], 2)}) px | each within ±0.25 px |")
        ratios = ", ".join(_f(m["bias_by_radius"][b]["median_radius_ratio"]) for b in BINS)
        rows.append(f"| {name} | median radius ratio per bin | {ratios} | within 0.96–1.04 |")
        rows.append(f"| {name} | median radius error | {_f(100 * m['median_radius_rel_error'], 1)} % | ≤ 4 % |")

    slide_rows("slide, predict", f["slide"])
    rows.append(f"| slide, predict | reconstruction RMSE | {_f(f['slide']['recon_rmse'], 4)} | |")
    if "refine" in f:
        slide_rows("slide, refine", f["refine"])
        rows.append(f"| slide, refine | reconstruction RMSE before → after | "
                    f"{_f(f['refine']['recon_rmse_before'], 4)} → {_f(f['refine']['recon_rmse_after'], 4)} "
                    f"({f['refine']['wall_s']} s) | lower after |")
    for name, label, rmse in (("heldout5", "heldout5, built-in look", 0.25),
                              ("learned_look", "heldout5 scenes, the model's look", 0.3)):
        m = f[name]
        rows.append(f"| {label} | F1 (precision, recall) | {_f(m['f1'])} ({_f(m['precision'])}, "
                    f"{_f(m['recall'])}) | ≥ 0.97 |")
        rows.append(f"| {label} | position RMSE | {_f(m['position_rmse_px'])} px | ≤ {rmse} px |")
        rows.append(f"| {label} | median radius error | {_f(100 * m['median_radius_rel_error'], 1)} % | |")
        r2 = m["composition_r2"]
        rows.append(f"| {label} | composition R² | {_f(r2)} | {'≥ 0.9' if name == 'heldout5' else ''} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "default"))
    parser.add_argument("--out", required=True, help="scratch folder for the runs")
    parser.add_argument("--no-refine", dest="refine", action="store_false", help="skip the refine row")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not SLIDE.exists():
        sys.exit(f"{SLIDE}: not found (the shared data must sit beside the repository)")
    figures = measure(args.model, pathlib.Path(args.out), args.refine)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=1))
    print(table(figures))


if __name__ == "__main__":
    main()
