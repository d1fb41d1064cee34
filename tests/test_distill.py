"""The RIFormer training recipe: each loss against a direct computation of the paper's formula,
gradient isolation, teacher initialisation and hook hygiene."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repfx.models import create
from repfx.models.metaformer import Affine, Pooling
from repfx.recipes.riformer import (
    FeatureCapture,
    LossWeights,
    RIFormerDistiller,
    block_output_loss,
    hard_distillation_loss,
    init_student_from_teacher,
    metaformer_block_paths,
    mixer_output_loss,
    relation_loss,
    soft_distillation_loss,
)

torch.set_num_threads(1)
DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DTYPE)


# --------------------------------------------------------------------------- direct formulas


def _direct_sq_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """α1 ‖a − b‖²_F with α1 = 1/(N·C·H·W), by explicit loops."""
    n, c, h, w = a.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            for y in range(h):
                for x in range(w):
                    total += (a[i, j, y, x].item() - b[i, j, y, x].item()) ** 2
    return total / (n * c * h * w)


def _direct_affine(u: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Student mixer as a module: A(u) − u = s ⊙ u + t − u (per channel)."""
    out = torch.empty_like(u)
    for c in range(u.shape[1]):
        out[:, c] = s[c] * u[:, c] + t[c] - u[:, c]
    return out


def _direct_pool_mixer(u: torch.Tensor) -> torch.Tensor:
    """Teacher mixer: avg over the in-bounds 3×3 neighbourhood minus the centre."""
    h, w = u.shape[-2:]
    out = torch.empty_like(u)
    for y in range(h):
        for x in range(w):
            ys = range(max(0, y - 1), min(h, y + 2))
            xs = range(max(0, x - 1), min(w, x + 2))
            acc = sum(u[:, :, yy, xx] for yy in ys for xx in xs)
            out[:, :, y, x] = acc / (len(ys) * len(xs)) - u[:, :, y, x]
    return out


def _direct_relation(t: torch.Tensor) -> torch.Tensor:
    """R(T) = T̃T̃ᵀ over the H·W tokens, each token's C-vector L2-normalised: (N, HW, HW)."""
    n, c, h, w = t.shape
    tok = t.reshape(n, c, h * w)
    r = torch.empty(n, h * w, h * w, dtype=t.dtype)
    for b in range(n):
        for i in range(h * w):
            for j in range(h * w):
                dot = sum(tok[b, k, i] * tok[b, k, j] for k in range(c))
                ni = math.sqrt(sum(tok[b, k, i].item() ** 2 for k in range(c)))
                nj = math.sqrt(sum(tok[b, k, j].item() ** 2 for k in range(c)))
                r[b, i, j] = dot / (ni * nj)
    return r


def _direct_rel_loss(ts: torch.Tensor, tt: torch.Tensor) -> float:
    """α2 ‖R(T^s) − R(T^t)‖²_F with α2 = 1/(N·H²·W²)."""
    n, _, h, w = ts.shape
    diff = _direct_relation(ts) - _direct_relation(tt)
    return float((diff**2).sum()) / (n * h * h * w * w)


def _direct_kl(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> float:
    """τ² · (1/N) Σ_n Σ_k p_t log(p_t / p_s), softmax written out."""
    total = 0.0
    for n in range(zs.shape[0]):
        es = [math.exp(v / tau) for v in zs[n].tolist()]
        et = [math.exp(v / tau) for v in zt[n].tolist()]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    return tau * tau * total / zs.shape[0]


def _direct_ce(z: torch.Tensor, target: list[int]) -> float:
    total = 0.0
    for n, k in enumerate(target):
        row = z[n].tolist()
        total += -(row[k] - math.log(sum(math.exp(v) for v in row)))
    return total / len(target)


# --------------------------------------------------------------------------- each loss


def test_block_output_loss_is_alpha1_frobenius():
    a, b = _rand(2, 3, 2, 3, seed=1), _rand(2, 3, 2, 3, seed=2)
    assert block_output_loss(a, b).item() == pytest.approx(_direct_sq_mean(a, b), rel=1e-12)


def test_mixer_output_loss_matches_affine_vs_pooling_formula():
    us, ut = _rand(2, 3, 4, 5, seed=3), _rand(2, 3, 4, 5, seed=4)
    affine = Affine(3).to(DTYPE)
    with torch.no_grad():
        affine.affine.weight.copy_(_rand(3, 1, 1, 1, seed=5))
        affine.affine.bias.copy_(_rand(3, seed=6))
    s, t = affine.affine.weight.detach().reshape(3), affine.affine.bias.detach()
    expected = _direct_sq_mean(_direct_affine(us, s, t), _direct_pool_mixer(ut))
    got = mixer_output_loss(affine(us), Pooling()(ut)).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_relation_loss_is_alpha2_over_token_token_matrix():
    ts, tt = _rand(2, 3, 2, 3, seed=7), _rand(2, 3, 2, 3, seed=8)
    assert relation_loss(ts, tt).item() == pytest.approx(_direct_rel_loss(ts, tt), rel=1e-10)


def test_relation_loss_ignores_per_token_scale():
    ts = _rand(2, 4, 3, 3, seed=9)
    scale = torch.rand(2, 1, 3, 3, generator=_gen(10), dtype=DTYPE) + 0.5
    assert relation_loss(ts * scale, ts).item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_is_tempered_kl(tau):
    zs, zt = _rand(4, 5, seed=11), _rand(4, 5, seed=12)
    got = soft_distillation_loss(zs, zt, temperature=tau).item()
    assert got == pytest.approx(_direct_kl(zs, zt, tau), rel=1e-10)


def test_hard_distillation_uses_teacher_argmax_and_optional_labels():
    zs, zt = _rand(4, 5, seed=13), _rand(4, 5, seed=14)
    teacher_top = [int(max(range(5), key=lambda k, r=row: r[k])) for row in zt.tolist()]
    assert hard_distillation_loss(zs, zt).item() == pytest.approx(
        _direct_ce(zs, teacher_top), rel=1e-10
    )
    labels = [0, 1, 2, 3]
    expected = 0.5 * _direct_ce(zs, teacher_top) + 0.5 * _direct_ce(zs, labels)
    got = hard_distillation_loss(zs, zt, torch.tensor(labels)).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_loss_weights_are_lambda_b_products():
    assert LossWeights().lambdas(8) == (1e-4 / 8, 1e-3 / 8, 1.0 / 8)
    assert LossWeights(3e-4, 5e-3, 4.0).lambdas(4) == (3e-4 / 4, 5e-3 / 4, 4.0 / 4)


# --------------------------------------------------------------------------- the distiller


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = create("riformer_tiny", num_classes=3, layer_scale_init_value=0.5).double()
    teacher = create("poolformer_tiny", num_classes=3, layer_scale_init_value=0.5).double()
    return student, teacher


def _block_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each block's input and output, recorded with hooks written here (not the library's)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in metaformer_block_paths(model):
        block = model.get_submodule(name)

        def hook(_m, args, out, name=name):
            seen[name] = (args[0].detach(), out.detach())

        handles.append(block.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("out_input", ["own", "teacher"])
def test_distiller_total_matches_direct_formula(out_input):
    student, teacher = _pair()
    init_student_from_teacher(student, teacher)
    x = _rand(2, 3, 64, 64, seed=15)
    distiller = RIFormerDistiller(student, teacher, temperature=2.0, out_input=out_input)
    out = distiller(x)

    s_io, t_io = _block_io(student, x), _block_io(teacher, x)
    exp_in = exp_out = exp_rel = 0.0
    for sp, tp in zip(s_io, t_io, strict=True):
        (s_x, s_y), (t_x, t_y) = s_io[sp], t_io[tp]
        sb, tb = student.get_submodule(sp), teacher.get_submodule(tp)
        u_s, u_t = sb.norm1(s_x).detach(), tb.norm1(t_x).detach()
        s_aff = sb.token_mixer.affine
        s, t = s_aff.weight.detach().reshape(-1), s_aff.bias.detach()
        student_in = u_s if out_input == "own" else u_t
        exp_out += _direct_sq_mean(_direct_affine(student_in, s, t), _direct_pool_mixer(u_t))
        d = s_y - t_y
        exp_in += float((d**2).sum()) / d.numel()
        n, c, h, w = s_y.shape
        if h * w <= 16:  # loops stay small; larger maps checked with einsum
            exp_rel += _direct_rel_loss(s_y, t_y)
        else:
            ns = s_y.reshape(n, c, h * w) / s_y.reshape(n, c, h * w).norm(dim=1, keepdim=True)
            nt = t_y.reshape(n, c, h * w) / t_y.reshape(n, c, h * w).norm(dim=1, keepdim=True)
            rs, rt = torch.einsum("nci,ncj->nij", ns, ns), torch.einsum("nci,ncj->nij", nt, nt)
            exp_rel += float(((rs - rt) ** 2).sum()) / (n * h * h * w * w)
    with torch.no_grad():
        exp_kd = _direct_kl(student(x), teacher(x), 2.0)

    assert out.terms["out"].item() == pytest.approx(exp_out, rel=1e-9)
    assert out.terms["in"].item() == pytest.approx(exp_in, rel=1e-9)
    assert out.terms["rel"].item() == pytest.approx(exp_rel, rel=1e-9)
    assert out.terms["kd"].item() == pytest.approx(exp_kd, rel=1e-9)
    total = exp_kd + (1e-4 * exp_in + 1e-3 * exp_out + 1.0 * exp_rel) / 2
    assert out.loss.item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("kd", ["soft", "hard"])
@pytest.mark.parametrize("out_input", ["own", "teacher"])
def test_gradients_reach_student_only(kd, out_input):
    student, teacher = _pair(1)
    init_student_from_teacher(student, teacher)
    distiller = RIFormerDistiller(student, teacher, kd=kd, out_input=out_input)
    distiller(_rand(2, 3, 32, 32, seed=16)).loss.backward()
    for name, p in teacher.named_parameters():
        assert p.grad is None, name
    missing = [n for n, p in student.named_parameters() if p.grad is None]
    assert not missing
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())
    mixer_grads = [p.grad for n, p in student.named_parameters() if ".token_mixer." in n]
    assert mixer_grads and all(g.abs().sum() > 0 for g in mixer_grads)


def test_imitation_term_alone_only_trains_the_mixer_with_teacher_input():
    student, teacher = _pair(2)
    distiller = RIFormerDistiller(
        student, teacher, weights=LossWeights(0.0, 1.0, 0.0, kd=0.0), out_input="teacher"
    )
    distiller(_rand(2, 3, 32, 32, seed=17)).loss.backward()
    for name, p in student.named_parameters():
        trained = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert trained == (".token_mixer." in name), name


# --------------------------------------------------------------------------- teacher init


def test_teacher_init_copies_everything_but_the_token_mixer():
    student, teacher = _pair(3)
    s_keys, t_keys = student.state_dict().keys(), teacher.state_dict().keys()
    expected = {k for k in s_keys if ".token_mixer." not in k}
    assert expected <= set(t_keys)
    mixer_before = {k: v.clone() for k, v in student.state_dict().items() if k not in expected}
    assert mixer_before  # the affine mixers

    report = init_student_from_teacher(student, teacher)

    assert set(report.copied) == expected
    assert set(report.left) == set(s_keys) - expected
    assert report.unused == [k for k in t_keys if k not in expected]
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for k in expected:
        assert torch.equal(s_state[k], t_state[k]), k
    for k, v in mixer_before.items():
        assert torch.equal(s_state[k], v), k


def test_teacher_init_skips_shape_mismatches():
    student = create("riformer_tiny", num_classes=3)
    teacher = create("poolformer_tiny", num_classes=5)
    report = init_student_from_teacher(student, teacher)
    assert {"head.weight", "head.bias"} <= set(report.left)
    assert {"head.weight", "head.bias"} <= set(report.unused)


# --------------------------------------------------------------------------- hooks


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_records_features_and_removes_hooks():
    student, _ = _pair(4)
    paths = metaformer_block_paths(student)
    assert paths == ["network.0.0", "network.2.0", "network.4.0", "network.6.0"]
    x = _rand(2, 3, 32, 32, seed=18)
    with FeatureCapture(student, paths) as cap:
        assert _hook_count(student) == 3 * len(paths)
        student(x)
    assert _hook_count(student) == 0
    io = _block_io(student, x)
    for p, f in cap.features.items():
        block = student.get_submodule(p)
        block_in, block_out = io[p]
        torch.testing.assert_close(f.mixer_in, block.norm1(block_in), rtol=0, atol=0)
        torch.testing.assert_close(f.mixer_out, block.token_mixer(f.mixer_in), rtol=0, atol=0)
        torch.testing.assert_close(f.block_out, block_out, rtol=0, atol=0)


def test_hooks_removed_on_error_and_after_distiller():
    student, teacher = _pair(5)
    with (
        pytest.raises(RuntimeError, match="boom"),
        FeatureCapture(student, metaformer_block_paths(student)),
    ):
        raise RuntimeError("boom")
    assert _hook_count(student) == 0
    RIFormerDistiller(student, teacher)(_rand(1, 3, 32, 32, seed=19))
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0
    with (
        pytest.raises(ValueError, match="no token mixer"),
        FeatureCapture(student, ["network.0.0", "network.1"]),
    ):
        pass
    assert _hook_count(student) == 0
