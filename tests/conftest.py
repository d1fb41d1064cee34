"""The test suite's two speeds.

* ``pytest`` — the fast loop: every test not marked ``slow``, property tests at the ``fast``
  Hypothesis profile (10 examples), the fuzzer at 50 models. About 2 minutes on 2 cores (the
  suite runs on both by default: ``-n 2`` in pyproject.toml; ``-n 0`` for one process).
* ``pytest --full`` — the full suite: the ``slow`` tests too (real timm / torchvision /
  ultralytics / transformers models, the training example, full-size reference models),
  property tests at the ``ci`` profile (40 examples) and the fuzzer's 2,000 models. About 13
  minutes on 2 cores.

``HYPOTHESIS_PROFILE=<name>`` picks a profile explicitly (``tests/profiles.py`` lists them);
``-m EXPR`` selects tests explicitly.
"""

import os

import profiles
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="repfx: the full suite (slow tests, the ci Hypothesis profile, 2,000 fuzzed models)",
    )


def pytest_configure(config):
    full = config.getoption("--full")
    profiles.activate(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if full else "fast"))
    if not full and not config.option.markexpr:
        config.option.markexpr = "not slow"


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
