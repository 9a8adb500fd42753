"""The `amortize` console script: argument parsing only; the work is in the library.

Each verb checks its arguments (`check_*`, with `amortize.config` only) before the library, and
so JAX, is imported: a bad argument is reported in a fraction of a second rather than after
the 2-4 s import.

Exit codes: 0 success, 1 an input failed, 2 a bad argument (nothing was written).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib

from amortize.config import DEFAULT_MAX_PIXELS
from amortize.errors import AmortizeError, BadArgument, BadInput


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _simulation_config(args):
    import dataclasses

    from amortize.config import SimulationConfig, config_from_file

    if args.config:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise BadArgument(args.config, f"cannot read config ({err.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise BadArgument(args.config, f"not valid TOML ({err})") from None
        # Every field's type and range, before the output directory is made.
        table = "simulation" if "simulation" in data else ""
        config = config_from_file(SimulationConfig, data.get("simulation", data), args.config, table)
    else:
        config = SimulationConfig()
    scene = config.scene
    if args.density is not None:
        scene = dataclasses.replace(scene, density=args.density)
    if args.radius_range is not None:
        rmin, rmax = args.radius_range
        if not 0 < rmin < rmax:
            raise BadArgument("--radius-range", f"need 0 < RMIN < RMAX, got {rmin} {rmax}")
        scene = dataclasses.replace(scene, radius_min=rmin, radius_max=rmax)
    if args.min_separation is not None:
        scene = dataclasses.replace(scene, min_separation=args.min_separation)
    return dataclasses.replace(config, scene=scene)


def check_simulate(args) -> None:
    from amortize.config import validate_request

    validate_request(args.n, tuple(args.size))
    args.simulation = _simulation_config(args)


def cmd_simulate(args) -> int:
    from amortize.simulate import write_simulation

    manifest = write_simulation(
        args.out, args.n, tuple(args.size), seed=args.seed, config=args.simulation,
        force=args.force, progress=not args.quiet, look=args.look,
    )
    if not args.quiet:
        print(f"wrote {manifest['n']} scenes to {args.out} in {manifest['wall_seconds']} s")
    return 0


def check_train(args) -> None:
    if args.init is not None and args.data is None:
        raise BadArgument("--init", "only applies with --data (adapting to real images)")


def cmd_train(args) -> int:
    import json

    from amortize.train import load_recipe, train
    from amortize.writers import NullWriter

    writer = NullWriter() if args.no_log else None
    if args.data is not None:
        metrics = _adapt(args, writer)
    else:
        run = load_recipe(args.config)  # every field checked before the workdir is touched
        metrics = train(run, args.workdir, writer=writer, progress=not args.quiet)
    if not args.quiet:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def _adapt(args, writer) -> dict:
    import warnings

    from amortize.adapt import adapt, load_adapt_recipe
    from amortize.corpus import load_corpus
    from amortize.predict import Predictor

    init = Predictor.load(args.init)
    # Every field checked, and the corpus read, before the workdir is touched (in `adapt`).
    run = load_adapt_recipe(args.config, init.run.encoder, init.run.simulation)
    if run.adapt.anchor_look_fraction is not None:  # its anchor steps draw the recipe's [train]
        raise BadInput(args.config, "[adapt] anchor_look_fraction is for `amortize adapt`; remove it "
                                    "for train --data")

    def warn(line):
        print(f"amortize train: warning: {line}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = load_corpus(args.data, run.wake.crop, warn=warn)
    if corpus.skipped and not args.quiet:
        print(f"using {len(corpus.images)} image(s) of {args.data}; skipped {len(corpus.skipped)}",
              file=sys.stderr)
    return adapt(run, corpus, args.workdir, init.params, init.optics, writer=writer,
                 progress=not args.quiet, init_readout=init.readout)


def cmd_adapt(args) -> int:
    from amortize.adapt_corpus import adapt_folder

    def report(line):
        if not args.quiet or "warning" in line:
            print(line, file=sys.stderr)

    summary = adapt_folder(args.folder, args.out, init=args.init, recipe=args.recipe,
                           workdir=args.workdir, force=args.force, progress=not args.quiet,
                           report=report)
    if not args.quiet:
        print(json.dumps(summary))
    return 0


def cmd_export(args) -> int:
    from amortize.checkpoint import export_model

    step = export_model(args.workdir, args.out, force=args.force)
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


def scale_option(text: str) -> float | str:
    """`--scale` of predict and refine: "auto" or a number > 0."""
    from amortize.config import parse_scale

    try:
        return parse_scale(text)
    except ValueError:
        raise BadArgument("--scale", f"must be 'auto' or a number > 0, got {text}") from None


def check_predict(args) -> None:
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise BadArgument("--threshold", f"must be in (0, 1), got {args.threshold}")
    args.scale = scale_option(args.scale)


def cmd_predict(args) -> int:
    from amortize.detect import DEFAULT_THRESHOLD
    from amortize.predict import Predictor, predict_files

    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD
    predictor = Predictor.load(args.checkpoint)
    run = predict_files(
        args.inputs, args.out, predictor, threshold=args.threshold, scale=args.scale,
        force=args.force, progress=not args.quiet,
        report=lambda line: print(f"amortize predict: {line}", file=sys.stderr),
        reconstruction=args.reconstruction, max_pixels=args.max_pixels,
    )
    _files_summary("predict", "predicted", run, args)
    return run.exit_code


def _files_summary(verb: str, did: str, run, args, where: str = "") -> None:
    """The closing lines of a folder run: what was done and, if it stopped early, how to go on."""
    if run.stopped:
        print(f"amortize {verb}: stopped by {run.stopped} after {run.done} image(s); outputs written "
              f"so far are complete, and the same command finishes the rest", file=sys.stderr)
    elif not args.quiet:
        print(f"{did} {run.done} image(s) into {args.out}{where}"
              + (f"; {run.skipped} skipped (complete outputs already there)" if run.skipped else "")
              + (f"; {len(run.errors)} failed" if run.errors else ""))


def refine_config(args):
    """The RefineConfig of `amortize refine`'s options (`--lr` sets the step size at every
    scale)."""
    from amortize.config import RefineConfig

    defaults = RefineConfig()
    return RefineConfig(
        steps=defaults.steps if args.steps is None else args.steps,
        learning_rate=defaults.learning_rate if args.lr is None else args.lr,
        enlarged_learning_rate=defaults.enlarged_learning_rate if args.lr is None else args.lr,
        rounds=defaults.rounds if args.rounds is None else args.rounds,
        freeze_optics=args.freeze_optics,
        fit_stop=args.fit_stop,
    )


def check_refine(args) -> None:
    args.refine = refine_config(args)
    args.scale = scale_option(args.scale)


def cmd_refine(args) -> int:
    from amortize.predict import Predictor
    from amortize.refinement import pick_device, refine_files

    device = pick_device(args.device)
    predictor = Predictor.load(args.checkpoint)
    run = refine_files(
        args.inputs, args.out, predictor, config=args.refine, scale=args.scale, device=args.device,
        force=args.force, progress=not args.quiet,
        report=lambda line: print(f"amortize refine: {line}", file=sys.stderr),
        max_pixels=args.max_pixels,
    )
    _files_summary("refine", "refined", run, args, where=f" on {device.platform}")
    return run.exit_code


def cmd_evaluate(args) -> int:
    import json

    from amortize.evaluate import evaluate_dirs

    metrics, errors = evaluate_dirs(args.pred, args.truth, rmin=args.rmin, partial=args.partial_truth)
    for err in errors:
        print(f"amortize evaluate: error: {err}", file=sys.stderr)
    print(json.dumps(metrics))
    return 1 if errors else 0


def cmd_bench(args) -> int:
    from amortize import bench

    if args.what == "render":
        bench.run_render_bench(quick=args.quick)
    elif args.what == "predict":
        bench.run_predict_bench(args.checkpoint, quick=args.quick)
    elif args.what == "train":
        bench.run_train_bench(args.config, quick=args.quick)
    elif args.what == "refine":
        bench.run_refine_bench(args.checkpoint, quick=args.quick)
    return 0


def _pixel_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="amortize", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="write simulated scenes with ground-truth tables")
    sim.add_argument("--out", required=True, help="output directory")
    sim.add_argument("--n", type=int, required=True, help="number of scenes")
    sim.add_argument("--size", type=int, nargs=2, required=True, metavar=("W", "H"))
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--density", type=float, help="droplet centres per 100 x 100 px")
    sim.add_argument("--radius-range", type=float, nargs=2, metavar=("RMIN", "RMAX"))
    sim.add_argument("--min-separation", type=float, metavar="S",
                     help="hard core: centres at least S x (sum of radii) apart, S in [0, 1] "
                          "(default 0: droplets overlap freely; 1: they never overlap)")
    sim.add_argument("--config", help="TOML file with a [simulation] table")
    sim.add_argument("--look", metavar="MODEL",
                     help="draw the droplets with this model's decoder optics (a look learned by "
                          "adaptation, e.g. checkpoints/default) instead of the built-in droplet")
    sim.add_argument("--force", action="store_true", help="write into a non-empty directory")
    sim.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    sim.set_defaults(check=check_simulate, run=cmd_simulate)

    tr = sub.add_parser("train", help="train on simulated scenes, or adapt to a folder of "
                        "real images with --data (resumes)")
    tr.add_argument("--config", required=True,
                    help="TOML recipe, e.g. train/default.toml or train/adapt_droplets.toml")
    tr.add_argument("--data", help="folder of unlabeled images: wake-sleep adaptation")
    tr.add_argument("--init", help="with --data: model to start from (default: checkpoints/default)")
    tr.add_argument("--workdir", required=True,
                    help="run directory: config, checkpoints, logs; an existing run resumes")
    tr.add_argument("--no-log", action="store_true", help="no tensorboard logs")
    tr.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    tr.set_defaults(check=check_train, run=cmd_train)

    ad = sub.add_parser("adapt", help="make a model precise on a folder of your own unlabeled "
                        "images (wake-sleep; resumes; picks its own stopping point)")
    ad.add_argument("folder", help="folder of images (PNG, JPEG, TIFF) of one kind")
    ad.add_argument("--out", required=True, help="model directory to write")
    ad.add_argument("--init", help="model to start from (default: checkpoints/default)")
    ad.add_argument("--recipe", help="adaptation recipe (default: amortize/assets/adapt.toml)")
    ad.add_argument("--workdir", help="where the run and its snapshots live (default: OUT.work); "
                    "running the same command again resumes there")
    ad.add_argument("--force", action="store_true", help="replace a model at --out")
    ad.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    ad.set_defaults(run=cmd_adapt)

    ex = sub.add_parser("export", help="write a training run's latest weights as a model")
    ex.add_argument("workdir", help="training workdir (or model directory)")
    ex.add_argument("--out", required=True, help="model directory, e.g. checkpoints/default")
    ex.add_argument("--force", action="store_true", help="replace the checkpoint there")
    ex.set_defaults(run=cmd_export)

    pr = sub.add_parser("predict", help="find every droplet in images (CSV, overlay, JSON)")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--checkpoint", help="model directory or training workdir "
                    "(default: checkpoints/default)")
    pr.add_argument("--threshold", type=float,
                    help="presence to report (0-1; default: amortize.detect.DEFAULT_THRESHOLD, 0.4)")
    pr.add_argument("--scale", default="auto",
                    help="input px per encoder px; the default model covers radii 1.5-40 px "
                    "at 1, 3-80 px at 2. Default auto: the image is also tried shrunk 2x, "
                    "4x, ... (large droplets) or, when most droplets found are under 4 px, "
                    "enlarged (0.5, 0.25), and the scale reconstructed best is kept")
    pr.add_argument("--reconstruction", action="store_true",
                    help="also write <stem>.recon.png, <stem>.residual.png and recon_rmse")
    pr.add_argument("--max-pixels", type=_pixel_count, default=DEFAULT_MAX_PIXELS,
                    help=f"largest image to read, in pixels (default {DEFAULT_MAX_PIXELS}: 12000 x 12000)")
    pr.add_argument("--force", action="store_true", help="overwrite existing outputs (without it, "
                    "images whose outputs are complete are skipped and incomplete ones redone)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    pr.set_defaults(check=check_predict, run=cmd_predict)

    rf = sub.add_parser("refine", help="refine predictions by per-image SVI (CSV with posterior "
                        "sd, reconstruction, residual, loss curve, JSON)")
    rf.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    rf.add_argument("--out", required=True, help="output directory")
    rf.add_argument("--checkpoint", help="model directory or training workdir "
                    "(default: checkpoints/default)")
    rf.add_argument("--steps", type=int, help="most SVI steps (default 1000; stops early "
                    "when the loss, or on an enlarged copy the image fit, has converged)")
    rf.add_argument("--lr", type=float, help="Adam learning rate at every scale (default 0.02, and 0.03 on enlarged copies)")
    rf.add_argument("--rounds", type=int, help="SVI rounds with residual-driven birth "
                    "proposals between them (default 1: none)")
    # refinement.FIT_STOPS, written out: the parser is built without importing JAX.
    rf.add_argument("--fit-stop", default="enlarged", choices=("always", "enlarged", "never"),
                    help="also stop when the reported droplets' fit to the image stops improving, "
                    "and report the best-fitting state: on copies enlarged by --scale < 1 only "
                    "(enlarged, the default), always, or never")
    rf.add_argument("--device", default="auto", choices=("cpu", "gpu", "auto"),
                    help="cpu, gpu or auto (default: a GPU when JAX sees one)")
    rf.add_argument("--freeze-optics", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the trained decoder's optics (default) or fine-tune them per image")
    rf.add_argument("--scale", default="auto",
                    help="input px per encoder px, or auto (default) to refine at the scale "
                    "predict --scale auto chooses")
    rf.add_argument("--max-pixels", type=_pixel_count, default=DEFAULT_MAX_PIXELS,
                    help=f"largest image to read, in pixels (default {DEFAULT_MAX_PIXELS})")
    rf.add_argument("--force", action="store_true", help="overwrite existing outputs (without it, "
                    "images whose outputs are complete are skipped and incomplete ones redone)")
    rf.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    rf.set_defaults(check=check_refine, run=cmd_refine)

    ev = sub.add_parser("evaluate", help="match predictions to ground truth, print metrics")
    ev.add_argument("--pred", required=True, help="directory of predicted <stem>.csv")
    ev.add_argument("--truth", required=True, help="directory of ground-truth <stem>.csv")
    ev.add_argument("--rmin", type=float, default=0.0,
                    help="true droplets smaller than this radius (px) are don't-care")
    ev.add_argument("--partial-truth", action="store_true",
                    help="the truth labels only some droplets (e.g. benchmarks/slide_truth): a "
                         "prediction is a false alarm only if centred inside a labelled droplet")
    ev.set_defaults(run=cmd_evaluate)

    bench = sub.add_parser("bench", help="measure speed (prints JSON lines)")
    bench.add_argument("what", choices=["render", "predict", "train", "refine"])
    bench.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    bench.add_argument("--checkpoint", help="predict, refine: model to time (default: the shipped "
                       "one; for refine, checkpoints/simulated, as its scene is simulated)")
    bench.add_argument("--config", help="train: recipe to time (default: train/default.toml)")
    bench.set_defaults(run=cmd_bench)
    return parser


def _version() -> str:
    from amortize import __version__

    return f"amortize {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "check", None):
            args.check(args)  # before the import below: a bad argument costs no JAX import
        from amortize.compile_cache import enable_compilation_cache

        enable_compilation_cache(warn=lambda line: print(f"amortize {args.verb}: warning: {line}", file=sys.stderr))
        import warnings

        def show(message, category, filename, lineno, file=None, line=None):
            # The library's own warnings (a damaged checkpoint set aside, ...) are one line
            # each, like its errors; other packages' keep Python's format.
            if category.__module__.startswith("amortize"):
                print(f"amortize {args.verb}: warning: {message}", file=sys.stderr)
            else:
                python_show(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            python_show, warnings.showwarning = warnings.showwarning, show
            return args.run(args)
    except BadArgument as err:
        print(f"amortize {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except (BadInput, AmortizeError) as err:
        print(f"amortize {args.verb}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"amortize {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
