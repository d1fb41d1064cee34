"""Hypothesis profiles of the test suite, and which one is active.

* ``fast`` — plain ``pytest``: deterministic, 10 examples per property test; the fuzzer
  (``tests/test_fuzz.py``) generates 50 models per run, derandomized, without shrinking.
* ``ci`` — ``pytest --full``: deterministic, 40 examples per property test; the fuzzer 2,000
  models (and a dozen compiled ones). About 10 minutes of one core for the fuzzer.
* ``dev`` — random, heavier: 600 examples; the fuzzer 6,000 models, shrinking.
* ``fuzz`` — a long random fuzzing run: the fuzzer 24,000 models, shrinking; the other property
  tests as in ``dev``.

``HYPOTHESIS_PROFILE=<name>`` picks one explicitly (``tests/conftest.py``). The fuzzer reads its
settings from the profile named ``<profile>-fuzzer``, whose ``max_examples`` is the number of
models per run that ``test_fuzz.py`` shares among its tests.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import InvalidArgument

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]

_DETERMINISTIC = settings(
    derandomize=True, deadline=None, print_blob=True, suppress_health_check=_QUIET[:2]
)
settings.register_profile("fast", _DETERMINISTIC, max_examples=10)
settings.register_profile("ci", _DETERMINISTIC, max_examples=40)
settings.register_profile(
    "dev", max_examples=600, deadline=None, print_blob=True, suppress_health_check=_QUIET[:2]
)
settings.register_profile("fuzz", settings.get_profile("dev"))

_FUZZER = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=_NO_SHRINK,
    suppress_health_check=_QUIET,
)
settings.register_profile("fast-fuzzer", _FUZZER, max_examples=50)
settings.register_profile("ci-fuzzer", _FUZZER, max_examples=2000)
settings.register_profile(
    "dev-fuzzer", max_examples=6000, deadline=None, print_blob=True, suppress_health_check=_QUIET
)
settings.register_profile("fuzz-fuzzer", settings.get_profile("dev-fuzzer"), max_examples=24000)

_active = "fast"


def activate(name: str) -> None:
    """Load profile ``name`` for every property test (``tests/conftest.py`` calls it once)."""
    global _active
    settings.load_profile(name)
    _active = name


def fuzzer_settings() -> settings:
    """The fuzzer profile of the active profile (``ci-fuzzer`` for a profile without one)."""
    try:
        return settings.get_profile(f"{_active}-fuzzer")
    except InvalidArgument:
        return settings.get_profile("ci-fuzzer")
