"""amortize: instant Bayesian analysis of droplet micrographs.

A convolutional encoder, trained against a numpyro generative model of the scene, predicts
every droplet's position, radius and composition in one forward pass; per-image SVI refines.
"""

import importlib

from amortize.xla_flags import apply_cpu_flags

# Before anything can start JAX's backend, which reads XLA_FLAGS once.
apply_cpu_flags()

__version__ = "0.1.0"

#: The public names and the module each lives in. They are imported on first use, not with
#: the package: JAX, numpyro, flax and orbax take about 4 s to import on 2 cores, which the
#: console script's `--help` and its argument errors never need.
_PUBLIC = {
    "AmortizeError": "errors", "BadArgument": "errors", "BadInput": "errors",
    "Background": "droplets", "Droplets": "droplets", "to_table": "droplets",
    "NuisanceConfig": "config", "RefineConfig": "config", "RenderConfig": "config",
    "SceneConfig": "config", "SimulationConfig": "config",
    "Predictor": "predict",
    "adapt_folder": "adapt_corpus",
    "refine": "refinement",
    "Simulation": "simulate", "simulate": "simulate", "write_simulation": "simulate",
    "choose_scale": "autoscale",
    "default_optics_params": "optics",
    "droplet_model": "model",
    "render": "render",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'amortize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"amortize.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
