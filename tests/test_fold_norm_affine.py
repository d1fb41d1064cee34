"""Norm affines into the linears that read them: ``fold_norm_affine=True`` for LayerNorm's own
γ, β (timm ViT), and, by default, an RMSNorm written as ``weight * normalised`` (Llama / Hugging
Face style) into the q, k, v and gate / up projections that all read it."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import fold_matches, fresh_input, stored_multiplies
from torch import nn

import repfx
from repfx.ir.graph import ConstantFolder, where
from repfx.ir.ops import norm_op
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.testing import assert_close


def _norm_affines(gm: torch.fx.GraphModule) -> dict[str, bool]:
    """Each norm of ``gm`` (module or function call), by location: does it keep γ or β?"""
    consts = ConstantFolder(gm)
    views = (norm_op(gm, n, consts) for n in gm.graph.nodes)
    return {
        where(v.node): v.weight is not None or v.bias is not None for v in views if v is not None
    }


@pytest.mark.slow
def test_vit_block_norms_become_affine_free_and_the_fold_is_exact():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    redraw_foldable_parameters_(model)
    x, fresh = fresh_input(2, 3, 64, 64), fresh_input(3, 3, 64, 64, seed=2)
    folded = repfx.fold(model, (x,), fold_norm_affine=True)
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))
    keeps_affine = _norm_affines(folded)
    blocks = [kept for at, kept in keeps_affine.items() if at.startswith("blocks.")]
    assert len(blocks) == 24 and not any(blocks)  # norm1 → qkv, norm2 → fc1 in 12 blocks
    # the final norm feeds the class-token select, not a linear: it keeps its affine
    kept_at = [at for at, kept in keeps_affine.items() if kept]
    assert len(kept_at) == 1 and kept_at[0].startswith("norm:")
    default = repfx.fold(model, (x,))
    assert all(_norm_affines(default).values())


class ThreeReaders(nn.Module):
    """One LayerNorm read by three linears, one of them bias-free, as q, k, v are."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        n = self.norm(x)
        return self.q(n) * self.k(n) + self.v(n)


def test_a_norm_read_by_several_linears_gives_each_its_affine():
    model = ThreeReaders().eval()
    redraw_foldable_parameters_(model)
    folded = repfx.fold(model, (fresh_input(2, 5, 8),), fold_norm_affine=True)
    with torch.no_grad():
        assert_close(folded(fresh_input(3, 7, 8, seed=2)), model(fresh_input(3, 7, 8, seed=2)))
    assert folded.norm.weight is None and folded.norm.bias is None
    assert folded.v.bias is not None  # β moved into it, as asked


class ReaderThatIsNotLinear(ThreeReaders):
    def forward(self, x):
        n = self.norm(x)
        return self.q(n) + torch.tanh(n)


def test_a_norm_with_a_reader_that_cannot_take_its_affine_keeps_it():
    model = ReaderThatIsNotLinear().eval()
    redraw_foldable_parameters_(model)
    folded = repfx.fold(model, (fresh_input(2, 5, 8),), fold_norm_affine=True)
    assert folded.norm.weight is not None
    skipped = [s.reason for s in folded.meta["repfx_report"].skipped]
    assert any("is not a conv or linear" in r for r in skipped if "tanh" in r)


class RMSNorm(nn.Module):
    """As Llama's reference code and Hugging Face write it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 24):
        super().__init__()
        self.heads = heads
        self.input_norm, self.post_attention_norm = RMSNorm(dim), RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def _heads(self, t):
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        n = self.input_norm(x)
        q, k, v = self._heads(self.q(n)), self._heads(self.k(n)), self._heads(self.v(n))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.o(a.transpose(1, 2).reshape(x.shape))
        n = self.post_attention_norm(h)
        return h + self.down(F.silu(self.gate(n)) * self.up(n))


@pytest.mark.parametrize("fold_norm_affine", [False, True])
def test_llama_rms_norm_weights_go_into_the_projections_that_read_them(fold_norm_affine):
    model = LlamaBlock().eval()
    redraw_foldable_parameters_(model)
    x, fresh = fresh_input(2, 5, 16), fresh_input(1, 9, 16, seed=2)
    folded = repfx.fold(model, (x,), fold_norm_affine=fold_norm_affine)
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))
    assert stored_multiplies(folded, fresh) == []
    assert all(m.bias is None for m in folded.modules() if isinstance(m, nn.Linear))


def test_the_norm_affine_fold_is_made_only_on_request():
    model = ThreeReaders().eval()
    redraw_foldable_parameters_(model)
    folded = fold_matches(model, fresh_input(2, 5, 8), fresh_input(3, 7, 8, seed=2))
    assert folded.norm.weight is not None and folded.v.bias is None
