"""Models people hold, from HuggingFace transformers (built from small configs, no weights)
and torchvision: ``repfx.fold(model, (x_batch1,))`` gives a module that returns the original's
output type, takes any batch, and runs no BatchNorm and no removable per-channel multiply."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from grammar import randomise_
from helpers import batch_norms, fresh_input, stored_multiplies
from torch import nn

import repfx
from repfx.proof.verify import verify
from repfx.testing import assert_close

SIZE = (3, 64, 64)


def _hf(config: str, model: str, **fields) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model)(getattr(transformers, config)(**fields))

    return build


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return getattr(models.segmentation, name, None) or getattr(models, name)

    return lambda: build()(weights=None, **kwargs)


STAGES = {"depths": [1, 1, 1, 1], "num_labels": 5}
MODELS = {
    "hf_poolformer": _hf(
        "PoolFormerConfig", "PoolFormerForImageClassification", hidden_sizes=[16, 16, 32, 32],
        **STAGES,
    ),
    "hf_swiftformer": _hf(
        "SwiftFormerConfig", "SwiftFormerForImageClassification", embed_dims=[16, 16, 32, 32],
        **STAGES,
    ),
    "hf_efficientnet": _hf(
        "EfficientNetConfig", "EfficientNetForImageClassification", width_coefficient=0.25,
        depth_coefficient=0.25, hidden_dim=320, image_size=64, num_labels=5,
    ),
    "hf_resnet": _hf(
        "ResNetConfig", "ResNetForImageClassification", embedding_size=16,
        hidden_sizes=[16, 32, 32, 64], **STAGES,
    ),
    "hf_regnet": _hf(
        "RegNetConfig", "RegNetForImageClassification", embedding_size=16,
        hidden_sizes=[16, 32, 32, 64], groups_width=8, **STAGES,
    ),
    "tv_deeplabv3_mobilenet_v3_large": _torchvision(
        "deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=3
    ),
    "tv_efficientnet_b0": _torchvision("efficientnet_b0", num_classes=5),
}  # fmt: skip
FAST = {"hf_poolformer"}  # one small model in the fast loop; the rest in the full suite


def _cases() -> list:
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in MODELS]


@pytest.mark.parametrize("name", _cases())
def test_a_model_people_hold_folds_to_a_deployable_module(name):
    """Folded on a batch of 1: the original's output type and values on a batch of 3, also
    after ``torch.save`` / ``torch.load``; no batch norm and no removable multiply left."""
    model = randomise_(MODELS[name](), torch.Generator().manual_seed(0)).eval()
    folded = repfx.fold(model, (fresh_input(1, *SIZE),))
    fresh = fresh_input(3, *SIZE, seed=2)
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = model(fresh)
        for actual in (folded(fresh), loaded(fresh)):
            assert type(actual) is type(expected)
            assert pytree.tree_structure(actual) == pytree.tree_structure(expected)
            for got, want in zip(*map(pytree.tree_leaves, (actual, expected)), strict=True):
                assert_close(got, want)
    assert batch_norms(folded) == 0
    assert stored_multiplies(folded, fresh) == []


LANGUAGE_MODELS = [("LlamaConfig", "LlamaForCausalLM"), ("Qwen2Config", "Qwen2ForCausalLM")]


def _language_model(config: str, model_class: str, **fields) -> nn.Module:
    fields = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, **fields,
    }  # fmt: skip
    model = getattr(transformers, model_class)(getattr(transformers, config)(**fields))
    return randomise_(model, torch.Generator().manual_seed(0)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("config, model_class", LANGUAGE_MODELS)
def test_a_language_model_returns_its_cache_and_takes_any_batch_and_length(config, model_class):
    """A decoder returns its key / value cache (an object torch's pytree does not know) next to
    the logits: the folded module returns the same types, every norm weight has moved into the
    projections, and both agree on a fresh input of another batch and length (cache
    included)."""
    model = _language_model(config, model_class)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    folded = repfx.fold(model, (ids,))
    fresh = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = folded(fresh), model(fresh)
    assert type(got) is type(want)
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]  # the cache's
    norms = [n for n, _ in model.named_parameters() if n.endswith("norm.weight")]
    assert not set(norms) & set(stored_multiplies(folded, fresh))
    check = verify(model, folded, (fresh,))
    assert check.passed, check.summary()
    assert len(check.outputs) > 1  # the logits and the cache's tensors, each compared


@pytest.mark.slow
@pytest.mark.parametrize("config, model_class", LANGUAGE_MODELS)
def test_every_rms_norm_weight_of_a_language_model_moves_into_the_projections(config, model_class):
    """Without the cache in its output a decoder is captured whole: the final norm's weight
    reaches ``lm_head`` through the crop of the positions the head reads. The folded module
    takes any batch and any sequence length."""
    model = _language_model(config, model_class, use_cache=False)
    folded = repfx.fold(model, (torch.randint(0, 64, (1, 7)),))
    fresh = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    norms = [n for n, _ in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 5  # two per layer, and the final one
    assert not set(norms) & set(stored_multiplies(folded, fresh))
    check = verify(model, folded, (fresh,))
    assert check.passed, check.summary()


@pytest.mark.slow
def test_a_final_norm_stays_when_the_head_shares_its_weight_with_the_embedding():
    model = _language_model("LlamaConfig", "LlamaForCausalLM", use_cache=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    folded = repfx.fold(model, (torch.randint(0, 64, (1, 7)),))
    fresh = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    assert "model.norm.weight" in stored_multiplies(folded, fresh)
    reasons = [s.reason for s in folded.meta[repfx.REPORT_KEY].skipped if "model.norm" in s.where]
    assert any("consumer linear parameter is used at" in r for r in reasons), reasons
    with torch.no_grad():
        assert_close(folded(fresh).logits, model(fresh).logits)
