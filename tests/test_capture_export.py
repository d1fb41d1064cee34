"""The torch.export front end: models torch.fx cannot trace at the top fold all the same, the
folded module keeps the caller's convention and dynamic batch, and a model no front end
captures runs as it is with its children folded."""

import copy
import io

import pytest
import torch
from grammar import randomise_
from helpers import batch_norms, fresh_input, stored_multiplies
from torch import nn

import repfx
from repfx.testing import assert_close


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class ShapeChecked(nn.Module):
    """``forward(x, *args)`` with a shape assertion: both stop torch.fx."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))

    def forward(self, x, *args):
        assert x.shape[1] == 3, "expects RGB"
        return self.body(x)


class ListOfImages(nn.Module):
    """A detector-style forward over a list of images (torch.fx cannot iterate a proxy)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.heads = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)])

    def forward(self, images):
        x = self.stem(torch.stack([im * 2.0 for im in images]))
        return {f"head{i}": head(x) for i, head in enumerate(self.heads)}


class LastBlockNormsTokens(nn.Module):
    """mmpretrain EfficientFormer's construct: the last block turns the map into tokens, and
    the forward branches on ``x.dim()`` to pick the norm."""

    def __init__(self):
        super().__init__()
        self.network = nn.ModuleList([conv_bn(3, 8), conv_bn(8, 8), nn.Flatten(2)])
        self.scale = nn.Parameter(torch.randn(8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        for idx, block in enumerate(self.network):
            x = block(x)
            if idx == len(self.network) - 1 and x.dim() == 3:
                x = self.norm(x.transpose(1, 2) * self.scale)
        return x


class DataDependentTop(nn.Module):
    """Keeps detections above a threshold: no front end captures the top-level forward."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        scores = self.score(self.backbone(x)).flatten(1)
        if bool((scores > 0).any()):
            return scores[scores > 0]
        return scores.new_zeros(0)


class TokenModel(nn.Module):
    """A language model's shape: token ids and a mask in, positions from the ids' length, a
    norm before the head; the check of the length stops torch.fx."""

    def __init__(self, vocab: int = 16, width: int = 8, longest: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(longest, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids, mask):
        if ids.shape[1] > len(self.positions):
            raise ValueError("a sequence longer than the positions")
        x = self.embed(ids) + self.positions[: ids.shape[1]]
        return self.head(self.norm(x * mask.unsqueeze(-1)))


def _randomized(model: nn.Module) -> nn.Module:
    return randomise_(model, torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize("model_class", [ShapeChecked, LastBlockNormsTokens])
def test_a_forward_fx_cannot_trace_is_captured_by_export(model_class):
    model, x = _randomized(model_class()), torch.randn(2, 3, 8, 8)
    folded = repfx.fold(model, x)
    report = folded.meta[repfx.REPORT_KEY]
    assert any("captured with torch.export" in note for note in report.notes)
    assert batch_norms(folded) == 0
    for batch in (3, 5):  # the batch stays dynamic
        fresh = fresh_input(batch, *x.shape[1:])
        torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


def test_a_list_of_images_in_a_dict_out():
    model = _randomized(ListOfImages())
    images = [torch.randn(3, 8, 8) for _ in range(2)]
    folded = repfx.fold(model, (images,))
    assert batch_norms(folded) == 0
    fresh = [torch.randn(3, 8, 8) for _ in range(2)]  # (the list's length is captured)
    expected, actual = model(fresh), folded(fresh)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)


def test_export_on_request_folds_what_fx_folds():
    model = _randomized(nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.Conv2d(8, 8, 1)))
    x = torch.randn(2, 3, 8, 8)
    by_fx = repfx.fold(model, x, capture="fx").meta[repfx.REPORT_KEY]
    by_export = repfx.fold(model, x, capture="export").meta[repfx.REPORT_KEY]
    assert by_fx.after.ops == by_export.after.ops
    assert by_fx.counts() == by_export.counts()


def test_export_needs_example_inputs_and_capture_is_checked():
    with pytest.raises(repfx.ExampleInputError, match="needs example inputs"):
        repfx.fold(ShapeChecked().eval(), capture="export")
    with pytest.raises(ValueError, match="capture must be one of"):
        repfx.fold(ShapeChecked().eval(), torch.randn(1, 3, 4, 4), capture="dynamo")


def test_a_forward_fx_cannot_trace_without_inputs_says_what_to_pass():
    with pytest.raises(repfx.CaptureError, match="pass example inputs"):
        repfx.fold(ShapeChecked().eval())


def test_no_front_end_at_the_top_folds_the_children_on_their_recorded_inputs():
    model, x = _randomized(DataDependentTop()), torch.randn(2, 3, 8, 8)
    folded = repfx.fold(model, x)
    report = folded.meta[repfx.REPORT_KEY]
    assert "neither front end" in report.opaque_modules["forward"]
    assert batch_norms(folded) == 0
    fresh = fresh_input(3, *x.shape[1:])
    torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = conv_bn(3, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, *args):
        return self.head(self.block(x))


def test_a_hooked_submodule_keeps_its_hook_running():
    model = _randomized(Hooked())
    seen = []
    model.head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    folded = repfx.fold(model, torch.randn(2, 3, 8, 8))
    seen.clear()
    folded(torch.randn(3, 3, 8, 8))
    assert seen == [torch.Size([3, 4, 8, 8])]


def test_fold_inside_a_wrapper_does_not_mutate_the_model():
    model, x = _randomized(DataDependentTop()), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repfx.fold(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_exported_program_folds_to_an_exported_program(tmp_path):
    model = _randomized(nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    folded = repfx.fold(program)
    assert isinstance(folded, torch.export.ExportedProgram)
    assert folded.graph_module.meta[repfx.REPORT_KEY].counts() == {"fold_bn": 2}
    targets = {n.target for n in folded.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in str(t) for t in targets)
    torch.export.save(folded, tmp_path / "folded.pt2")
    loaded = torch.export.load(tmp_path / "folded.pt2").module()
    fresh = fresh_input(3, 3, 8, 8)
    torch.testing.assert_close(loaded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


class OptionalMask(nn.Module):
    """``forward(x, mask=None)`` (timm hiera, naflexvit): the example inputs leave the mask out."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, 8)

    def forward(self, x, mask=None):
        y = self.body(x)
        if mask is not None:
            y = y * mask
        return y


def test_arguments_left_at_their_defaults_are_specialised_to_them():
    model, x = _randomized(OptionalMask()), torch.randn(2, 3, 8, 8)
    folded = repfx.fold(model, x)
    assert batch_norms(folded) == 0
    fresh = fresh_input(3, 3, 8, 8)
    torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    with pytest.raises(repfx.GuardError, match=r"^mask was captured at its default \(None\)"):
        folded(fresh, torch.ones(1))


def _folded_program() -> tuple[nn.Module, torch.export.ExportedProgram]:
    model = _randomized(nn.Sequential(conv_bn(3, 8), nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    return model, repfx.fold(program)


def test_the_onnx_exporter_takes_a_folded_program(tmp_path):
    import onnxruntime as ort

    model, folded = _folded_program()
    torch.onnx.export(folded, dynamo=True).save(str(tmp_path / "folded.onnx"))
    session = ort.InferenceSession(
        str(tmp_path / "folded.onnx"), providers=["CPUExecutionProvider"]
    )
    fresh = fresh_input(3, 3, 8, 8)
    (actual,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), model(fresh), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aot_inductor_compiles_a_folded_program(tmp_path):
    model, folded = _folded_program()
    package = torch._inductor.aoti_compile_and_package(folded, package_path=str(tmp_path / "f.pt2"))
    fresh = fresh_input(3, 3, 8, 8)
    actual = torch._inductor.aoti_load_package(package)(fresh)
    torch.testing.assert_close(actual, model(fresh), rtol=1e-5, atol=1e-5)


def test_an_example_batch_of_one_leaves_the_batch_dynamic():
    model = _randomized(ShapeChecked())
    folded = repfx.fold(model, torch.randn(1, 3, 8, 8))
    report = folded.meta[repfx.REPORT_KEY]
    assert any("captured with torch.export" in note for note in report.notes)
    assert any("any batch size" in note for note in report.notes)
    for batch in (1, 3):
        fresh = fresh_input(batch, 3, 8, 8)
        torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


def test_token_ids_and_masks_take_any_length():
    """Every dimension of an integer or boolean input stays symbolic: a language model folded
    on one sequence length runs on any other (and any batch)."""
    model = _randomized(TokenModel())
    ids = torch.randint(0, 16, (1, 5), generator=torch.Generator().manual_seed(1))
    folded = repfx.fold(model, (ids, torch.ones(1, 5, dtype=torch.bool)))
    notes = folded.meta[repfx.REPORT_KEY].notes
    assert any(
        "any batch size and any size of ids (dimension 1), mask (dimension 1)" in n for n in notes
    ), notes
    generator = torch.Generator().manual_seed(2)
    for batch, length in ((3, 9), (2, 1), (1, 32)):
        fresh = (
            torch.randint(0, 16, (batch, length), generator=generator),
            torch.rand(batch, length, generator=generator) > 0.3,
        )
        with torch.no_grad():
            torch.testing.assert_close(folded(*fresh), model(*fresh), rtol=1e-5, atol=1e-5)


def test_a_fold_export_captured_switches_mode_saves_and_loads_with_its_checks(tmp_path):
    """``eval()`` and ``train()`` work as on any module (torch.export's own module refuses
    both), and ``torch.save`` / ``torch.load`` keep the calling convention and the checks."""
    model = _randomized(ShapeChecked())
    folded = repfx.fold(model, torch.randn(1, 3, 8, 8))
    assert folded.eval() is folded and not folded.training
    torch.save(folded.train().eval(), tmp_path / "folded.pt")
    for _ in range(2):  # (torch.fx's own checks broke a second load)
        loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
        fresh = fresh_input(3, 3, 8, 8)
        torch.testing.assert_close(loaded(fresh), model(fresh), rtol=1e-5, atol=1e-5)
        with pytest.raises(repfx.GuardError, match=r"x\.size\(\)\[2\] == 8"):
            loaded(torch.randn(2, 3, 9, 8))


def test_a_size_export_fixed_fails_with_a_repfx_error_naming_the_input():
    folded = repfx.fold(_randomized(ShapeChecked()), torch.randn(2, 3, 8, 8))
    with pytest.raises(repfx.GuardError, match=r"x\.size\(\)\[2\] == 8.*example inputs"):
        folded(torch.randn(2, 3, 9, 8))


class InPlaceResidual(nn.Module):
    """``out += identity`` after conv-BN (a ResNet block as HF transformers writes it), then an
    in-place multiply of a tensor that a second name still refers to (both read the new
    value)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x, *args):
        identity = self.stem(x)
        out = self.bn(self.conv(identity))
        out += identity
        late = self.bn2(self.conv2(out))
        kept = late
        late.mul_(2.0)  # ``kept`` is the same tensor: both read the doubled value
        return out.relu() + kept


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_an_in_place_residual_add_folds_like_an_out_of_place_one(capture):
    model = _randomized(InPlaceResidual())
    folded = repfx.fold(model, torch.randn(1, 3, 8, 8), capture=capture)
    assert batch_norms(folded) == 0
    fresh = fresh_input(3, 3, 8, 8)
    torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


class LinearBnOverTokens(nn.Module):
    """LeViT's linear + BatchNorm1d over the flattened tokens, back with ``reshape_as``."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.linear, self.bn = nn.Linear(c, c), nn.BatchNorm1d(c)

    def forward(self, x, *args):
        h = self.linear(x)
        return self.bn(h.flatten(0, 1)).reshape_as(h)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_shape_read_through_reshape_as_does_not_count_as_a_user(capture):
    model = _randomized(LinearBnOverTokens())
    folded = repfx.fold(model, torch.randn(2, 5, 6), capture=capture)
    assert batch_norms(folded) == 0
    fresh = torch.randn(3, 5, 6)
    torch.testing.assert_close(folded(fresh), model(fresh), rtol=1e-5, atol=1e-5)


class ScaledThenCropped(nn.Module):
    """A decoder's end: the last norm's scale, the positions the head reads (``h[:, -1:]``
    when generating, ``h[:, 0:]`` for all of them), the head. Under torch.export the crop is
    ``aten.slice.Tensor``."""

    def __init__(self, index: tuple, c: int = 6, c_out: int = 6):
        super().__init__()
        self.g = nn.Parameter(torch.ones(c))
        self.head = nn.Linear(c_out, 4, bias=False)
        self.index = index

    def forward(self, x):
        return self.head((self.g * x)[self.index])


TOKEN_CROPS = {
    "last": (slice(None), slice(-1, None)),
    "all": (slice(None), slice(0, None)),
    "every_other": (slice(None), slice(None, None, 2)),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("crop", TOKEN_CROPS)
def test_a_scale_moves_into_the_head_through_a_crop_of_the_tokens(capture, crop):
    model = _randomized(ScaledThenCropped(TOKEN_CROPS[crop]))
    folded = repfx.fold(model, torch.randn(2, 5, 6), capture=capture)
    fresh = fresh_input(3, 5, 6, seed=2)
    assert stored_multiplies(folded, fresh) == []
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_scale_stays_before_a_crop_of_the_channels(capture):
    model = _randomized(ScaledThenCropped((Ellipsis, slice(1, 4)), c_out=3))
    folded = repfx.fold(model, torch.randn(2, 5, 6), capture=capture)
    fresh = fresh_input(3, 5, 6, seed=2)
    assert stored_multiplies(folded, fresh) == ["g"]
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))


class ScaledByAnArgument(nn.Module):
    """``forward(x, scale, flip=False)``: a Python number and a flag next to the tensor; the
    ``x.dim()`` branch keeps torch.fx out, so torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, scale, flip=False):
        if x.dim() != 4:
            raise ValueError("a batch of images")
        y = self.bn(self.conv(x)) * scale
        return -y if flip else y


@pytest.mark.parametrize("scale, other", [(2.0, 3.0), (2, -1)])
def test_a_number_export_fixed_is_named_in_the_report_and_guarded(scale, other):
    model = _randomized(ScaledByAnArgument())
    x = fresh_input(2, 3, 8, 8)
    folded = repfx.fold(model, (x, scale))
    with torch.no_grad():
        assert_close(folded(x, scale), model(x, scale))
    assert any(f"scale = {scale!r}" in n for n in folded.meta[repfx.REPORT_KEY].notes)
    with pytest.raises(repfx.GuardError, match=f"scale == {scale}"):
        folded(x, other)


def test_an_argument_the_example_left_at_its_default_is_a_guard_error_when_passed():
    model = _randomized(ScaledByAnArgument())
    x = fresh_input(2, 3, 8, 8)
    folded = repfx.fold(model, (x, 2.0))
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for module in (folded, copy.deepcopy(folded), loaded):  # (both used to drop the check)
        with pytest.raises(repfx.GuardError, match="in the form of the example inputs"):
            module(x, 2.0, True)
