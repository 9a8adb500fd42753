"""Frozen dataclass configs for the scene prior, the renderer and the simulation nuisances.

Every config has a `tiny()` preset for tests, converts to and from plain dicts (the resolved
config is saved as JSON next to every output) and validates itself on construction, so a bad
value fails early with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from amortize.errors import BadArgument

T = TypeVar("T")

#: Largest image side (pixels) accepted anywhere; larger frames must be tiled by the caller.
MAX_IMAGE_SIDE = 16384


def _check(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise BadArgument(field, reason)


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
    overlap_softness: float = 0.0

    def __post_init__(self) -> None:
        _check(self.tile >= 2, "tile", "must be >= 2")
        _check(1 <= self.levels <= 12, "levels", "must be in 1..12")
        _check(self.cell_capacity >= 1, "cell_capacity", "must be >= 1")
        _check(self.tile_candidates >= 1, "tile_candidates", "must be >= 1")
        _check(self.reach > 1.0, "reach", "must be > 1 (a droplet covers at least its disc)")
        _check(0 < self.fade_start < self.reach, "fade_start", "need 0 < fade_start < reach")
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
    """

    blur_sigma_max: float = 1.2
    jpeg_probability: float = 0.5
    jpeg_quality_min: float = 40.0
    jpeg_quality_max: float = 95.0
    quantize: bool = True

    def __post_init__(self) -> None:
        _check(self.blur_sigma_max >= 0, "blur_sigma_max", "must be >= 0")
        _check(0 <= self.jpeg_probability <= 1, "jpeg_probability", "must be in [0, 1]")
        _check(
            1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100,
            "jpeg_quality_min/max",
            "need 1 <= min <= max <= 100",
        )

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


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from `to_dict` output (or a parsed TOML table).

    Unknown keys are an error, so that a typo in a recipe does not pass silently.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise BadArgument(cls.__name__, f"unknown field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        elif _is_tuple(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _is_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(hint))
    return origin is tuple
