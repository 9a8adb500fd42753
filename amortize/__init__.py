"""amortize: instant Bayesian analysis of droplet micrographs.

A convolutional encoder, trained against a numpyro generative model of the scene, predicts
every droplet's position, radius and composition in one forward pass; per-image SVI refines.
"""

from amortize.xla_flags import apply_cpu_flags

# Before anything below can start JAX's backend, which reads XLA_FLAGS once.
apply_cpu_flags()

from amortize.autoscale import choose_scale
from amortize.config import NuisanceConfig, RenderConfig, SceneConfig, SimulationConfig
from amortize.droplets import Background, Droplets, to_table
from amortize.errors import AmortizeError, BadArgument, BadInput
from amortize.model import droplet_model
from amortize.optics import default_optics_params
from amortize.predict import Predictor
from amortize.refinement import RefineConfig, refine
from amortize.render import render
from amortize.simulate import Simulation, simulate, write_simulation

__version__ = "0.1.0"

__all__ = [
    "AmortizeError",
    "Background",
    "BadArgument",
    "BadInput",
    "Droplets",
    "NuisanceConfig",
    "Predictor",
    "RefineConfig",
    "RenderConfig",
    "SceneConfig",
    "Simulation",
    "SimulationConfig",
    "choose_scale",
    "default_optics_params",
    "droplet_model",
    "refine",
    "render",
    "simulate",
    "to_table",
    "write_simulation",
]
