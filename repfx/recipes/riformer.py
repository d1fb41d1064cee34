"""RIFormer training recipe: module imitation and label-free distillation (building blocks).

The paper (Wang et al., CVPR 2023, Sec. 3-4, Table 10) trains the token-mixer-free student with a
teacher of the same macro structure (PoolFormer of the same size) and four terms::

    L = L_soft + λ1·L'_in + λ2·L_out + λ3·L_rel

with ``T_m`` the input of block ``m``, ``N`` the block's first norm, ``A`` the student's affine
token mixer and ``M`` the teacher's token mixer, summed over the mapped blocks ``m``::

    L'_in = α1 ‖T^s_{m+1} − T^t_{m+1}‖²_F                 (block outputs)
    L_out = α1 ‖A(N(T^s_m)) − M(N(T^t_m))‖²_F             (module imitation)
    L_rel = α2 ‖R(T^s_{m+1}) − R(T^t_{m+1})‖²_F,  R(T) = T̃ T̃ᵀ

    α1 = 1 / (N·C·H·W)        α2 = 1 / (N·H²·W²)

Conventions (the paper leaves them implicit; these are the choices made here):

* ``A(·)`` and ``M(·)`` are the token-mixer *modules* as the models implement them
  (:class:`~repfx.models.metaformer.Affine` returns ``s⊙u + t − u``,
  :class:`~repfx.models.metaformer.Pooling` returns ``pool(u) − u``), so both sides carry the
  same ``−u`` term; the captured "mixer output" is exactly what the block adds (before LayerScale).
* ``L_out`` is module imitation by default: the student's mixer runs on the teacher's
  (detached) normalised input ``N(T^t_m)``, so both mixers see the *same* tensor and the term
  trains only the mixer's own parameters (``out_input="teacher"``). ``out_input="own"`` is
  the formula exactly as written above: the student's mixer on the *student's* ``N(T^s_m)``.
  With the student initialised from the teacher the two coincide for the first block at
  step 0.
* ``R``: a block output ``(N, C, H, W)`` is read as ``N`` sets of ``H·W`` tokens of ``C``
  features, ``T → (N, H·W, C)``; ``T̃`` is ``T`` L2-normalised along the last dim ``C`` (each
  token a unit vector), so ``R(T) = T̃ T̃ᵀ`` is ``(N, H·W, H·W)`` (token-token cosine similarity)
  and ``α2 = 1 / (N·H²·W²)`` is one over its number of entries. Token tensors ``(N, L, C)`` are
  used as they are.
* The ``α`` normalisers make each term a mean; each term is summed over the mapped blocks.
* ``L_soft = τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` averaged over the batch (label-free).
  The hard-label option (``kd="hard"``) is DeiT's hard distillation: cross-entropy against the
  teacher's argmax, averaged 50/50 with the ground-truth cross-entropy when labels are given.
* Table 10 gives the weights as products ``λ·B`` with the batch size ``B`` (S12: ``λ1·B = 1e-4``,
  ``λ2·B = 1e-3``, ``λ3·B = 1.0``); :class:`LossWeights` stores those products and divides by the
  batch size of each call.

Gradients reach the student only: the teacher runs under ``torch.no_grad()`` and its features
are detached. Hooks live only inside :class:`FeatureCapture`'s ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.metaformer import MetaFormerBlock

__all__ = [
    "BlockFeatures",
    "BlockPair",
    "DistillOutput",
    "FeatureCapture",
    "InitReport",
    "LossWeights",
    "RIFormerDistiller",
    "block_output_loss",
    "hard_distillation_loss",
    "init_student_from_teacher",
    "metaformer_block_paths",
    "metaformer_mapping",
    "mixer_output_loss",
    "relation_loss",
    "relation_matrix",
    "soft_distillation_loss",
]


# --------------------------------------------------------------------------- feature capture


@dataclass(frozen=True)
class BlockFeatures:
    """What one block computed: the token mixer's input ``N(T_m)`` and output, the block output."""

    mixer_in: Tensor
    mixer_out: Tensor
    block_out: Tensor

    def detach(self) -> BlockFeatures:
        return BlockFeatures(
            self.mixer_in.detach(), self.mixer_out.detach(), self.block_out.detach()
        )


def metaformer_block_paths(model: nn.Module) -> list[str]:
    """Paths of every :class:`MetaFormerBlock` in ``model``, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, MetaFormerBlock)]


class FeatureCapture:
    """Context manager recording :class:`BlockFeatures` for the given block paths.

    ``with FeatureCapture(model, paths) as cap: model(x)`` then ``cap.features[path]``. Each block
    needs a token-mixer submodule named ``mixer_attr``; its input (the normalised block input) and
    output are recorded by hooks on it, the block output by a hook on the block. If a block runs
    more than once the last call wins. Every hook is removed on exit, also on error.
    """

    def __init__(
        self, model: nn.Module, block_paths: Iterable[str], mixer_attr: str = "token_mixer"
    ) -> None:
        self.model = model
        self.block_paths = list(block_paths)
        self.mixer_attr = mixer_attr
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._raw: dict[str, dict[str, Tensor]] = {}

    def __enter__(self) -> FeatureCapture:
        self._raw = {p: {} for p in self.block_paths}
        try:
            for path in self.block_paths:
                block = self.model.get_submodule(path)
                mixer = getattr(block, self.mixer_attr, None)
                if not isinstance(mixer, nn.Module):
                    raise ValueError(
                        f"block {path!r} has no token mixer module {self.mixer_attr!r}"
                    )
                slot = self._raw[path]
                self._handles += [
                    mixer.register_forward_pre_hook(_store_input(slot, "mixer_in")),
                    mixer.register_forward_hook(_store_output(slot, "mixer_out")),
                    block.register_forward_hook(_store_output(slot, "block_out")),
                ]
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def features(self) -> dict[str, BlockFeatures]:
        """Recorded features per block path (raises if a block did not run)."""
        out = {}
        for path, slot in self._raw.items():
            missing = {"mixer_in", "mixer_out", "block_out"} - slot.keys()
            if missing:
                raise RuntimeError(f"block {path!r} did not record {sorted(missing)}")
            out[path] = BlockFeatures(slot["mixer_in"], slot["mixer_out"], slot["block_out"])
        return out


def _store_input(slot: dict[str, Tensor], key: str):
    def hook(module: nn.Module, args: tuple[object, ...]) -> None:
        slot[key] = args[0]  # type: ignore[assignment]

    return hook


def _store_output(slot: dict[str, Tensor], key: str):
    def hook(module: nn.Module, args: tuple[object, ...], output: Tensor) -> None:
        slot[key] = output

    return hook


@dataclass(frozen=True)
class BlockPair:
    """A student block matched with a teacher block (paths and token-mixer attribute names)."""

    student: str
    teacher: str
    student_mixer: str = "token_mixer"
    teacher_mixer: str = "token_mixer"


def metaformer_mapping(student: nn.Module, teacher: nn.Module) -> list[BlockPair]:
    """Pair the MetaFormer blocks of two models of the same layout, in order."""
    s_paths, t_paths = metaformer_block_paths(student), metaformer_block_paths(teacher)
    if len(s_paths) != len(t_paths) or not s_paths:
        raise ValueError(
            f"student has {len(s_paths)} MetaFormer blocks, teacher {len(t_paths)}: "
            "pass an explicit mapping"
        )
    return [BlockPair(s, t) for s, t in zip(s_paths, t_paths, strict=True)]


def _capture_all(model: nn.Module, paths: Sequence[str], mixers: Sequence[str]):
    """Nest one :class:`FeatureCapture` per distinct mixer attribute name."""
    from contextlib import ExitStack

    stack = ExitStack()
    caps = []
    for attr in dict.fromkeys(mixers):
        sel = [p for p, m in zip(paths, mixers, strict=True) if m == attr]
        caps.append(stack.enter_context(FeatureCapture(model, sel, attr)))
    return stack, caps


# --------------------------------------------------------------------------- losses


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student shape {tuple(a.shape)} != teacher {tuple(b.shape)}")


def block_output_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """``L'_in = α1 ‖T^s_{m+1} − T^t_{m+1}‖²_F``, ``α1 = 1/(N·C·H·W)`` (one block)."""
    _check_same_shape(student_out, teacher_out, "L'_in")
    return (student_out - teacher_out.detach()).pow(2).sum() / student_out.numel()


def mixer_output_loss(student_mixer_out: Tensor, teacher_mixer_out: Tensor) -> Tensor:
    """``L_out = α1 ‖A(N(T^s_m)) − M(N(T^t_m))‖²_F``, ``α1 = 1/(N·C·H·W)`` (one block)."""
    _check_same_shape(student_mixer_out, teacher_mixer_out, "L_out")
    diff = student_mixer_out - teacher_mixer_out.detach()
    return diff.pow(2).sum() / student_mixer_out.numel()


def _tokens(t: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, H·W, C)``; ``(N, L, C)`` unchanged."""
    if t.dim() == 4:
        return t.flatten(2).transpose(1, 2)
    if t.dim() == 3:
        return t
    raise ValueError(f"relation matrix needs (N, C, H, W) or (N, L, C), got {tuple(t.shape)}")


def relation_matrix(t: Tensor, eps: float = 1e-12) -> Tensor:
    """``R(T) = T̃ T̃ᵀ``: ``(N, H·W, H·W)`` cosine similarities between the tokens of ``T``."""
    tok = F.normalize(_tokens(t), dim=-1, eps=eps)
    return tok @ tok.transpose(1, 2)


def relation_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """``L_rel = α2 ‖R(T^s) − R(T^t)‖²_F``, ``α2 = 1/(N·H²·W²)`` (one block)."""
    _check_same_shape(student_out, teacher_out, "L_rel")
    r_s = relation_matrix(student_out)
    r_t = relation_matrix(teacher_out.detach())
    return (r_s - r_t).pow(2).sum() / r_s.numel()


def soft_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Label-free KD: ``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, mean over the batch."""
    tau = float(temperature)
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * tau * tau


def hard_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None
) -> Tensor:
    """DeiT hard distillation: CE against the teacher's argmax (50/50 with CE(labels) if given)."""
    loss = F.cross_entropy(student_logits, teacher_logits.detach().argmax(dim=-1))
    if labels is None:
        return loss
    return 0.5 * loss + 0.5 * F.cross_entropy(student_logits, labels)


@dataclass(frozen=True)
class LossWeights:
    """``λ·B`` products (Table 10); the λ used for a batch of size ``B`` is ``product / B``.

    Defaults are the paper's S12 settings; S24 is ``LossWeights(3e-4, 5e-3, 4.0)``. A zero
    weight skips the term entirely (it is then neither computed nor reported).
    """

    in_b: float = 1e-4
    out_b: float = 1e-3
    rel_b: float = 1.0
    kd: float = 1.0

    def lambdas(self, batch_size: int) -> tuple[float, float, float]:
        """``(λ1, λ2, λ3)`` for a batch of ``batch_size`` samples."""
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        return self.in_b / batch_size, self.out_b / batch_size, self.rel_b / batch_size


@dataclass
class DistillOutput:
    """The total loss, each unweighted term (summed over blocks), and both models' logits."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None


class RIFormerDistiller:
    """Computes ``L = L_kd + λ1·L'_in + λ2·L_out + λ3·L_rel`` for one batch.

    ``distiller(images)`` runs the teacher (eval mode, ``no_grad``) and the student with their
    blocks captured and returns a :class:`DistillOutput`; call ``.loss.backward()`` and step an
    optimizer over the student's parameters. ``mapping`` defaults to
    :func:`metaformer_mapping`. ``kd`` is ``"soft"`` (label-free KL, the paper's choice),
    ``"hard"`` (DeiT hard distillation) or ``"none"``. ``out_input`` selects ``L_out``'s student
    input: ``"teacher"`` (the same normalised input as the teacher's mixer; the default) or
    ``"own"`` (the student's own; see the module docstring). The teacher is switched to eval
    mode here.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        mapping: Sequence[BlockPair] | None = None,
        weights: LossWeights | None = None,
        temperature: float = 1.0,
        kd: Literal["soft", "hard", "none"] = "soft",
        out_input: Literal["own", "teacher"] = "teacher",
    ) -> None:
        if kd not in ("soft", "hard", "none"):
            raise ValueError(f"kd must be 'soft', 'hard' or 'none', got {kd!r}")
        if out_input not in ("own", "teacher"):
            raise ValueError(f"out_input must be 'own' or 'teacher', got {out_input!r}")
        self.student = student
        self.teacher = teacher.eval()
        self.mapping = list(metaformer_mapping(student, teacher) if mapping is None else mapping)
        self.weights = LossWeights() if weights is None else weights
        self.temperature = temperature
        self.kd = kd
        self.out_input = out_input

    def features(
        self, images: Tensor
    ) -> tuple[Tensor, Tensor, list[BlockFeatures], list[BlockFeatures]]:
        """Student logits, teacher logits, and the student's / teacher's per-block features."""
        s_feats, s_logits = _run_captured(
            self.student,
            images,
            [p.student for p in self.mapping],
            [p.student_mixer for p in self.mapping],
        )
        with torch.no_grad():
            t_feats, t_logits = _run_captured(
                self.teacher,
                images,
                [p.teacher for p in self.mapping],
                [p.teacher_mixer for p in self.mapping],
            )
        return s_logits, t_logits.detach(), s_feats, [f.detach() for f in t_feats]

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> DistillOutput:
        s_logits, t_logits, s_feats, t_feats = self.features(images)
        w = self.weights
        lam_in, lam_out, lam_rel = w.lambdas(images.shape[0])
        terms: dict[str, Tensor] = {}
        if self.kd == "soft":
            terms["kd"] = soft_distillation_loss(s_logits, t_logits, self.temperature)
        elif self.kd == "hard":
            terms["kd"] = hard_distillation_loss(s_logits, t_logits, labels)
        if w.in_b:
            terms["in"] = _sum(
                block_output_loss(s.block_out, t.block_out)
                for s, t in zip(s_feats, t_feats, strict=True)
            )
        if w.out_b:
            terms["out"] = _sum(self._mixer_losses(s_feats, t_feats))
        if w.rel_b:
            terms["rel"] = _sum(
                relation_loss(s.block_out, t.block_out)
                for s, t in zip(s_feats, t_feats, strict=True)
            )
        scale = {"kd": w.kd, "in": lam_in, "out": lam_out, "rel": lam_rel}
        loss = _sum(scale[k] * v for k, v in terms.items()) if terms else s_logits.sum() * 0.0
        return DistillOutput(loss, terms, s_logits, t_logits)

    def _mixer_losses(
        self, s_feats: Sequence[BlockFeatures], t_feats: Sequence[BlockFeatures]
    ) -> Iterator[Tensor]:
        for pair, s, t in zip(self.mapping, s_feats, t_feats, strict=True):
            if self.out_input == "own":
                student_out = s.mixer_out
            else:  # the student's mixer on the teacher's normalised input (hooks are gone here)
                mixer = getattr(self.student.get_submodule(pair.student), pair.student_mixer)
                student_out = mixer(t.mixer_in)
            yield mixer_output_loss(student_out, t.mixer_out)


def _sum(values: Iterable[Tensor]) -> Tensor:
    total: Tensor | None = None
    for v in values:
        total = v if total is None else total + v
    if total is None:
        raise ValueError("no block to sum a loss over")
    return total


def _run_captured(
    model: nn.Module, images: Tensor, paths: Sequence[str], mixers: Sequence[str]
) -> tuple[list[BlockFeatures], Tensor]:
    stack, caps = _capture_all(model, paths, mixers)
    with stack:
        logits = model(images)
    merged: dict[str, BlockFeatures] = {}
    for cap in caps:
        merged.update(cap.features)
    return [merged[p] for p in paths], logits


# --------------------------------------------------------------------------- teacher init


@dataclass(frozen=True)
class InitReport:
    """Outcome of :func:`init_student_from_teacher` (all lists are state_dict keys)."""

    copied: list[str]
    left: list[str]  # student keys not overwritten (no teacher counterpart or other shape)
    unused: list[str]  # teacher keys without a same-shaped student counterpart

    def __str__(self) -> str:
        return (
            f"copied {len(self.copied)} tensors from the teacher; left {len(self.left)} "
            f"student tensors as they were: {', '.join(self.left) or '-'}"
        )


def init_student_from_teacher(
    student: nn.Module, teacher: nn.Module, key_map: dict[str, str] | None = None
) -> InitReport:
    """Copy, in place, each teacher tensor whose student counterpart has the same shape.

    Counterparts share the state_dict key (after ``key_map``, student key -> teacher key, for
    models whose names differ). For PoolFormer -> RIFormer this is everything but the student's
    token mixers (the pooling mixer has no parameters).
    """
    key_map = key_map or {}
    s_state = student.state_dict()
    t_state = teacher.state_dict()
    copied, left, used = [], [], set()
    with torch.no_grad():
        for key, dst in s_state.items():
            src = t_state.get(key_map.get(key, key))
            if src is None or src.shape != dst.shape:
                left.append(key)
                continue
            dst.copy_(src)
            copied.append(key)
            used.add(key_map.get(key, key))
    unused = [k for k in t_state if k not in used]
    return InitReport(copied, left, unused)
