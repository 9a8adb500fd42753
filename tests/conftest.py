"""Shared test set-up: CPU only, one cold compilation cache per session, tiny shapes, and the
shared data folder (skip if absent)."""

import importlib.metadata
import os
import pathlib
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session, shared by this process and the CLI's subprocesses:
# many tests compile the same tiny programs, and a fresh one keeps the timing a cold run's
# (the user's ~/.cache is neither read nor filled).
_CACHE = tempfile.TemporaryDirectory(prefix="amortize-test-cache-")
os.environ["AMORTIZE_CACHE_DIR"] = _CACHE.name
# The tests compile hundreds of tiny programs and run each for milliseconds, so compile
# time is most of the suite's time:
# - LLVM's optimisation passes cost more than they save (a CLI train-and-predict test:
#   86 s -> 70 s);
# - so do XLA's MLIR fusion emitters (jaxlib 0.10; a few wake steps: 46 s -> 29 s).
#   It is only set on the jaxlib series it was measured on: XLA aborts on a flag it does not
#   know (see amortize/xla_flags.py).
TEST_XLA_FLAGS = {"xla_backend_optimization_level": ("0", None),
                  "xla_cpu_use_fusion_emitters": ("false", "0.10")}
_JAXLIB = importlib.metadata.version("jaxlib")
for _name, (_value, _series) in TEST_XLA_FLAGS.items():
    if _series and not _JAXLIB.startswith(_series + "."):
        continue
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_name}={_value}").strip()

#: Programs that compile faster than this are not written to the tests' compilation cache.
TEST_CACHE_MIN_COMPILE_S = 0.3

import jax  # noqa: E402
import pytest  # noqa: E402

from amortize.config import RenderConfig, SceneConfig, SimulationConfig  # noqa: E402
from amortize.optics import default_optics_params  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def optics():
    return default_optics_params(3, 3)


@pytest.fixture(scope="session")
def tiny_render():
    return RenderConfig.tiny()


@pytest.fixture(scope="session")
def tiny_sim():
    return SimulationConfig.tiny()


@pytest.fixture(scope="session")
def tiny_scene():
    return SceneConfig.tiny()


@pytest.fixture
def shared_droplets_image():
    path = SHARED / "data" / "droplets" / "slide_a_left.png"
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (../shared beside the checkout)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _cpu_only():
    assert jax.default_backend() == "cpu"


@pytest.fixture(autouse=True, scope="session")
def _shared_compilation_cache():
    from amortize.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    # The CLI's subprocesses come for the big programs (training steps, SVI, the encoder).
    # Writing each of the thousands of small programs the tests compile costs more than
    # compiling them again would (four op-heavy test files serially, alternating: 105 and
    # 114 s with every program written, 87 and 106 s with these skipped; the whole suite
    # 554 s, against 579 s for nearly the same code with every program written).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", TEST_CACHE_MIN_COMPILE_S)
    yield
    _CACHE.cleanup()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, tiny_sim):
    """A folder of three tiny simulated images: a corpus for adaptation tests."""
    from amortize import io
    from amortize.simulate import simulate

    folder = tmp_path_factory.mktemp("corpus")
    for i, image in enumerate(simulate(3, (96, 80), seed=5, config=tiny_sim).images):
        io.write_png(folder / f"img{i}.png", image)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny encoder saved as a model checkpoint (for I/O and shape tests)."""
    from amortize.checkpoint import save_model
    from amortize.config import to_dict
    from amortize.encoder import init_encoder
    from amortize.train import RunConfig

    run = RunConfig.tiny()
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(path, init_encoder(jax.random.PRNGKey(0), run.encoder), to_dict(run), step=7)
    return path


@pytest.fixture(scope="session")
def default_predictor():
    from amortize.predict import DEFAULT_CHECKPOINT, Predictor

    if not DEFAULT_CHECKPOINT.exists():
        pytest.fail(f"the shipped model is missing: {DEFAULT_CHECKPOINT}")
    return Predictor.load()
