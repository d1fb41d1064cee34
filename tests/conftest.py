"""Hypothesis profiles, selected with ``HYPOTHESIS_PROFILE`` (default ``ci``).

* ``ci`` — deterministic and bounded: the property tests' 40 examples; the fuzzer
  (``tests/test_fuzz.py``) generates 2,000 models per run (and a dozen compiled ones),
  derandomized, without shrinking so that a failure is reported at once (each failure prints
  the model it found). About 3 minutes of one core.
* ``dev`` — random, heavier: 600 examples; the fuzzer 6,000 models, shrinking.
* ``fuzz`` — a long random fuzzing run: the fuzzer 24,000 models, shrinking; the other property
  tests as in ``dev``.

The fuzzer reads its settings from the profile named ``<profile>-fuzzer``, whose
``max_examples`` is the number of models per run that ``test_fuzz.py`` shares among its tests.
"""

import os

import torch
from hypothesis import HealthCheck, Phase, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=_QUIET[:2],
)
settings.register_profile(
    "dev",
    max_examples=600,
    deadline=None,
    print_blob=True,
    suppress_health_check=_QUIET[:2],
)
settings.register_profile("fuzz", settings.get_profile("dev"))

_NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile(
    "ci-fuzzer",
    max_examples=2000,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=_NO_SHRINK,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    "dev-fuzzer",
    max_examples=6000,
    deadline=None,
    print_blob=True,
    suppress_health_check=_QUIET,
)
settings.register_profile("fuzz-fuzzer", settings.get_profile("dev-fuzzer"), max_examples=24000)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# A rewrite the commit point rejects is a repfx bug: under the test suite it raises instead of
# being undone and reported (repfx.passes.base.STRICT_ENV).
os.environ.setdefault("REPFX_STRICT", "1")
