"""repfx on real timm models that nobody on the team wrote.

For each model: random weights (no downloads), every BatchNorm / LayerScale / Scale / StarReLU /
norm / bias parameter re-drawn at O(1) with a fixed seed (identity BN statistics or a 1e-5
LayerScale would make a wrong fold invisible), then ``repfx.fold(model, (x,))`` must

* not raise, and match the model's output within ``repfx.proof.tolerances``;
* leave the model's ``state_dict`` untouched, and share no tensor storage with it;
* reach the structure stated in ``SPECS`` below.

The expected counts in ``SPECS`` come from reading the timm sources
(``timm/models/{resnet,efficientformer,levit,metaformer}.py``, ``timm/layers/{layer_scale,mlp,
norm}.py``), not from repfx's output; each per-model comment says where each number comes from
and why anything that stays is allowed to stay.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field

import pytest
import timm
import torch
from helpers import fold_recording_error
from timm.layers import LayerScale, LayerScale2d
from timm.models import metaformer
from timm_weights import redraw_foldable_parameters_
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repfx.ir.graph import ConstantFolder
from repfx.ir.op_kinds import OP_KINDS, op_counts, op_kind
from repfx.testing import assert_close

torch.set_num_threads(1)

TOP_LEVEL = "(top level)"  # origin of an op traced in the model's own forward


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Spec:
    name: str
    image_size: int  # the smallest convenient size the model accepts
    batch: int
    batch_norms: int  # BatchNorm modules in the model (any _BatchNorm subclass)
    batch_norms_left: int  # of those, how many have no neighbour to fold into
    scales: int  # LayerScale / LayerScale2d / metaformer Scale modules
    scales_left: str  # regex over the module paths of the scales that must stay ("" = none)
    scales_left_count: int  # how many paths that regex names, stated independently
    ops_after: dict[str, int]  # repfx.ir.op_kinds.op_counts of the folded graph (missing kinds: 0)
    affines_left: dict[str, int] = field(default_factory=dict)  # remaining channel_affine ops,
    # by the type of the innermost module whose forward they come from


SPECS = [
    # resnet50 (resnet.py): Bottleneck depths (3, 4, 6, 3) = 16 blocks.
    # BN: stem bn1 + 3 per Bottleneck (bn1..bn3, each right after conv1..conv3) + 1 in each of
    # the 4 downsample_conv shortcuts (conv → BN) = 1 + 48 + 4 = 53, every one directly after a
    # conv with a single user: all 53 fold. Convs: stem 1 + 48 + 4 = 53; fc: 1 linear. No scales.
    Spec(
        name="resnet50",
        image_size=64,
        batch=2,
        batch_norms=53,
        batch_norms_left=0,
        scales=0,
        scales_left="",
        scales_left_count=0,
        ops_after={"conv": 53, "linear": 1},
    ),
    # efficientformer_l1 (efficientformer.py): depths (3, 2, 6, 4), num_vit=1, so the last stage
    # is 3 MetaBlock2d, Flat, 1 MetaBlock1d: 14 MetaBlock2d + 1 MetaBlock1d.
    # BN: Stem4 conv1→norm1, conv2→norm2 (2); Downsample conv→norm in stages 1-3 (3);
    # ConvMlpWithNorm fc1→norm1, fc2→norm2 (Dropout between is eval no-op) in each MetaBlock2d
    # (28): 33, all right after a conv → 0 left.
    # Scales: ls1, ls2 per block = 30 (28 LayerScale2d, 2 LayerScale).
    #   MetaBlock2d.ls2 follows mlp.norm2 (after fc2): folds.   MetaBlock1d.ls1 follows
    #   Attention.proj (Linear), ls2 follows Mlp.fc2 (Linear): fold.
    #   MetaBlock2d.ls1 scales the Pooling mixer `pool(x) - x` (a difference of a pooled and an
    #   un-pooled tensor, consumed by the residual add): no conv / linear / norm neighbour → 14
    #   must stay.
    # Another channel affine stays: Attention `(q @ k^T) * self.scale` (a scalar after a
    #   matmul, before `+ attention_biases`). The head's `(head(x) + head_dist(x)) / 2` is two
    #   linears of one input summed: merge_branches makes them one linear, the `/ 2` folds in.
    # Convs: stem 2 + downsample 3 + fc1/fc2 × 14 = 33. Linears: qkv, proj, fc1, fc2 + one
    # merged head = 5. LayerNorms: MetaBlock1d norm1, norm2 + final norm = 3.
    Spec(
        name="efficientformer_l1",
        image_size=224,  # Attention's bias table is fixed to 7x7 tokens (224 / 32)
        batch=1,
        batch_norms=33,
        batch_norms_left=0,
        scales=30,
        # the 14 MetaBlock2d ls1; stages.3.blocks.3 is Flat and stages.3.blocks.4 the MetaBlock1d
        scales_left=r"stages\.[0-2]\.blocks\.\d\.ls1|stages\.3\.blocks\.[0-2]\.ls1",
        scales_left_count=14,
        ops_after={"conv": 33, "linear": 5, "layer_norm": 3, "channel_affine": 15},
        affines_left={"LayerScale2d": 14, "Attention": 1},
    ),
    # levit_128 (levit.py, LevitDistilled): embed (128, 256, 384), depth (4, 4, 4), Stem16.
    # BN: Stem16 4 ConvNorm (conv → BatchNorm2d): 4.
    #   LinearNorm (Linear → BatchNorm1d over `x.flatten(0, 1)`, then `.reshape_as(x)`): per
    #   LevitBlock Attention.qkv, Attention.proj.ln, LevitMlp.ln1, ln2 = 4 → 12 blocks = 48;
    #   per LevitDownsample (stages 1, 2) AttentionDownsample.kv, .q.ln, .proj.ln + mlp.ln1,
    #   ln2 = 5 → 10. 58 in all. flatten(0, 1) keeps the channel (last) axis and `reshape_as(x)`
    #   only reads x's shape, which scaling the linear's output does not change: each BN folds
    #   into its Linear (timm's own LinearNorm.fuse() does exactly this).
    #   NormLinear head / head_dist: BatchNorm1d → Dropout (eval no-op) → Linear, with the BN
    #   reading the pooled (B, C) tokens: folds into the Linear after it (no padding): 2.
    #   64 in all, 0 left.
    # Channel affines that stay: `q @ k * self.scale` in 12 Attention + 2 AttentionDownsample
    # (a scalar after a matmul, before `+ attention_biases`). The head's
    # `(head(x) + head_dist(x)) / 2` becomes one linear (merge_branches; `/ 2` folds in).
    # Convs: 4. Linears: 58 + 1 = 59.
    Spec(
        name="levit_128",
        image_size=224,  # the attention bias tables are fixed to 14x14 tokens (224 / 16)
        batch=1,
        batch_norms=64,
        batch_norms_left=0,
        scales=0,
        scales_left="",
        scales_left_count=0,
        ops_after={"conv": 4, "linear": 59, "channel_affine": 14},
        affines_left={"Attention": 12, "AttentionDownsample": 2},
    ),
    # poolformerv2_s12 (metaformer.py): depths (2, 2, 6, 2), Pooling mixer, GroupNorm1NoBias
    # block norms, StarReLU Mlp (1x1 convs, NCHW), layer_scale_init_values=None (layer_scale*
    # are Identity), res_scale_init_values=(None, None, 1.0, 1.0): res_scale1/2 exist in the 6 +
    # 2 blocks of stages 2, 3 → 16 Scale modules. No BN.
    #   res_scale{1,2} multiply the residual stream x, which also feeds norm1 / norm2 (2 users)
    #   and whose consumer is the residual add: no foldable neighbour → all 16 stay.
    #   StarReLU `scale * relu(x)**2 + bias` (scalar affine) in each Mlp is followed by fc2, a
    #   1x1 conv without padding: all 12 fold (as one composed affine) into fc2's input.
    # Convs: stem 1 + downsample 3 + fc1/fc2 × 12 = 28; head fc Linear 1. GroupNorms 2 × 12 =
    # 24. LayerNorms: stem.norm, 3 downsample norms (LayerNorm2dNoBias), head.norm = 5.
    Spec(
        name="poolformerv2_s12",
        image_size=64,
        batch=2,
        batch_norms=0,
        batch_norms_left=0,
        scales=16,
        scales_left=r"stages\.[23]\.blocks\.\d+\.res_scale[12]",
        scales_left_count=16,
        ops_after={
            "conv": 28,
            "linear": 1,
            "group_norm": 24,
            "layer_norm": 5,
            "channel_affine": 16,
        },
        affines_left={"Scale": 16},
    ),
    # convformer_s18 (metaformer.py): depths (3, 3, 9, 3), SepConv mixer, LayerNorm2dNoBias
    # (permute → layer_norm → permute), NCHW blocks, MlpHead. No BN, no layer scale; res_scale
    # in the 9 + 3 blocks of stages 2, 3 → 24 Scale, all stay (residual stream, as above).
    #   StarReLU in each block's Mlp is followed by a 1x1 conv (fc2): 18 fold.
    #   StarReLU act1 in each SepConv is followed by the 7x7 depthwise conv with padding 3: its
    #   shift `+ bias` before a zero-padded conv is not exact, so 18 stay (one composed affine
    #   each).
    # Convs: stem 1 + downsample 3 + (pwconv1, dwconv, pwconv2, fc1, fc2) × 18 = 94. Linears:
    # MlpHead fc1, fc2 = 2. LayerNorms: stem 1 + downsample 3 + 2 × 18 + head.norm +
    # MlpHead.norm = 42.
    Spec(
        name="convformer_s18",
        image_size=64,
        batch=2,
        batch_norms=0,
        batch_norms_left=0,
        scales=24,
        scales_left=r"stages\.[23]\.blocks\.\d+\.res_scale[12]",
        scales_left_count=24,
        ops_after={"conv": 94, "linear": 2, "layer_norm": 42, "channel_affine": 42},
        affines_left={"Scale": 24, "StarReLU": 18},
    ),
    # caformer_s18 (metaformer.py): as convformer_s18, but stages 2, 3 use Attention, so their
    # 12 blocks run channels-last (B, N, C): LayerNormNoBias, Linear Mlp, Scale over the last
    # dim. No BN; res_scale in stages 2, 3 → 24 Scale, all stay (residual stream).
    #   StarReLU in each Mlp → fc2: the 6 1x1 convs of stages 0, 1 take it; the 12 bias-free
    #   Linears of stages 2, 3 do not (its shift would give them a bias): 12 stay.
    #   StarReLU act1 in the 6 SepConv blocks → zero-padded 7x7 dwconv: 6 stay.
    #   Attention uses F.scaled_dot_product_attention when timm's fused attention is on (no
    #   scalar multiply in the graph); otherwise `(q @ k^T) * self.scale` stays in each of 12.
    # Convs: 1 + 3 + 5 × 6 = 34. Linears: (qkv, proj, fc1, fc2) × 12 + MlpHead 2 = 50.
    # LayerNorms: 42 (as convformer_s18).
    Spec(
        name="caformer_s18",
        image_size=64,
        batch=2,
        batch_norms=0,
        batch_norms_left=0,
        scales=24,
        scales_left=r"stages\.[23]\.blocks\.\d+\.res_scale[12]",
        scales_left_count=24,
        ops_after={"conv": 34, "linear": 50, "layer_norm": 42, "channel_affine": 42},
        affines_left={"Scale": 24, "StarReLU": 18},
    ),
]


def _unfused_attention(model: nn.Module) -> int:
    """metaformer Attention modules that spell out ``(q @ k^T) * scale`` (timm config)."""
    return sum(isinstance(m, metaformer.Attention) and not m.fused_attn for m in model.modules())


# --------------------------------------------------------------------------- helpers


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and every GraphModule nested in it (repfx folds inside untraceable leaves)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def all_op_counts(gm: fx.GraphModule) -> Counter[str]:
    total: Counter[str] = Counter()
    for sub in graph_modules(gm):
        total += op_counts(sub)
    return total


def _origin(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return TOP_LEVEL
    module_type = next(reversed(stack.values()))[1]
    return getattr(module_type, "__name__", str(module_type))


def channel_affine_origins(gm: fx.GraphModule) -> Counter[str]:
    """Remaining per-channel affine ops, by the type of the module whose forward made them."""
    origins: Counter[str] = Counter()
    for sub in graph_modules(gm):
        consts = ConstantFolder(sub)
        for node in sub.graph.nodes:
            if op_kind(sub, node, consts) == "channel_affine":
                origins[_origin(node)] += 1
    return origins


def batch_norm_modules(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def scale_modules(module: nn.Module) -> dict[str, nn.Parameter]:
    """LayerScale-type modules by path, with their scale parameter."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (LayerScale, LayerScale2d)):
            out[name] = m.gamma
        elif isinstance(m, metaformer.Scale):
            out[name] = m.scale
    return out


@dataclass
class Folding:
    spec: Spec
    model: nn.Module
    x: torch.Tensor
    state_before: dict[str, torch.Tensor]
    expected: torch.Tensor
    actual: torch.Tensor | None
    folded: fx.GraphModule | None  # verified fold, or the unverified one if verification failed
    error: BaseException | None


# The fast loop folds one MetaFormer; the others run in the full suite (pytest --full).
FAST = {"poolformerv2_s12"}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(s, id=s.name, marks=() if s.name in FAST else pytest.mark.slow) for s in SPECS
    ],
)
def folding(request: pytest.FixtureRequest) -> Folding:
    spec: Spec = request.param
    torch.manual_seed(0)
    model = timm.create_model(spec.name, pretrained=False).eval()
    redraw_foldable_parameters_(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=gen)
    state_before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    # Errors are recorded, not raised here, so that each test fails (rather than errors) with
    # what it checks; test_fold_is_exact_and_leaves_model_unchanged reports the error itself.
    folded, actual, error = fold_recording_error(model, x)
    return Folding(spec, model, x, state_before, expected, actual, folded, error)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in _named_tensors(module)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _require_fold(f: Folding) -> fx.GraphModule:
    assert f.folded is not None, f"repfx.fold raised {type(f.error).__name__}: {f.error}"
    return f.folded


# --------------------------------------------------------------------------- tests


def test_spec_matches_timm_architecture(folding: Folding) -> None:
    """The counts stated in SPECS describe the timm model as built (guards the reading)."""
    spec, model = folding.spec, folding.model
    assert len(batch_norm_modules(model)) == spec.batch_norms
    scales = scale_modules(model)
    assert len(scales) == spec.scales
    pattern = re.compile(spec.scales_left) if spec.scales_left else None
    named = [p for p in scales if pattern is not None and pattern.fullmatch(p)]
    assert len(named) == spec.scales_left_count
    # The re-draw took: no scale or BN left at its init value (1, 1e-5, identity stats).
    for path, p in scales.items():
        assert p.std() > 0.1, f"{path} was not re-drawn"
    for path in batch_norm_modules(model):
        bn = model.get_submodule(path)
        assert bn.running_mean.abs().max() > 0.1, f"{path} running stats were not re-drawn"


def test_fold_is_exact_and_leaves_model_unchanged(folding: Folding) -> None:
    if folding.error is not None:
        raise AssertionError(f"repfx.fold raised {type(folding.error).__name__}") from folding.error
    folded = _require_fold(folding)
    assert isinstance(folded, fx.GraphModule)
    assert_close(folding.actual, folding.expected)
    report = folded.meta["repfx_report"]
    assert report.verification is not None and report.verification.passed
    state_after = folding.model.state_dict()
    assert state_after.keys() == folding.state_before.keys()
    for key, before in folding.state_before.items():
        assert torch.equal(state_after[key], before), f"fold changed the model's {key}"
    # The model still computes what it computed before the fold.
    with torch.no_grad():
        assert torch.equal(folding.model(folding.x), folding.expected)
    # ... and shares no storage with the folded module, so that updating one in place can
    # never corrupt the other.
    model_storages = {_storage(t) for t in _tensors(folding.model) if t.numel()}
    shared = [n for n, t in _named_tensors(folded) if t.numel() and _storage(t) in model_storages]
    assert not shared, f"folded tensors alias the model's: {shared[:6]}"


def test_batch_norms_fold(folding: Folding) -> None:
    folded, spec = _require_fold(folding), folding.spec
    left = batch_norm_modules(folded)
    assert len(left) == spec.batch_norms_left, (
        f"{len(left)} of {spec.batch_norms} BatchNorms left, expected {spec.batch_norms_left}: "
        f"{left[:6]}{' …' if len(left) > 6 else ''}\n"
        + folded.meta["repfx_report"].explain()[:2000]
    )
    assert all_op_counts(folded)["batch_norm"] == spec.batch_norms_left


def test_layer_scales_fold(folding: Folding) -> None:
    """The scales that stay are exactly those SPECS names; every other scale is gone."""
    folded, spec = _require_fold(folding), folding.spec
    original = scale_modules(folding.model)
    params = dict(folded.named_parameters())
    left = sorted(
        path for path, p in original.items() if any(k.startswith(f"{path}.") for k in params)
    )
    pattern = re.compile(spec.scales_left) if spec.scales_left else None
    must_stay = sorted(p for p in original if pattern is not None and pattern.fullmatch(p))
    assert left == must_stay
    assert len(left) == spec.scales_left_count


def test_op_counts_after_fold(folding: Folding) -> None:
    folded, spec = _require_fold(folding), folding.spec
    expected = {kind: spec.ops_after.get(kind, 0) for kind in OP_KINDS}
    affines_left = Counter(spec.affines_left)
    unfused = _unfused_attention(folding.model)
    expected["channel_affine"] += unfused
    affines_left["Attention"] += unfused
    counts = all_op_counts(folded)
    assert {kind: counts.get(kind, 0) for kind in OP_KINDS} == expected, folded.meta[
        "repfx_report"
    ].explain()[:2000]
    assert channel_affine_origins(folded) == +affines_left
