import os
import subprocess
import sys

from amortize.xla_flags import CPU_FLAGS, KEEP_DEFAULTS_ENV, jaxlib_series, with_cpu_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type="
MEASURED = CPU_FLAGS[0][2][0]


def test_flags_are_added_only_on_the_measured_jaxlib_and_never_over_the_users():
    assert with_cpu_flags("", MEASURED) == YNN
    assert with_cpu_flags("--xla_dump_to=/tmp/d", MEASURED) == "--xla_dump_to=/tmp/d " + YNN
    # The user's own value for the flag is kept as it is.
    assert with_cpu_flags("--xla_cpu_experimental_ynn_fusion_type=dot", MEASURED) == \
        "--xla_cpu_experimental_ynn_fusion_type=dot"
    # XLA aborts on flags it does not know: other jaxlib series get nothing.
    assert with_cpu_flags("--xla_dump_to=/tmp/d", (9, 99)) == "--xla_dump_to=/tmp/d"
    assert with_cpu_flags("", None) == ""


def _flags_after_import(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", KEEP_DEFAULTS_ENV)}
    env.update(env_extra)
    code = "import os, amortize, jax; jax.numpy.zeros(1).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_importing_amortize_sets_the_flags_before_jax_starts():
    expected = YNN if jaxlib_series() == MEASURED else ""
    assert _flags_after_import({}) == expected
    assert _flags_after_import({KEEP_DEFAULTS_ENV: "1"}) == ""
