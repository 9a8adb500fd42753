"""Frozen dataclass configs for the scene prior, the renderer, the simulation nuisances and
per-image refinement, and the checks of the console script's other arguments.

Every config converts to and from plain dicts (the resolved config is saved as JSON next to
every output) and validates itself on construction, so a bad value fails early with a message
that names the field; the scene, render and simulation configs have a `tiny()` preset for
tests. This module imports neither JAX nor numpy: `amortize` checks its arguments with it
before importing the library, so a typo costs a fraction of a second, not the import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from typing import Any, TypeVar

from amortize.errors import BadArgument, BadInput

T = TypeVar("T")

#: Largest image side (pixels) accepted anywhere; larger frames must be tiled by the caller.
MAX_IMAGE_SIDE = 16384
#: Largest image read by default (pixels): 12000 x 12000. Reading one takes 1.7 GB as
#: float32 RGB, and predicting on it several times that; `--max-pixels` raises the limit.
DEFAULT_MAX_PIXELS = 144_000_000


def _check(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise BadArgument(field, reason)


def validate_request(n: int, size: tuple[int, int]) -> None:
    """Reject a bad count or image size before anything is computed or written."""
    if int(n) != n or n <= 0:
        raise BadArgument("--n", f"must be a positive whole number, got {n}")
    w, h = size
    for name, v in (("width", w), ("height", h)):
        if int(v) != v or v <= 0:
            raise BadArgument("--size", f"{name} must be a positive whole number, got {v}")
        if v > MAX_IMAGE_SIDE:
            raise BadArgument("--size", f"{name} {v} exceeds the maximum of {MAX_IMAGE_SIDE} px")
    if min(w, h) < 8:
        raise BadArgument("--size", f"images must be at least 8x8 px, got {w}x{h}")


#: The text `--scale` takes for the scale search (`amortize.autoscale`).
AUTO = "auto"


def parse_scale(text: str) -> float | str:
    """`--scale`'s value: "auto" or a positive number (ValueError otherwise)."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be 'auto' or a positive number, got {text}")
    return value


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Priors of the droplet scene (all lengths in input-image pixels).

    Attributes:
        channels: colour channels C of the rendered image.
        n_types: K, the length of each droplet's composition vector.
        density: expected number of droplet centres per 100 x 100 px of image.
        radius_min, radius_max: support of the radius prior (px).
        radius_log_mean, radius_log_sd: log-normal radius prior, truncated to the support.
            None derives them from the support: the mean is its centre in log space and the
            support spans +-2 standard deviations.
        composition_concentration: Beta(a, b) prior of every composition value.
        background_min, background_max: Uniform prior of the per-channel background colour.
        illumination_sd: prior scale of the smooth illumination field's coefficients
            (logit units; 0 gives a flat background).
        noise_min, noise_max: LogUniform prior of the pixel noise scale.
        slot_margin: extra droplet slots, in standard deviations of the droplet count, so that
            a fixed-capacity scene rarely truncates the prior's count.
        density_spread: if > 1, each scene's density is `density` times a LogUniform factor
            in [1 / spread, spread] (sparse and crowded scenes from one prior); 1 fixes it.
        min_separation: hard-core thinning of the droplet centres (Matern type II, the larger
            droplet survives): two droplets' centres are at least `min_separation` times the
            sum of their radii apart. 0 lets droplets overlap freely (independent centres);
            1 lets them touch but never overlap. Real droplets touch and partly overlap but
            a droplet never sits deep inside another, where it would be invisible. `density`
            counts centres before thinning.
    """

    channels: int = 3
    n_types: int = 3
    density: float = 12.0
    radius_min: float = 1.5
    radius_max: float = 30.0
    radius_log_mean: float | None = None
    radius_log_sd: float | None = None
    composition_concentration: tuple[float, float] = (1.0, 1.0)
    background_min: float = 0.35
    background_max: float = 0.85
    illumination_sd: float = 0.15
    noise_min: float = 0.005
    noise_max: float = 0.04
    slot_margin: float = 4.0
    density_spread: float = 1.0
    min_separation: float = 0.0

    def __post_init__(self) -> None:
        _check(self.channels in (1, 3), "channels", "must be 1 or 3")
        _check(self.n_types >= 1, "n_types", "must be at least 1")
        _check(math.isfinite(self.density) and self.density > 0, "density", "must be > 0")
        _check(self.radius_min > 0, "radius_min", "must be > 0")
        _check(
            self.radius_max > self.radius_min,
            "radius_range",
            f"inverted or empty: min {self.radius_min} >= max {self.radius_max}",
        )
        if self.radius_log_sd is not None:
            _check(self.radius_log_sd > 0, "radius_log_sd", "must be > 0")
        a, b = self.composition_concentration
        _check(a > 0 and b > 0, "composition_concentration", "both values must be > 0")
        _check(
            0 < self.background_min < self.background_max < 1,
            "background_min/max",
            "need 0 < min < max < 1",
        )
        _check(self.illumination_sd >= 0, "illumination_sd", "must be >= 0")
        _check(self.slot_margin >= 0, "slot_margin", "must be >= 0")
        _check(self.density_spread >= 1, "density_spread", "must be >= 1 (1 = fixed density)")
        _check(0 < self.noise_min < self.noise_max, "noise_min/max", "need 0 < min < max")
        _check(
            0 <= self.min_separation <= 1, "min_separation", "must be in [0, 1] (1 = no overlap)"
        )

    @property
    def log_radius_prior(self) -> tuple[float, float]:
        """(mean, sd) of log radius, resolved from the support when not given."""
        lo, hi = math.log(self.radius_min), math.log(self.radius_max)
        mean = self.radius_log_mean if self.radius_log_mean is not None else 0.5 * (lo + hi)
        sd = self.radius_log_sd if self.radius_log_sd is not None else (hi - lo) / 4.0
        return mean, sd

    def margin(self) -> float:
        """Border (px) around the image in which centres are also sampled.

        Droplets centred just outside the frame still show inside it; sampling them keeps
        the density uniform up to the edges.
        """
        return self.radius_max

    def expected_count(self, shape: tuple[int, int]) -> float:
        """Expected number of droplets centred in the image plus its margin."""
        h, w = shape
        m = self.margin()
        return self.density * (h + 2 * m) * (w + 2 * m) / 1e4

    def n_slots(self, shape: tuple[int, int]) -> int:
        """Fixed droplet capacity for an image of `shape` (H, W), at the densest scene."""
        mean = self.expected_count(shape) * self.density_spread
        return int(math.ceil(mean + self.slot_margin * math.sqrt(mean) + 4))

    @classmethod
    def tiny(cls) -> "SceneConfig":
        return cls(density=30.0, radius_min=1.5, radius_max=6.0)


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Spatial index and compositing of the renderer.

    Droplets are bucketed into square cells. A droplet goes to the level whose cell side is at
    least its reach (reach * radius), so every pixel it touches lies in its own cell or one of
    the 8 around it. Each `tile` x `tile` block of pixels gathers the droplets of those 3 x 3
    cells on every level, keeps the `tile_candidates` nearest ones, and each pixel then takes
    the candidate nearest in radius-normalised distance. Cost is linear in pixels.

    Attributes:
        tile: side (px) of the pixel tiles and of the level-0 cells.
        levels: number of cell levels; level l has cells of side tile * 2**l.
        cell_capacity: droplets kept per cell and level (extra ones are not drawn).
        tile_candidates: droplets kept per tile after culling.
        reach: how far a droplet affects the image, in radii (caustics and halos spill past
            the rim).
        fade_start: normalised distance at which the droplet's effect starts fading to 0 at
            `reach`, so that appearance is continuous where the nearest droplet changes.
        edge_reach_px: every droplet is drawn at least this far (px) past its rim, its fade
            scaled with it, so that a soft edge (the point spread of anchored optics) is not
            cut off on small droplets: a 2 px soft edge runs 5-6 px past the rim, beyond
            1.5 r for droplets under about 12 px. 0: `reach` alone. Tails keep `reach`.
        overlap_softness: 0 (the scene model) gives each pixel to the nearest droplet. A
            positive value tau blends the two nearest, the nearer weighted by
            sigmoid((d2 - d1) / tau) in normalised distance, so that gradients also see
            where an overlap's boundary lies. Refinement uses it (`RefineConfig`); it
            evaluates the optics twice per pixel.
    """

    tile: int = 8
    levels: int = 4
    cell_capacity: int = 6
    tile_candidates: int = 16
    reach: float = 1.5
    fade_start: float = 1.2
    edge_reach_px: float = 0.0
    overlap_softness: float = 0.0

    def __post_init__(self) -> None:
        _check(self.tile >= 2, "tile", "must be >= 2")
        _check(1 <= self.levels <= 12, "levels", "must be in 1..12")
        _check(self.cell_capacity >= 1, "cell_capacity", "must be >= 1")
        _check(self.tile_candidates >= 1, "tile_candidates", "must be >= 1")
        _check(self.reach > 1.0, "reach", "must be > 1 (a droplet covers at least its disc)")
        _check(0 < self.fade_start < self.reach, "fade_start", "need 0 < fade_start < reach")
        _check(self.edge_reach_px >= 0, "edge_reach_px", "must be >= 0 (0: reach alone)")
        _check(self.overlap_softness >= 0, "overlap_softness", "must be >= 0")

    @property
    def max_radius(self) -> float:
        """Largest radius (px) drawn without truncation."""
        return self.tile * 2 ** (self.levels - 1) / self.reach

    @classmethod
    def tiny(cls) -> "RenderConfig":
        return cls(tile=4, levels=3, cell_capacity=4, tile_candidates=8)


@dataclasses.dataclass(frozen=True)
class NuisanceConfig:
    """Randomised imaging nuisances applied to simulated scenes (not part of the likelihood).

    Attributes:
        blur_sigma_max: Gaussian blur sigma (px) drawn uniformly from [0, max].
        jpeg_probability: chance that a scene goes through JPEG-like compression.
        jpeg_quality_min, jpeg_quality_max: quality range (JPEG scale 1..100).
        quantize: round the final image to 8 bits, as a saved PNG would be.
        clutter_probability: chance that a scene carries clutter that is not a droplet
            (`amortize.clutter`: lines and channel walls, a scale bar, text, fibres,
            vignetting); each kind then appears with chance 1/2. 0 draws none.
        clutter_lines: most straight lines (or channel wall pairs) per cluttered scene.
        clutter_fibres: most curved fibres per cluttered scene.
        vignette_max: largest darkening of the corners of a cluttered scene (fraction).
    """

    blur_sigma_max: float = 1.2
    jpeg_probability: float = 0.5
    jpeg_quality_min: float = 40.0
    jpeg_quality_max: float = 95.0
    quantize: bool = True
    clutter_probability: float = 0.0
    clutter_lines: int = 3
    clutter_fibres: int = 2
    vignette_max: float = 0.3

    def __post_init__(self) -> None:
        _check(self.blur_sigma_max >= 0, "blur_sigma_max", "must be >= 0")
        _check(0 <= self.jpeg_probability <= 1, "jpeg_probability", "must be in [0, 1]")
        _check(
            1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100,
            "jpeg_quality_min/max",
            "need 1 <= min <= max <= 100",
        )
        _check(0 <= self.clutter_probability <= 1, "clutter_probability", "must be in [0, 1]")
        _check(self.clutter_lines >= 0, "clutter_lines", "must be >= 0")
        _check(self.clutter_fibres >= 0, "clutter_fibres", "must be >= 0")
        _check(0 <= self.vignette_max < 1, "vignette_max", "must be in [0, 1)")

    @classmethod
    def tiny(cls) -> "NuisanceConfig":
        return cls()


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated scene: prior, renderer and nuisances."""

    scene: SceneConfig = dataclasses.field(default_factory=SceneConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    nuisance: NuisanceConfig = dataclasses.field(default_factory=NuisanceConfig)

    def __post_init__(self) -> None:
        _check(
            self.scene.radius_max <= self.render.max_radius,
            "radius_max",
            f"{self.scene.radius_max} px exceeds the renderer's largest radius "
            f"{self.render.max_radius:.1f} px (raise render.levels or render.tile)",
        )

    @classmethod
    def tiny(cls) -> "SimulationConfig":
        return cls(SceneConfig.tiny(), RenderConfig.tiny(), NuisanceConfig.tiny())


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], table: str = "") -> T:
    """Rebuild a config dataclass from `to_dict` output (or a parsed TOML table).

    Every value is checked against the field's type hint before the dataclass's own range
    checks run: an int field takes integers only (not 4.5, 2.0 or true), a float field any
    finite number (ints become floats), a bool field true or false, a str field a string, a
    tuple field a list of the right length and element types, a nested config a table;
    None only where the hint allows it. Unknown keys are an error, so that a typo in a
    recipe does not pass silently. Errors are `BadArgument`s whose subject names the table
    (`table`, e.g. "simulation.scene") and field: "[train] batch_size".
    """
    if not isinstance(data, dict):
        raise BadArgument(f"[{table}]" if table else cls.__name__, f"must be a table, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise BadArgument(f"[{table}]" if table else cls.__name__,
                          f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    kwargs = {key: _convert(hints[key], value, key, table) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except BadArgument as err:  # a range check of the dataclass: name the table as well
        if table and not err.subject.startswith("["):
            raise BadArgument(_where(table, err.subject), err.reason) from None
        raise


def from_saved(cls: type[T], data: dict[str, Any]) -> T:
    """`from_dict` of a config saved with a model or run (its `config.json`): whole numbers
    written as floats (200.0), which earlier versions accepted in integer fields, are read
    as integers, so that older models still load."""
    return from_dict(cls, _integral_floats_as_ints(cls, data))


def _integral_floats_as_ints(cls: Any, data: Any) -> Any:
    if not (dataclasses.is_dataclass(cls) and isinstance(data, dict)):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint):
            out[key] = _integral_floats_as_ints(hint, value)
        elif hint is int and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
    return out


def check_types(config: Any, table: str = "") -> None:
    """Check every field of a config dataclass (and of the configs nested in it) against its
    type hint, as `from_dict` does, for a config built in code rather than read from a file.

    Numbers of other types (numpy's) pass where they are integers or real numbers.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, f"{table}.{f.name}" if table else f.name)
        else:
            _convert(hints[f.name], value, f.name, table)


class BadRecipe(BadArgument, BadInput):
    """A recipe or config file holds a value of the wrong type or out of range: a bad argument
    (the CLI exits 2 with nothing written) that is also a bad input file."""


def config_from_file(cls: type[T], data: Any, path: Any, table: str = "") -> T:
    """`from_dict` of the table `table` of the file `path`; a bad value is one `BadRecipe`
    line naming the file, the table and the field, e.g.
    "x.toml: [train] batch_size must be an integer, got 2.0"."""
    try:
        return from_dict(cls, data, table)
    except BadArgument as err:
        raise recipe_error(path, err) from None
    except (TypeError, ValueError) as err:
        raise BadRecipe(path, f"bad value ({err})") from None


def recipe_error(path: Any, err: BadArgument) -> BadRecipe:
    """`err` (from `from_dict` or a range check) as a one-line error of the file `path`."""
    sep = " " if err.subject.startswith("[") else ": "
    return BadRecipe(path, f"{err.subject}{sep}{err.reason}")


def _where(table: str, field: str) -> str:
    return f"[{table}] {field}" if table else field


def _show(value: Any) -> str:
    """A value as the recipe would spell it ("1e-4" with its quotes, true, [64, 64])."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, nan
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return repr(value)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and all(a == args[0] for a in args):
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(hint, _describe(hint))


def _convert(hint: Any, value: Any, field: str, table: str) -> Any:
    """`value` checked against `hint` (ints of a float field become floats, lists of a tuple
    field tuples, tables of a nested config the config); a `BadArgument` otherwise."""

    def bad(reason: str | None = None):
        return BadArgument(_where(table, field), reason or f"must be {_describe(hint)}, got {_show(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return _convert(options[0], value, field, table)
            except BadArgument as err:
                raise bad(err.reason) from None
        for option in options:
            try:
                return _convert(option, value, field, table)
            except BadArgument:
                pass
        raise bad()
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(value) != len(args):
            raise bad()
        try:
            return tuple(_convert(a, v, field, table) for a, v in zip(args, value)) if args else tuple(value)
        except BadArgument:
            raise bad() from None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise bad()
        return from_dict(hint, value, f"{table}.{field}" if table else field)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise bad()
        try:
            number = float(value)
        except (OverflowError, ValueError):
            raise bad() from None
        if not math.isfinite(number):
            raise bad(f"must be a finite number, got {_show(number)}")
        return number if type(value) in (int, float) else value
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    return value


#: Largest blur (px) the model may fit.
BLUR_MAX_PX = 8.0

#: When `RefineConfig.fit_stop` watches the image fit.
FIT_STOPS = ("always", "enlarged", "never")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Settings of per-image refinement.

    Attributes:
        steps: most SVI steps in all.
        learning_rate: Adam step size (in each parameter's unconstrained space) at scales >= 1.
        enlarged_learning_rate: the same on copies enlarged by `scale < 1`, where the fit
            test stops refinement after tens of steps rather than hundreds. At 0.03 instead of
            0.02 the enlarged slides reached the same fit 10-15 steps sooner (the 507 x 380
            stand-in: 0.02436 after 40 steps against 0.02437 after 50; the slide at 3x: 0.0270
            after 40 against 0.0271 after 50); at 0.04 and 0.06 the fit's best was worse
            (0.02445 and 0.02483) and came after 30 and 20 steps.
        enlarged_shape_rate: on those enlarged copies, radius and composition shifts learn
            this many times faster than centres (`refine_optimizer`). Adam moves each
            parameter by about its rate per step, which at 0.03 is up to 0.045 input px of
            a centre at 4x (its trust region is 1.5 input px) but only 0.6 % of a radius
            and 0.03 of a composition logit: either alone twice as fast already improved
            the fit at every check (see BENCHMARKS.md). At 3 the 507 x 380 stand-in stopped
            after 30 steps at 0.02388 instead of 40 at 0.02436 (2: 35 steps, 0.02390; 5:
            30 steps, 0.02381); centres twice as fast overshot (0.02545). At scale 1, where
            the loss test stops hundreds of steps later, it helped nothing (8 simulated
            scenes: position RMSE 0.1547 -> 0.1568 px, composition R² 0.929 -> 0.922), so
            there every shift keeps one rate.
        rounds: SVI rounds; a residual-driven birth proposal runs between consecutive
            rounds. The default, 1, leaves births to the encoder's sub-threshold candidates:
            on simulated scenes the residual's blobs were mostly misfits, and a second round
            added 20 false droplets per 512 x 384 image for 2 real ones.
        chunk: steps per compiled call when the fit is not watched; the convergence test
            on the loss runs on windows of this many steps.
        tol, patience: converged when `patience` windows in a row have not lowered the best
            window-mean loss by more than the fraction `tol` of it.
        fit_stop: when to watch the image fit as well ("always", "enlarged" or "never"):
            every `fit_every` steps, the RMSE of the reported droplets' rendering; the state
            that fits best is reported, and refinement stops once `fit_patience` checks in
            a row have not lowered the best fit by more than the fraction `fit_tol` of it.
            "enlarged" (the default) watches it on copies enlarged by `scale < 1` only. There
            the loss keeps falling about 1 % per chunk for hundreds of steps (the fitted
            noise keeps shrinking) after the fit has settled: the slide at 4x took 625
            steps and 197 s for 0.0001 less error than 50 steps. At scale 1 the centres keep
            improving after the fit has settled (simulated scenes: position RMSE 0.221 px
            after 50 steps, 0.166 after 125, with the fit 0.02899 and 0.02915), so the best
            fit would stop them too early.
        fit_every: steps between fit checks (0.1-0.15 s each on the slide at 4x). Checked
            every 5 steps, its fit falls smoothly to its best after 55 and then rises;
            checked after every 25-step chunk, refinement ran a whole chunk past the best.
        min_presence: encoder peaks at least this likely become slots (births from the
            encoder's half-seen droplets).
        spare: extra slots for birth proposals, as a fraction of the droplets found (at
            least `SLOT_BUCKET` / 16).
        temperature: of the relaxed presence used for rendering.
        freeze_optics: keep the trained decoder's optics (True) or fine-tune them.
        threshold: posterior presence needed to report a droplet.
        birth_snr: a residual blob is proposed when its smoothed squared residual exceeds
            this many times the image's median squared residual.
        blur_max: the model blurs its rendering by a Gaussian whose sigma (0 to blur_max
            px) is fitted to the image: defocus is in every real micrograph and in the
            simulator's nuisances, and a sharp model of a blurred image drags neighbouring
            droplets around. 0 turns it off.
        samples: on a copy enlarged k times, SVI evaluates the model's rendering at this
            many points per image pixel side (at most k; see `sample_points`), not at all
            k x k work pixels. Each step costs about (samples / k)^2 as much.
        coarse_steps: when `samples` puts more than one point per image pixel side, the
            first this many steps (at most half of `steps`) evaluate one, the centre of each
            image pixel's block: a quarter of the points at 2 per side, and about a fifth of
            a step's time. One point per pixel is a biased stand-in for the pixel's box
            average (0.0056 RMS on the slide at 4x), so the steps after them, and every fit
            check, use `samples`. On the 507 x 380 stand-in (see BENCHMARKS.md), 15 coarse
            steps then 20 at 2 per side reached 0.02386 against 0.02388 after 30 at 2 per
            side, and `amortize refine` was faster in six paired runs (by 0.3-5.6 s, median
            2.2 s); 10, 20 and 25 coarse steps stopped at 0.02380, 0.02389 and 0.02399, and
            20 was worse than 15 on the three other enlarged frames. 0 turns it off.
        field: when SVI fits a smooth background correction (`Background.field`) along
            with the quadratic illumination ("always", "enlarged" or "never"). On a 507 x 380
            stand-in for the notebooks' frame (an enlarged copy) the residual kept slow
            variations (19 px block means: RMS 0.006) that one quadratic over the whole field
            cannot follow, and the correction took the fit from 0.0255 to 0.0246 in the same
            50 steps. "enlarged" (the default) fits it on enlarged copies only: on simulated
            scenes at scale 1, whose illumination is exactly quadratic, it only added
            freedom, and position RMSE on 10 validation scenes rose from 0.137 to 0.162 px.
        field_spacing: input px between the correction's knots, at most (`field_knots`).
        overlap_softness: `RenderConfig.overlap_softness` of SVI's model at scales >= 1 (0:
            the scene model's nearest-droplet compositing). Its gradient does not see the
            boundary between two overlapping droplets move, and centres settled where it
            vanishes, not where the fit is best: refined from the true droplets, a 2 px
            droplet sat 0.7 px off with 200 log-likelihood units to gain at the truth. On 10
            validation scenes (seed 555) 0.05 took the position RMSE from 0.156 to 0.141 px.
            Each step costs about 1.8 times as much, so enlarged copies (droplets 4 times
            larger in work px, a smaller share of their pixels on a boundary) keep it off:
            the slide at 4x gained 0.0001 in fit at twice the time.
    """

    steps: int = 1000
    learning_rate: float = 0.02
    enlarged_learning_rate: float = 0.03
    enlarged_shape_rate: float = 3.0
    rounds: int = 1
    chunk: int = 25
    tol: float = 1e-3
    patience: int = 3
    fit_stop: str = "enlarged"
    fit_tol: float = 0.01
    fit_patience: int = 2
    fit_every: int = 5
    min_presence: float = 0.1
    spare: float = 0.1
    temperature: float = 0.5
    freeze_optics: bool = True
    threshold: float = 0.5
    birth_snr: float = 6.0
    blur_max: float = 2.0
    samples: int = 2
    coarse_steps: int = 15
    field: str = "enlarged"
    field_spacing: float = 64.0
    overlap_softness: float = 0.05

    def __post_init__(self) -> None:
        check_types(self)  # built from options and code, not only from_dict: 1.5 steps, "0.1"
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(self.learning_rate > 0 and math.isfinite(self.learning_rate), "lr", "must be > 0")
        _check(self.enlarged_learning_rate > 0 and math.isfinite(self.enlarged_learning_rate),
               "enlarged_learning_rate", "must be > 0")
        _check(self.enlarged_shape_rate > 0 and math.isfinite(self.enlarged_shape_rate),
               "enlarged_shape_rate", "must be > 0")
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        _check(self.chunk >= 1, "chunk", "must be >= 1")
        _check(self.tol >= 0, "tol", "must be >= 0")
        _check(self.patience >= 1, "patience", "must be >= 1")
        _check(self.fit_stop in FIT_STOPS, "fit_stop", f"must be one of {', '.join(FIT_STOPS)}")
        _check(0 <= self.fit_tol < 1, "fit_tol", "must be in [0, 1)")
        _check(self.fit_patience >= 1, "fit_patience", "must be >= 1")
        _check(self.fit_every >= 1, "fit_every", "must be >= 1")
        _check(0 < self.min_presence < 1, "min_presence", "must be in (0, 1)")
        _check(self.spare >= 0, "spare", "must be >= 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0 < self.threshold < 1, "threshold", "must be in (0, 1)")
        _check(self.birth_snr > 0, "birth_snr", "must be > 0")
        _check(0 <= self.blur_max <= BLUR_MAX_PX, "blur_max", f"must be in [0, {BLUR_MAX_PX}] px")
        _check(self.samples >= 1, "samples", "must be >= 1")
        _check(self.coarse_steps >= 0, "coarse_steps", "must be >= 0")
        _check(self.field in FIT_STOPS, "field", f"must be one of {', '.join(FIT_STOPS)}")
        _check(self.field_spacing > 0 and math.isfinite(self.field_spacing), "field_spacing", "must be > 0")
        _check(self.overlap_softness >= 0, "overlap_softness", "must be >= 0")
