"""The mutant catalogue for ``tools/mutants.py``: targeted mutants of repfx's fold logic.

Each :class:`Mutant` replaces one exact snippet of one file (the snippet must occur exactly once
in that file, or the mutant is *invalid*: the code moved on and the entry needs updating) and
names the test files most likely to kill it. ``tools/mutants.py`` runs those first and, if they
all pass, the whole fast suite before calling the mutant a survivor.

The first group reproduces the survivors of an earlier audit (``audit=True``); the rest are
boundary flips, removed guards, swapped operands, wrong axes and off-by-ones over the fold
arithmetic (``algebra``), the op views (``ops``), the graph queries (``graph``), the passes, the
commit point that proves each rewrite on probes (``validate``) and the final verification
(``verify``, ``tolerances``).

The last group, ``EQUIVALENT``, holds mutants that change the code but not what repfx computes
on any model it can fold (``equivalent`` says why). They stay in the catalogue, and in the
score, so that each such argument is re-checked by every run: if one of them is ever killed, the
argument no longer holds (the code around it changed) and the guard has become load-bearing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in ``file``
    replacement: str
    description: str
    tests: tuple[str, ...]  # targeted test files (or node ids), run first
    audit: bool = False  # a survivor of the earlier audit
    equivalent: str = ""  # why no test can kill it (an equivalent mutant), if it is one


ALGEBRA = "repfx/algebra"
OPS = "repfx/ir/ops"  # a module or a package: see tools/mutants.py, places()
GRAPH = "repfx/ir/graph"
VALIDATE = "repfx/proof/validate.py"
PROBE_SHAPES = "repfx/proof/probe_shapes.py"
SPECIAL_VALUES = "repfx/proof/special_values.py"
REGION = "repfx/proof/region.py"
VERIFY = "repfx/proof/verify.py"
TOLERANCES = "repfx/proof/tolerances.py"
ABSORB = "repfx/passes/_absorb.py"
PADDING = "repfx/passes/absorb_padding.py"
BASE = "repfx/passes/base.py"
MIXER = "repfx/passes/fold_affine_mixer.py"
BRANCHES = "repfx/passes/merge_branches.py"
SEQUENTIAL = "repfx/passes/merge_sequential.py"
COMMON = "repfx/passes/_common.py"
FOLD = "repfx/fold.py"

T_ALGEBRA = "tests/test_algebra.py"
T_BN = "tests/test_pass_fold_bn.py"
T_AFFINE = "tests/test_pass_fold_channel_affine.py"
T_MIXER = "tests/test_pass_fold_affine_mixer.py"
T_BRANCHES = "tests/test_pass_merge_branches.py"
T_SEQUENTIAL = "tests/test_pass_merge_sequential.py"
T_PADDING = "tests/test_pass_absorb_padding.py"
T_CLEANUP = "tests/test_pass_cleanup.py"
T_GUARDS = "tests/test_guards.py"
T_VIEWS = "tests/test_semantics_views.py"
T_CAPTURE = "tests/test_semantics_capture.py"
T_EXACT = "tests/test_exactness_passes.py"
T_COMMIT = "tests/test_commit_point.py"
T_VERIFY = "tests/test_verify.py"
T_REFERENCE = "tests/test_reference_blocks_fold.py"
K_PASSES = "tests/test_mutant_killers_passes.py"
K_VIEWS = "tests/test_mutant_killers_views.py"
K_COMMIT = "tests/test_mutant_killers_commit_point.py"
K_VERIFY = "tests/test_mutant_killers_verify.py"


def _m(name, file, original, replacement, description, *tests, audit=False, equivalent=""):
    return Mutant(name, file, original, replacement, description, tuple(tests), audit, equivalent)


AUDIT: tuple[Mutant, ...] = (
    _m(
        "branches-no-stride-check",
        BRANCHES,
        "        if k.stride != first.stride:\n"
        '            return Fail("branches have different strides")\n',
        "",
        "merge_branches: the stride-alignment check removed",
        T_BRANCHES,
        T_EXACT,
        K_PASSES,
        audit=True,
    ),
    _m(
        "branches-no-centre-check",
        BRANCHES,
        "        if k.centre_offset != first.centre_offset:\n"
        "            return Fail(\"branches' kernels are not centred on the same input"
        ' position")\n',
        "",
        "merge_branches: the centre-offset check removed",
        T_BRANCHES,
        T_EXACT,
        K_PASSES,
        audit=True,
    ),
    _m(
        "merged-padding-ignores-dilation",
        ALGEBRA,
        "int(o + d * (s - 1) / 2)",
        "int(o + (s - 1) / 2)",
        "algebra._common_geometry: merged-conv padding ignores the dilation",
        T_ALGEBRA,
        T_BRANCHES,
        T_EXACT,
        K_PASSES,
        audit=True,
    ),
    _m(
        "absorb-padding-ignores-pad-value",
        PADDING,
        "if found is None or _pad_value(node) != 0.0:",
        "if found is None:",
        "absorb_padding: F.pad's value ignored (a non-zero pad treated as zeros)",
        T_PADDING,
        T_EXACT,
        K_PASSES,
        audit=True,
    ),
    _m(
        "absorb-padding-strided-conv",
        PADDING,
        "        and is_pointwise(op)\n",
        "",
        "absorb_padding: a strided (or wider) conv accepted as pointwise",
        T_PADDING,
        T_EXACT,
        K_PASSES,
        audit=True,
    ),
    _m(
        "sequential-strided-first-conv",
        COMMON,
        "        and all(s == 1 for s in g.stride)\n        and (g.padding_mode",
        "        and (g.padding_mode",
        "merge_sequential: a strided first conv accepted as pointwise",
        T_SEQUENTIAL,
        T_BRANCHES,
        K_PASSES,
        audit=True,
    ),
    _m(
        "c-minus-x-read-as-x-minus-c",
        OPS,
        "return ChannelAffine(-alpha * one, vec) if const_first else",
        "return ChannelAffine(one, -alpha * vec) if const_first else",
        "ops._arith_affine: c − x read as x − c",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "zero-minus-x-is-a-no-op",
        OPS,
        "for _t in SUB:\n    _NOOP_SCALARS[_t] = (0.0, False)",
        "for _t in SUB:\n    _NOOP_SCALARS[_t] = (0.0, True)",
        "ops._identity_arith (cleanup's no-op view): 0 − x treated as x",
        T_VIEWS,
        T_CLEANUP,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "add-sub-alpha-ignored",
        OPS,
        '    alpha = node.kwargs.get("alpha", 1)\n    if type(alpha)',
        "    alpha = 1\n    if type(alpha)",
        "ops._affine_arith: alpha= of torch.add / torch.sub ignored",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "same-padding-not-zero-padding",
        OPS,
        '        if padding == "valid":\n            return False\n        dims',
        '        if padding in ("valid", "same"):\n            return False\n        dims',
        "ops._has_zero_padding: padding='same' not seen as zero padding",
        T_VIEWS,
        T_BN,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "functional-bn-training-ignored",
        OPS,
        '    training = _batch_norm_arg(node, "training")\n    if training is not False:',
        "    training = False\n    if training is not False:",
        "ops._batch_norm_function_reason: training-mode F.batch_norm treated as eval",
        T_VIEWS,
        T_GUARDS,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "functional-dropout-defaults-to-eval",
        OPS,
        '    F.dropout: ("training", 2, True),',
        '    F.dropout: ("training", 2, False),',
        "ops._DROPOUT_FUNCS: F.dropout without training= treated as eval",
        T_VIEWS,
        T_GUARDS,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "drop-path-rate-not-read",
        OPS,
        "return MISSING if attr is None else getattr(m, attr, None)",
        "return MISSING if attr is None else 0.0",
        "ops._drop_rate: DropPath's drop_prob not read (taken as 0)",
        T_VIEWS,
        T_GUARDS,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "has-hooks-ignores-pre-hooks",
        GRAPH,
        '        or getattr(module, "_forward_pre_hooks", None)\n',
        "",
        "graph.has_hooks: forward pre-hooks ignored",
        T_VIEWS,
        T_GUARDS,
        T_BRANCHES,
        K_VIEWS,
        audit=True,
    ),
    _m(
        "absorb-no-hook-guard-on-bn",
        ABSORB,
        '    if op.node.op == "call_module" and has_hooks(module_of(ctx.gm, op.node)):\n'
        '        return Fail(f"{describe(ctx, op.node)} has hooks")\n',
        "",
        "_absorb.unhooked: the hook guard on the affine (BN) module itself removed",
        T_GUARDS,
        T_BN,
        K_PASSES,
        audit=True,
    ),
    _m(
        "folded-module-always-training",
        FOLD,
        "    gm.training = model.training\n",
        "    gm.training = True\n",
        "fold: the folded module does not inherit the original's training flag (set to True; "
        "removing the line is equivalent: torch.fx.GraphModule copies its root's flag)",
        "tests/test_fold_properties.py",
        T_GUARDS,
        K_PASSES,
        audit=True,
    ),
    _m(
        "float32-tolerance-100x",
        TOLERANCES,
        "    torch.float32: 1e-5,\n    torch.float16: 5e-3,",
        "    torch.float32: 1e-3,\n    torch.float16: 5e-3,",
        "tolerances.RELATIVE_TOLERANCE: float32 loosened 100×",
        T_VERIFY,
        K_VERIFY,
        audit=True,
    ),
    _m(
        "max-errors-uses-mean",
        TOLERANCES,
        "abs_err = (a - e).abs()[finite].max().item()",
        "abs_err = (a - e).abs()[finite].mean().item()",
        "tolerances.tensor_error (max_errors, verify): the mean difference instead of the max",
        T_VERIFY,
        K_VERIFY,
        audit=True,
    ),
    _m(
        "low-precision-recheck-uses-folds-own-error",
        VERIFY,
        "rounding_criterion=rounding_criterion(original, self.expected[i].dtype),",
        "rounding_criterion=rounding_criterion(\n"
        "                _rel(self.actual[i], self.truth[i]), self.expected[i].dtype\n"
        "            ),",
        "verify: the low-precision re-check compares with the fold's own error, not the original's",
        T_VERIFY,
        K_VERIFY,
        audit=True,
    ),
    _m(
        "commit-tolerance-100x",
        VALIDATE,
        "    tol = rewrite_tolerance(dtype or torch.float64)\n",
        "    tol = 100 * rewrite_tolerance(dtype or torch.float64)\n",
        "validate._same_values: the commit point's tolerance loosened 100×",
        T_COMMIT,
        K_COMMIT,
        audit=True,
    ),
    _m(
        "commit-skips-nonfinite-check",
        VALIDATE,
        "    if not torch.equal(bad_want, bad_got):\n",
        "    if False:\n",
        "validate._same_values: the NaN / Inf position check skipped",
        T_COMMIT,
        K_COMMIT,
        audit=True,
    ),
    _m(
        "commit-one-probe-only",
        VALIDATE,
        "zip(probe_sizes(gm, region), PROBE_BATCHES, strict=False)",
        "zip(probe_sizes(gm, region)[:1], PROBE_BATCHES, strict=False)",
        "validate.prove_before: one probe only (one parity, batch 2)",
        T_COMMIT,
        K_COMMIT,
        audit=True,
    ),
    _m(
        "commit-probes-of-size-1",
        PROBE_SHAPES,
        "            out.append(sizes[k % len(sizes)])\n",
        "            out.append(1)\n",
        "validate._shrunk: recorded shapes shrunk to spatial size 1",
        T_COMMIT,
        K_COMMIT,
        audit=True,
    ),
    _m(
        "commit-probes-start-at-1",
        PROBE_SHAPES,
        "MIN_PROBE_EXTENT = 3  #",
        "MIN_PROBE_EXTENT = 1  #",
        "validate.probe_sizes: a pointwise region probed at spatial size 1 (a flip is not seen)",
        K_COMMIT,
    ),
    _m(
        "commit-guessed-probes-of-size-1",
        PROBE_SHAPES,
        "spatial = tuple(sizes[i % len(sizes)] for i in range(max(rank - 2, 0)))",
        "spatial = tuple(1 for i in range(max(rank - 2, 0)))",
        "validate.candidate_shapes: guessed shapes of spatial size 1",
        T_COMMIT,
        K_COMMIT,
        audit=True,
    ),
)


ALGEBRA_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "then-wrong-order",
        ALGEBRA,
        "return ChannelAffine(outer.scale * self.scale, outer.scale * self.shift + outer.shift)",
        "return ChannelAffine(outer.scale * self.scale, self.scale * outer.shift + self.shift)",
        "ChannelAffine.then: composition in the wrong order",
        T_ALGEBRA,
        T_AFFINE,
    ),
    _m(
        "plus-ignores-sign-on-shift",
        ALGEBRA,
        "self.shift + sign * other.shift)",
        "self.shift + other.shift)",
        "ChannelAffine.plus: the sign not applied to the shift",
        T_ALGEBRA,
        T_MIXER,
    ),
    _m(
        "bn-affine-ignores-eps",
        ALGEBRA,
        "inv_std = torch.rsqrt(_f64(running_var) + eps)",
        "inv_std = torch.rsqrt(_f64(running_var))",
        "batch_norm_affine: eps ignored",
        T_ALGEBRA,
        T_BN,
        K_PASSES,
    ),
    _m(
        "output-fold-bias-not-scaled",
        ALGEBRA,
        "    b = affine.shift.clone() if bias is None else "
        "affine.scale * _f64(bias) + affine.shift\n"
        "    return w.to(weight.dtype), b.to(weight.dtype)\n\n\ndef fold_affine_into_conv_t",
        "    b = affine.shift.clone() if bias is None else _f64(bias) + affine.shift\n"
        "    return w.to(weight.dtype), b.to(weight.dtype)\n\n\ndef fold_affine_into_conv_t",
        "fold_affine_into_conv_output: the old bias not scaled",
        T_ALGEBRA,
        T_BN,
    ),
    _m(
        "conv-transpose-group-order",
        ALGEBRA,
        "scale = affine.scale.reshape(groups, 1, out_per_group)  # [group, 1, j]",
        "scale = affine.scale.reshape(out_per_group, 1, groups).permute(2, 1, 0)",
        "fold_affine_into_conv_transpose_output: output channels read group-minor",
        T_ALGEBRA,
        T_BN,
        K_PASSES,
    ),
    _m(
        "input-fold-drops-shift-without-bias",
        ALGEBRA,
        "    if bias is None and not affine.has_shift():\n",
        "    if bias is None:\n",
        "fold_affine_into_conv_input: the shift dropped when the conv has no bias",
        T_ALGEBRA,
        T_BN,
        T_AFFINE,
    ),
    _m(
        "norm-fold-beta-not-scaled",
        ALGEBRA,
        "new_beta = affine.scale * beta + affine.shift",
        "new_beta = beta + affine.shift",
        "fold_affine_into_norm: β not scaled",
        T_ALGEBRA,
        T_AFFINE,
    ),
    _m(
        "centre-offset-ignores-dilation",
        ALGEBRA,
        "            p - d * (k - 1) / 2\n",
        "            p - (k - 1) / 2\n",
        "ConvKernel.centre_offset: dilation ignored",
        T_ALGEBRA,
        T_BRANCHES,
        T_EXACT,
    ),
    _m(
        "centre-pad-one-sided",
        ALGEBRA,
        "        pads += [(s - k) // 2, (s - k) // 2]\n",
        "        pads += [0, s - k]\n",
        "centre_pad: the kernel padded on one side (off-centre)",
        T_ALGEBRA,
        T_BRANCHES,
    ),
    _m(
        "undilate-size-off-by-one",
        ALGEBRA,
        "size = tuple(d * (k - 1) + 1 for d, k in zip(",
        "size = tuple(d * k for d, k in zip(",
        "undilate: the spread kernel one (dilation) tap too large",
        T_ALGEBRA,
        T_BRANCHES,
        T_EXACT,
    ),
    _m(
        "regroup-groups-interleaved",
        ALGEBRA,
        "        old_group = o // out_per_old\n",
        "        old_group = o % kernel.groups\n",
        "regroup: output channels read as interleaved over the groups, not group-major",
        T_ALGEBRA,
        T_BRANCHES,
        K_PASSES,
    ),
    _m(
        "aligned-keeps-dilation-when-uneven",
        ALGEBRA,
        "if len(wide_dilations) > 1 or (uneven and wide_dilations != {(1,) * len(size)}):",
        "if len(wide_dilations) > 1:",
        "_aligned: a common dilation kept for kernels whose sizes differ by an odd amount",
        T_ALGEBRA,
        T_BRANCHES,
        T_EXACT,
    ),
    _m(
        "common-dilation-counts-pointwise",
        ALGEBRA,
        "max(k.dilation[i] if k.kernel_size[i] > 1 else 1 for k in terms)",
        "max(k.dilation[i] for k in terms)",
        "_common_geometry: a 1-tap kernel's dilation counted",
        T_ALGEBRA,
        T_BRANCHES,
        K_PASSES,
    ),
    _m(
        "compose-padding-drops-first",
        ALGEBRA,
        "padding = tuple(p + q for p, q in zip(first.padding, second.padding, strict=True))",
        "padding = second.padding",
        "compose_pointwise_then_conv: the first conv's padding dropped",
        T_ALGEBRA,
        T_SEQUENTIAL,
    ),
    _m(
        "compose-ignores-first-bias",
        ALGEBRA,
        'bias = second.bias + torch.einsum("gomk,gm->go", w2, b1).reshape(out)',
        "bias = second.bias",
        "compose_pointwise_then_conv: the first conv's bias dropped",
        T_ALGEBRA,
        T_SEQUENTIAL,
    ),
    _m(
        "sum-kernels-bias-ignores-coefficient",
        ALGEBRA,
        "bias = sum(c * k.bias for c, k in zip(coefficients, kernels, strict=True))",
        "bias = sum(k.bias for c, k in zip(coefficients, kernels, strict=True))",
        "sum_kernels: the branch coefficient (± α) not applied to the bias",
        T_ALGEBRA,
        T_BRANCHES,
        T_VIEWS,
    ),
    _m(
        "affine-kernel-drops-shift",
        ALGEBRA,
        "return ConvKernel(weight, full.shift.clone(), ones, (0,) * spatial_dims, ones, channels)",
        "return ConvKernel(weight, 0 * full.shift, ones, (0,) * spatial_dims, ones, channels)",
        "affine_as_kernel: an affine branch's shift dropped",
        T_ALGEBRA,
        T_BRANCHES,
    ),
)


OPS_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "same-padding-asymmetric-accepted",
        OPS,
        "return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)",
        "return tuple(t // 2 for t in totals)",
        "_same_padding: an even kernel's asymmetric 'same' padding taken as symmetric",
        T_VIEWS,
        T_BRANCHES,
    ),
    _m(
        "tuple-padding-any-to-all",
        OPS,
        "    return any(p != 0 for p in padding)\n",
        "    return all(p != 0 for p in padding)\n",
        "has_zero_padding: padding (1, 0) seen as no padding",
        T_VIEWS,
        T_BN,
        K_VIEWS,
        K_PASSES,
    ),
    _m(
        "depthwise-1x1-stride-ignored",
        OPS,
        "        and all(s == 1 for s in m.stride)\n        and not has_zero_padding",
        "        and not has_zero_padding",
        "_is_depthwise_pointwise: a strided depthwise 1×1 conv seen as an affine",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
        K_PASSES,
    ),
    _m(
        "depthwise-1x1-groups-ignored",
        OPS,
        "        m.groups == m.in_channels == m.out_channels\n",
        "        m.in_channels == m.out_channels\n",
        "_is_depthwise_pointwise: a dense 1×1 conv seen as a per-channel affine",
        T_VIEWS,
        T_AFFINE,
        T_MIXER,
    ),
    _m(
        "bn2d-wrong-axis",
        OPS,
        "fixed = {nn.BatchNorm2d: -3, nn.BatchNorm3d: -4}",
        "fixed = {nn.BatchNorm2d: -2, nn.BatchNorm3d: -4}",
        "_batch_norm_axis: BatchNorm2d on the wrong axis",
        T_BN,
        T_VIEWS,
    ),
    _m(
        "functional-bn-axis-last",
        OPS,
        'return AffineOp(node, "batch_norm", x, affine, 1 - rank, tensors[1].dtype)',
        'return AffineOp(node, "batch_norm", x, affine, -1, tensors[1].dtype)',
        "_affine_batch_norm_function: functional BN acting on the last axis",
        T_VIEWS,
        T_BN,
    ),
    _m(
        "keeps-floating-dtype-always",
        OPS,
        "    return torch.promote_types(x_dtype, c.dtype) == x_dtype\n",
        "    return True\n",
        "_keeps_floating_dtype: a constant that promotes the tensor's dtype accepted",
        T_EXACT,
        T_VIEWS,
        K_PASSES,
    ),
    _m(
        "div-read-as-mul",
        OPS,
        "    return ChannelAffine(1.0 / vec, zero)\n",
        "    return ChannelAffine(vec, zero)\n",
        "_arith_affine: x / c read as x · c",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
    ),
    _m(
        "c-over-x-read-as-x-over-c",
        OPS,
        "    if const_first:\n        return None  # c / x is not affine\n",
        "",
        "_arith_affine: c / x read as x / c",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
    ),
    _m(
        "add-alpha-const-first-misread",
        OPS,
        "return ChannelAffine(alpha * one, vec) if const_first else",
        "return ChannelAffine(one, alpha * vec) if const_first else",
        "_arith_affine: torch.add(c, x, alpha=a) read as x + a·c",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
    ),
    _m(
        "addcmul-value-ignored",
        OPS,
        "affine = ChannelAffine(value * s_layout[0], t_layout[0] * torch.ones_like(s_layout[0]))",
        "affine = ChannelAffine(s_layout[0], t_layout[0] * torch.ones_like(s_layout[0]))",
        "_affine_addcmul: value= ignored",
        T_VIEWS,
        T_AFFINE,
        K_VIEWS,
    ),
    _m(
        "merge-axes-never-clash",
        OPS,
        "    if a is None or b is None or a == b:\n        return b if a is None else a\n"
        "    return AXES_CLASH\n",
        "    return b if a is None else a\n",
        "merge_axes: affines on different axes never clash",
        T_MIXER,
        T_AFFINE,
        T_BRANCHES,
    ),
    _m(
        "identity-module-ignores-hooks",
        OPS,
        '    if has_hooks(m):\n        return Fail(f"{type(m).__name__} has hooks")\n',
        "",
        "_identity_module: a hooked Identity / Dropout removed",
        T_VIEWS,
        T_CLEANUP,
        K_VIEWS,
        K_PASSES,
    ),
    _m(
        "dropout-rate-boundary",
        OPS,
        "and not (type(rate) in (int, float) and rate == 0)",
        "and not (type(rate) in (int, float) and rate <= 0.5)",
        "_identity_module: a training-mode dropout of rate ≤ 0.5 removed",
        T_GUARDS,
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "one-over-x-is-a-no-op",
        OPS,
        "for _t in DIV:\n    _NOOP_SCALARS[_t] = (1.0, False)",
        "for _t in DIV:\n    _NOOP_SCALARS[_t] = (1.0, True)",
        "_identity_arith: 1 / x treated as x",
        T_VIEWS,
        T_CLEANUP,
        K_VIEWS,
    ),
    _m(
        "noop-arith-ignores-dtype",
        OPS,
        "if isinstance(a, fx.Node) and _is_scalar(b, neutral) and is_floating(a):",
        "if isinstance(a, fx.Node) and _is_scalar(b, neutral):",
        "_identity_arith: x / 1 on a tensor of unknown (integer) dtype removed",
        T_CLEANUP,
        T_VIEWS,
    ),
    _m(
        "transpose-ignored-by-layout",
        OPS,
        "    return d1 if pos == d0 else d0 if pos == d1 else pos\n",
        "    return pos\n",
        "_source_position: a transpose seen as keeping every axis in place",
        T_AFFINE,
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "view-node-argument-taken-as-sizes",
        OPS,
        "        single_size = len(args) == 1 and _holds_sizes(args[0])\n",
        "        single_size = len(args) == 1\n",
        "_moves_data_only: x.view(node) taken as sizes when the node may be a dtype (bitcast)",
        T_VIEWS,
    ),
    _m(
        "avg-pool-exclude-pad-accepted",
        OPS,
        "if padding is None or (any(padding) and pool.count_include_pad is not True):",
        "if padding is None:",
        "avg_pool_op: an average pool that excludes padding seen as a conv",
        T_BRANCHES,
        T_VIEWS,
    ),
    _m(
        "avg-pool-divisor-override-accepted",
        OPS,
        "if pool.ceil_mode is not False or pool.divisor_override is not None or",
        "if pool.ceil_mode is not False or",
        "avg_pool_op: an average pool with divisor_override seen as the 1/k kernel",
        T_BRANCHES,
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "group-norm-axis-off-by-one",
        OPS,
        "        axis = None if rank is None else 1 - rank\n",
        "        axis = None if rank is None else -rank\n",
        "norm_op: GroupNorm's channel axis off by one",
        T_AFFINE,
        T_ALGEBRA,
        T_VIEWS,
    ),
)


GRAPH_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "has-hooks-ignores-forward-hooks",
        GRAPH,
        '        getattr(module, "_forward_hooks", None)\n        or ',
        "        ",
        "has_hooks: forward hooks ignored",
        T_VIEWS,
        T_GUARDS,
        T_BRANCHES,
    ),
    _m(
        "has-hooks-ignores-global-hooks",
        GRAPH,
        "        or global_forward_hooks()\n",
        "",
        "has_hooks: global module hooks ignored",
        T_VIEWS,
        T_GUARDS,
        T_CAPTURE,
    ),
    _m(
        "is-plain-ignores-instance-rebinding",
        GRAPH,
        "    return not any(callable(getattr(base, name, None)) for name in vars(module))\n",
        "    return True\n",
        "is_plain: an instance that rebinds a method (forward) still plain",
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "is-plain-accepts-descriptors",
        GRAPH,
        '    if hasattr(type(value), "__get__"):\n        return False  # a property',
        "    if False:\n        return False  # a property",
        "_inert_entry: a property (e.g. a weight property) seen as inert",
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "is-plain-accepts-mixins",
        GRAPH,
        "    if mro[mro.index(base) :] != base.__mro__:\n        return False",
        "    if False:\n        return False",
        "_class_is_plain: a mixin between the base and nn.Module accepted",
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "forward-override-inert",
        GRAPH,
        '        "_get_name",\n    }',
        '        "_get_name",\n        "forward",\n    }',
        "_INERT_OVERRIDES: a subclass overriding forward seen as plain",
        T_VIEWS,
        K_VIEWS,
    ),
    _m(
        "constant-folder-evaluates-random",
        GRAPH,
        "        if torch.Tag.nondeterministic_seeded in func.tags or func._schema.is_mutable:",
        "        if func._schema.is_mutable:",
        "_DeterministicOnly: random ops constant-folded",
        T_VIEWS,
    ),
    _m(
        "constant-folder-ignores-mutated",
        GRAPH,
        "    return bool(node.meta.get(MUTATED_KEY) or node.meta.get(HANDED_KEY))\n",
        "    return bool(node.meta.get(HANDED_KEY))\n",
        "ConstantFolder._evaluate: a value capture marked as written in place taken as constant",
        T_VIEWS,
        T_CAPTURE,
        T_COMMIT,
        K_VIEWS,
    ),
    _m(
        "user-functions-are-torch",
        GRAPH,
        '    return module.split(".")[0] in ("torch", "_operator", "operator")\n',
        "    return True\n",
        "is_torch_callable: any user function constant-folded",
        T_VIEWS,
        T_CAPTURE,
        K_VIEWS,
    ),
    _m(
        "get-attr-counted-once",
        GRAPH,
        "uses.add(value, max(1, len(consumers_through_constants(node, consts))))",
        "uses.add(value, 1)",
        "tensor_use_counts: a get_attr read by two ops counted once",
        T_GUARDS,
        T_VIEWS,
        K_PASSES,
    ),
    _m(
        "flatten-rank-off-by-one",
        GRAPH,
        "    return rank - (end - start) if start <= end else None\n",
        "    return rank - (end - start) + 1 if start <= end else None\n",
        "_flatten_rank: rank after flatten off by one",
        T_VIEWS,
        T_AFFINE,
    ),
)


PASS_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "shared-module-guard-2",
        BASE,
        "            if calls > 1:\n",
        "            if calls > 2:\n",
        "FoldContext.shared_reason: module use-count guard > 1 → > 2",
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "shared-tensor-guard-2",
        BASE,
        "            if self.tensor_uses[t] > 1:\n",
        "            if self.tensor_uses[t] > 2:\n",
        "FoldContext.shared_reason: tensor use-count guard > 1 → > 2",
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "shared-module-hooks-ignored",
        BASE,
        "            if has_hooks(module):\n",
        "            if False:\n",
        "FoldContext.shared_reason: hooks on the rewritten module ignored",
        T_GUARDS,
        T_BN,
        K_PASSES,
    ),
    _m(
        "absorb-fits-ignores-axis",
        ABSORB,
        "    if op.axis is not None and op.axis != axis:\n",
        "    if False:\n",
        "_absorb._fits: an affine on another axis folded into the channels",
        T_AFFINE,
        T_BN,
        K_PASSES,
    ),
    _m(
        "absorb-fits-ignores-dtype",
        ABSORB,
        "    if op.dtype is not None and op.dtype != dtype:\n",
        "    if False:\n",
        "_absorb._fits: affine constants of another dtype folded",
        T_EXACT,
        T_AFFINE,
        K_PASSES,
    ),
    _m(
        "consumer-shift-into-padded-conv",
        ABSORB,
        "    if lin.zero_padded and op.affine.has_shift():\n",
        "    if False:\n",
        "_absorb._consumer_plan: a shift folded into a zero-padded consumer",
        T_BN,
        T_AFFINE,
        T_GUARDS,
    ),
    _m(
        "consumer-conv-transpose-accepted",
        ABSORB,
        '    if lin.kind == "conv_transpose":\n'
        '        return Fail("consumer is a transposed conv (input-side fold not supported)")\n',
        "",
        "_absorb._consumer_plan: an input-side fold into a transposed conv",
        T_BN,
        K_PASSES,
    ),
    _m(
        "producer-with-two-users",
        ABSORB,
        "    if len(users := value_users(p)) != 1:\n",
        "    if len(users := value_users(p)) > 2:\n",
        "_absorb._producer_plan: a producer read by two ops rewritten",
        T_GUARDS,
        T_BN,
        K_PASSES,
    ),
    _m(
        "layout-walk-past-shared",
        ABSORB,
        "    while len(value_users(node)) == 1:\n",
        "    while len(value_users(node)) >= 1:\n",
        "_absorb._through_layout: walks back through a layout op read elsewhere",
        T_AFFINE,
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "producer-shared-guard-removed",
        ABSORB,
        "    if (shared := ctx.shared_reason(lin.node, lin.kind)) is not None:\n"
        '        return Fail(f"producer {shared.reason}")\n',
        "",
        "_absorb._linear_output_rewrite: a shared producer conv rewritten",
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "mixer-alpha-ignored",
        COMMON,
        "    return u, v, sign * alpha\n",
        "    return u, v, sign\n",
        "_common.join_operands: alpha= of the join ignored",
        T_MIXER,
        T_VIEWS,
        T_BRANCHES,
        K_VIEWS,
    ),
    _m(
        "mixer-ignores-hooks",
        MIXER,
        '            return Fail("a branch module has hooks")\n',
        "            pass\n",
        "fold_affine_mixer: a hooked branch module folded",
        T_MIXER,
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "branches-affine-off-axis",
        BRANCHES,
        "if isinstance(b.axis, Fail) or b.axis not in (None, reference.channel_axis):",
        "if isinstance(b.axis, Fail):",
        "merge_branches._check: a branch affine on a non-channel axis merged",
        T_BRANCHES,
        K_PASSES,
    ),
    _m(
        "branches-reflect-padding-merged",
        BRANCHES,
        '        if g is not None and g.padding_mode != "zeros" and any(g.padding):\n',
        "        if False:\n",
        "merge_branches._check: a reflect-padded branch merged",
        T_BRANCHES,
    ),
    _m(
        "branches-grouped-concat",
        BRANCHES,
        "        if not summed and any(op.groups != 1 for op in [conv, *b.prefix]):\n",
        "        if False:\n",
        "merge_branches._check: concatenating grouped convs",
        T_BRANCHES,
    ),
    _m(
        "branches-concat-different-roots",
        BRANCHES,
        "        if len({id(b.root) for b in branches}) > 1 or "
        "all(b.conv is None for b in branches):\n",
        "        if all(b.conv is None for b in branches):\n",
        "merge_branches._concat: convs of different tensors concatenated into one conv",
        T_BRANCHES,
        K_PASSES,
    ),
    _m(
        "branches-pads-a-crop",
        BRANCHES,
        "    return any(c > 0 and p > 0 for c, p in zip(branch.crop,",
        "    return False and any(c > 0 and p > 0 for c, p in zip(branch.crop,",
        "merge_branches._pads_a_crop: a conv zero-padding a cropped input merged",
        T_EXACT,
        T_BRANCHES,
    ),
    _m(
        "branches-ignore-hooks",
        BRANCHES,
        "    if any(has_hooks(module_of(gm, n)) for n in hooked):\n",
        "    if False:\n",
        "merge_branches._region_reason: a hooked branch module merged",
        T_BRANCHES,
        T_GUARDS,
    ),
    _m(
        "branches-crop-of-channels",
        BRANCHES,
        "    if any(i != slice(None) for i in full[:2]):\n        return None\n",
        "",
        "merge_branches._crop: a crop of the channels taken for a spatial crop",
        T_BRANCHES,
        T_EXACT,
        K_PASSES,
    ),
    _m(
        "branches-crop-adds-padding",
        BRANCHES,
        "padding = tuple(p - c for p, c in zip(kernel.padding, branch.crop, strict=True))",
        "padding = tuple(p + c for p, c in zip(kernel.padding, branch.crop, strict=True))",
        "merge_branches._conv_kernel: a crop adds padding instead of removing it",
        T_BRANCHES,
        T_EXACT,
    ),
    _m(
        "branches-concat-any-axis",
        BRANCHES,
        "        if not merge.summed and _concat_axis(merge.node) != merge.conv.channel_axis:\n",
        "        if False:\n",
        "merge_branches.check: a concatenation along a spatial axis merged",
        T_BRANCHES,
        K_PASSES,
    ),
    _m(
        "branches-prefix-bias-into-padding",
        BRANCHES,
        "        if padded and has_bias(first):  # padding so far would meet this conv's bias\n"
        "            break\n",
        "",
        "merge_branches._pointwise_prefix: a biased 1×1 composed into a zero-padded conv",
        T_BRANCHES,
        T_EXACT,
        T_REFERENCE,
        K_PASSES,
    ),
    _m(
        "sequential-bias-into-padded-conv",
        COMMON,
        "    if second.zero_padded and has_bias(first):\n",
        "    if False:\n",
        "merge_sequential: a bias before a zero-padded conv composed",
        T_SEQUENTIAL,
        T_EXACT,
    ),
    _m(
        "sequential-reflect-border",
        COMMON,
        '    return first_pads and second_pads and second.geometry.padding_mode != "zeros"\n',
        "    return False\n",
        "merge_sequential: a padded 1×1 composed into a reflect-padded conv",
        T_SEQUENTIAL,
        T_EXACT,
    ),
    _m(
        "sequential-any-groups",
        COMMON,
        "    depthwise = second.groups == second.in_channels == second.out_channels\n",
        "    depthwise = True\n",
        "merge_sequential: a grouped first conv composed with a dense second",
        T_SEQUENTIAL,
        K_PASSES,
    ),
    _m(
        "sequential-ignores-hooks",
        SEQUENTIAL,
        '            return Fail(f"{op.kind} module has hooks")\n',
        "            pass\n",
        "merge_sequential._reason: hooked convs composed",
        T_SEQUENTIAL,
        T_GUARDS,
        K_PASSES,
    ),
    _m(
        "sequential-cost-ignores-stride",
        SEQUENTIAL,
        'stride = math.prod(second.geometry.stride) if second.kind == "conv" else 1',
        "stride = 1",
        "merge_sequential._separate_cost: the first conv's full-resolution cost ignored",
        T_SEQUENTIAL,
        K_PASSES,
    ),
    _m(
        "padding-asymmetric-pads",
        PADDING,
        "    if any(a != b for a, b in sides):\n        return None\n",
        "",
        "absorb_padding._symmetric_pads: asymmetric pads taken as symmetric",
        T_PADDING,
        T_EXACT,
        K_PASSES,
    ),
    _m(
        "padding-pads-not-reversed",
        PADDING,
        "tuple(a for a, _ in reversed(sides))",
        "tuple(a for a, _ in sides)",
        "absorb_padding._symmetric_pads: F.pad's last-dim-first order not reversed",
        T_PADDING,
        K_PASSES,
    ),
    _m(
        "padding-ignores-bias-value",
        PADDING,
        "        is_bias = border.numel() in (1, bias.numel()) and constants_match(\n"
        "            border.expand_as(bias), bias, conv.weight.dtype\n"
        "        )\n",
        "        is_bias = border.numel() in (1, bias.numel())\n",
        "absorb_padding.check: the border value not compared with the conv's bias",
        T_PADDING,
        T_EXACT,
        T_REFERENCE,
    ),
    _m(
        "padding-drops-conv-padding",
        PADDING,
        "padding = tuple(p + q for p, q in zip(g.padding, pads, strict=True))",
        "padding = tuple(q for p, q in zip(g.padding, pads, strict=True))",
        "absorb_padding.rewrite: the conv's own padding dropped",
        T_PADDING,
        K_PASSES,
    ),
)


CHECK_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "commit-ignores-mutated-region",
        REGION,
        "        if node.meta.get(MUTATED_KEY):\n"
        '            raise ValidationFailure(f"{node.name} is mutated in place")\n',
        "",
        "collect_region: a region reading a value written in place validated",
        T_COMMIT,
        T_CAPTURE,
    ),
    _m(
        "commit-ignores-dtype",
        VALIDATE,
        "            if (fail := _same_dtype(want, got)) is not None:\n",
        "            if False:\n",
        "Proof.check: the replacement's output dtype not compared",
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "commit-batch-1-only",
        VALIDATE,
        "PROBE_BATCHES = (2, 1)",
        "PROBE_BATCHES = (1, 1)",
        "validate: no probe with batch > 1",
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "tensor-error-inf-vs-finite",
        TOLERANCES,
        "    mismatches = int(((nan_a != nan_e) | inf_differs).sum())\n",
        "    mismatches = int((nan_a != nan_e).sum())\n",
        "tensor_error: ±Inf against a finite value not a mismatch",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "max-errors-last-output-only",
        TOLERANCES,
        "        worst_rel = max(worst_rel, err.rel_or_inf)\n",
        "        worst_rel = err.rel_or_inf\n",
        "max_errors: the last output's error, not the worst",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "reference-dtype-most-precise",
        TOLERANCES,
        "    return max(dtypes, key=tolerance_for)\n",
        "    return min(dtypes, key=tolerance_for)\n",
        "reference_dtype: the most precise output dtype sets the tolerance",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "float64-ceiling-removed",
        TOLERANCES,
        "FLOAT64_CRITERION_CEILING = 1e-3",
        "FLOAT64_CRITERION_CEILING = 1.0",
        "tolerances: the float64 criterion's 1e-3 ceiling raised to 1",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "rounding-slack-huge",
        TOLERANCES,
        "ROUNDING_SLACK = 16.0",
        "ROUNDING_SLACK = 1e6",
        "tolerances: the low-precision rounding slack made huge",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "constants-match-always",
        TOLERANCES,
        "    return bool(torch.all((a - b).abs() <= 8 * eps * scale))\n",
        "    return True\n",
        "constants_match: any two constants match",
        T_PADDING,
        T_EXACT,
        K_PASSES,
    ),
    _m(
        "sensitivity-borrowed-from-other-outputs",
        VERIFY,
        "            sensitivity = self.sensitivity()[i]\n",
        "            sensitivity = max(self.sensitivity())\n",
        "verify: an output's float64 criterion from the most sensitive output",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "redrawn-check-not-redrawn",
        VERIFY,
        "    redrawn = redraw_foldable_parameters_(redrawn, seed)\n",
        "    redrawn = redrawn\n",
        "verify_redrawn: the parameters not re-drawn",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "structure-non-tensor-leaves-ignored",
        VERIFY,
        "        if not isinstance(e, torch.Tensor) and not _same_value(a, e):\n",
        "        if False:\n",
        "structure_mismatch: non-tensor output leaves not compared",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "float64-fold-check-skipped",
        VERIFY,
        "    if not r.fold_error <= r.criterion:\n",
        "    if False:\n",
        "_recheck_failure: the float64 fold's error not judged",
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "low-precision-treated-as-float64",
        VERIFY,
        "e.is_floating_point() and e.dtype != torch.float64 for e in self.expected",
        "e.is_floating_point() and e.dtype == torch.bool for e in self.expected",
        "_Float64Recheck: a low-precision model re-checked as if it were float64",
        T_VERIFY,
        K_VERIFY,
    ),
)


EQUIVALENT: tuple[Mutant, ...] = (
    _m(
        "folded-module-training-line-removed",
        FOLD,
        "    gm.training = model.training\n",
        "",
        "fold: the line setting the folded module's training flag removed",
        K_PASSES,
        "tests/test_fold_properties.py",
        audit=True,
        equivalent="torch.fx.GraphModule already copies `training` from the module it is built "
        "from (repfx's copy of the model); `folded-module-always-training` is the killable form",
    ),
    _m(
        "regroup-offset-modulo",
        ALGEBRA,
        "start = old_group * in_per_old - (o // (out_ch // groups)) * in_per_new",
        "start = (old_group * in_per_old) % in_per_new",
        "regroup: the block offset computed modulo the new group's width",
        T_ALGEBRA,
        K_PASSES,
        equivalent="old groups nest inside new ones, so old_group·in_per_old − "
        "new_group·in_per_new is that same remainder",
    ),
    _m(
        "branches-identity-channels",
        BRANCHES,
        "    if summed and identity and conv_branches[0].in_channels != reference.out_channels:\n",
        "    if False:\n",
        "merge_branches._check: an identity branch with in ≠ out channels merged",
        T_BRANCHES,
        K_PASSES,
        equivalent="the sum only runs when one side has 1 channel; summing the kernels then "
        "broadcasts exactly as the model's sum does (checked: 1→4 and 4→1 channels fold exactly)",
    ),
    _m(
        "branches-crop-asymmetric",
        BRANCHES,
        "if isinstance(cut.start, int) and cut.start > 0 and cut.stop == -cut.start:",
        "if isinstance(cut.start, int) and cut.start > 0:",
        "merge_branches._crop: an asymmetric crop x[a:-b] taken as the symmetric crop a",
        T_BRANCHES,
        T_EXACT,
        K_PASSES,
        equivalent="the centre offset uses the left crop a, which is right; branches of equal "
        "output size with equal centre offsets force b = a, and unequal sizes do not add",
    ),
    _m(
        "avg-pool-ceil-mode-accepted",
        OPS,
        "if pool.ceil_mode is not False or pool.divisor_override is not None or",
        "if pool.divisor_override is not None or",
        "avg_pool_op: a ceil_mode average pool seen as a conv",
        T_BRANCHES,
        K_VIEWS,
        equivalent="average pools are only merged as branches; aligned branches (same stride and "
        "centre) of equal output size need the stride to divide the padded extent, where ceil "
        "and floor modes coincide",
    ),
    _m(
        "layout-allows-bitcast",
        OPS,
        "    if in_dtype is not None and out_dtype is not None and in_dtype != out_dtype:\n"
        "        return False\n",
        "",
        "_moves_data_only: the recorded in / out dtype comparison removed",
        T_VIEWS,
        equivalent="of the layout ops only view changes a dtype, and only through a dtype "
        "argument, which the check after it refuses (`view-node-argument-taken-as-sizes`)",
    ),
)


# The run-time guards and the checks of what a fold assumes (issue classes: ranks, compile
# staleness, writes the capture does not see, signed zeros, proofs inside untraced code).
DYNAMO = "repfx/dynamo.py"
T_DYNAMO = "tests/test_dynamo.py"
T_WRITES = "tests/test_unseen_writes.py"

GUARD_MUTANTS: tuple[Mutant, ...] = (
    _m(
        "rank-guard-passes-any-rank",
        "repfx/ir/graph/guards.py",
        "value.dim() != rank:",
        "value.dim() != rank and False:",
        "require_rank: a rank other than the one the fold assumed accepted",
        "tests/test_rank_guards.py",
    ),
    _m(
        "watch-ignores-versions",
        DYNAMO,
        "if current is not tensor or current._version != version:",
        "if current is not tensor:",
        "WatchedGraph: a frozen tensor written in place after compiling not seen",
        T_DYNAMO,
    ),
    _m(
        "watch-ignores-statistics",
        DYNAMO,
        "            if not torch.equal(tensor, snapshot):\n",
        "            if False:\n",
        "WatchedGraph: BN statistics a training step updated not compared",
        T_DYNAMO,
    ),
    _m(
        "freezing-attributes-not-folded",
        DYNAMO,
        "        attributes = _frozen_attributes(gm)\n",
        "        attributes = None\n",
        "DynamoBackend: with inductor's freezing set, the attributes dynamo hands over not folded",
        T_DYNAMO,
    ),
    _m(
        "backend-freezes-written-placeholders",
        DYNAMO,
        "    written = _written_placeholders(gm)\n",
        "    written = set()\n",
        "_freezable: a placeholder the graph writes through a view frozen",
        T_WRITES,
        T_DYNAMO,
    ),
    _m(
        "written-storage-ignored",
        GRAPH,
        "        return bool(self._written) and storage_key(tensor) in self._written\n",
        "        return False\n",
        "ConstantFolder.written: a module tensor another get_attr writes taken as constant",
        T_WRITES,
    ),
    _m(
        "region-ignores-written-module-state",
        REGION,
        "            self._refuse_written_state(node)\n",
        "            pass\n",
        "collect_region: a module whose tensors the forward writes proven with their values now",
        T_WRITES,
    ),
    _m(
        "capture-keeps-lost-assignment",
        "repfx/capture/fx.py",
        "    lost = [name for name, value in rebound if not _updates_in_place(value, name)]\n",
        "    lost = []\n",
        "capture: an assignment to a buffer the graph does not record accepted",
        T_WRITES,
    ),
    _m(
        "identity-plus-zero",
        OPS,
        "    _NOOP_SCALARS[_t] = (-0.0, True)",
        "    _NOOP_SCALARS[_t] = (0.0, True)",
        "cleanup: x + 0 removed (turns -0.0 into +0.0)",
        T_CLEANUP,
    ),
    _m(
        "fold-inside-example-inputs-only",
        "repfx/fold_inside.py",
        '        ("their negation", each(torch.neg)),\n'
        '        ("inputs re-drawn at 3× their scale", each(redrawn)),\n',
        "",
        "fold_inside: replacements proven on the example inputs only",
        "tests/test_fold_inside.py",
    ),
    _m(
        "commit-probes-miss-outer-taps",
        PROBE_SHAPES,
        "    extent = dilation * (kernel - 1) + 1\n    padding = max(padding, 0)\n",
        "    return 1\n    extent = dilation * (kernel - 1) + 1\n    padding = max(padding, 0)\n",
        "probe_shapes._tap_coverage: probes too small for a dilated kernel's outer taps",
        T_COMMIT,
    ),
    _m(
        "commit-no-special-values",
        VALIDATE,
        "        _add_special_probe(gm, proof, to_f64)\n",
        "        pass\n",
        "prove_before: elementwise regions not probed with signed zeros, ±inf, NaN",
        "tests/test_special_values.py",
    ),
    _m(
        "commit-zero-signs-never-read",
        SPECIAL_VALUES,
        "and op_word(node) in _READ_ZERO_SIGNS:\n            return True",
        "and op_word(node) in _READ_ZERO_SIGNS:\n            return False",
        "zero_signs_matter: a reciprocal after a flipped zero not seen",
        "tests/test_special_values.py",
    ),
)


# The safety paths: the commit point's refusal of written inputs and its comparison of integer,
# tiny-scale and all-zero outputs; capture's alias analysis (writes through views, batch-norm
# statistics, the state a trace writes); the export front end (constant-pad values, hooked
# submodules, lifted constants written through a view) and absorb_padding; the axis and
# broadcast checks of scale regions; fold_inside's narrowing of replacements; flatten and norm
# axes on ranks other than 4; the verifier's discontinuity and non-finite thresholds. Killer
# tests: tests/test_mutant_killers_safety.py.
K_SAFETY = "tests/test_mutant_killers_safety.py"
INPLACE = "repfx/capture/inplace.py"
WRITES = "repfx/capture/writes.py"
STATE = "repfx/capture/state.py"
EXPORT = "repfx/capture/torch_export.py"
SCALE_REGION = "repfx/passes/_scale_region.py"
FOLD_INSIDE = "repfx/fold_inside.py"
FLATTEN = "repfx/passes/fold_affine_through_flatten.py"
T_EXPORT = "tests/test_capture_export.py"
T_SCALES = "tests/test_scale_propagation.py"
T_FLATTEN = "tests/test_pass_fold_affine_through_flatten.py"
T_NORMS = "tests/test_norms.py"
T_FOLD_INSIDE = "tests/test_fold_inside.py"

SAFETY_MUTANTS: tuple[Mutant, ...] = (
    # 1. the commit point: regions that read written values, and how outputs are compared
    _m(
        "region-written-stop-accepted",
        REGION,
        "        if node.meta.get(MUTATED_KEY):\n"
        '            raise ValidationFailure(f"{node.name} is mutated in place")\n'
        "        if node in self.stops:\n"
        "            return False\n",
        "        if node in self.stops:\n"
        "            return False\n"
        "        if node.meta.get(MUTATED_KEY):\n"
        '            raise ValidationFailure(f"{node.name} is mutated in place")\n',
        "collect_region: an input the pass names (a stop) accepted although written in place",
        K_SAFETY,
        T_CAPTURE,
        T_WRITES,
    ),
    _m(
        "region-written-buffers-unchecked",
        REGION,
        "for name, tensor in [*module.named_parameters(), *module.named_buffers()]:",
        "for name, tensor in module.named_parameters():",
        "collect_region: a module's buffers written elsewhere by the forward not refused",
        K_SAFETY,
        T_WRITES,
    ),
    _m(
        "commit-integer-outputs-unchecked",
        VALIDATE,
        '        return None if torch.equal(want, got) else Fail("integer values differ")\n',
        "        return None\n",
        "validate._same_values: integer / boolean outputs not compared",
        K_SAFETY,
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "commit-small-scale-absolute",
        VALIDATE,
        "    rel = diff / scale if scale > 0 else diff\n",
        "    rel = diff / scale if scale > 1 else diff\n",
        "validate._same_values: outputs of scale below 1 compared by absolute difference",
        K_SAFETY,
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "commit-zero-scale-unchecked",
        VALIDATE,
        "    rel = diff / scale if scale > 0 else diff\n",
        "    rel = diff / scale if scale > 0 else 0.0\n",
        "validate._same_values: any replacement accepted where the region's output is all zeros",
        K_SAFETY,
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "commit-nan-difference-ignored",
        VALIDATE,
        "    if rel > tol or math.isnan(rel):\n",
        "    if rel > tol:\n",
        "validate._same_values: a NaN relative difference not a failure",
        K_SAFETY,
        T_COMMIT,
        K_COMMIT,
        equivalent="rel cannot be NaN there: the non-finite positions of both sides are equal "
        "(checked just before), so the difference is taken over values finite in both — finite "
        "or +inf (an overflow), never NaN — and divided by a finite scale > 0 (or not divided)",
    ),
    # 2. capture's alias analysis
    _m(
        "mark-mutated-not-back-to-sources",
        INPLACE,
        "        if may_alias_inputs(gm, node):\n            stack.extend(node.all_input_nodes)\n",
        "",
        "mark_mutated: a write through a view does not mark the tensor it views (an input, a "
        "parameter)",
        K_SAFETY,
        T_CAPTURE,
        T_WRITES,
    ),
    _m(
        "private-view-ignores-other-readers",
        INPLACE,
        "    return readers == [tensor] and _is_private(gm, source, tensor)\n",
        "    return _is_private(gm, source, tensor)\n",
        "_is_private: a write through a view rewritten out of place although the viewed tensor "
        "has other readers",
        K_SAFETY,
        T_CAPTURE,
        T_WRITES,
    ),
    _m(
        "torch-batch-norm-statistics-positions",
        "repfx/ir/norms.py",
        '    torch.batch_norm: (3, 4, "training"),\n',
        '    torch.batch_norm: (1, 2, "training"),\n',
        "_mark_live_state: torch.batch_norm's statistics read at F.batch_norm's "
        "positions (its weight and bias marked instead)",
        K_SAFETY,
        T_EXPORT,
        T_WRITES,
    ),
    _m(
        "batch-norm-statistics-views-unmarked",
        INPLACE,
        "    mark_mutated(gm, reads)\n",
        "",
        "_mark_batch_norm_statistics: reads of a training-mode BatchNorm module's statistics "
        "elsewhere in the graph not marked",
        K_SAFETY,
        T_CAPTURE,
        T_WRITES,
    ),
    _m(
        "saved-state-skips-buffers",
        STATE,
        "    return [*tensor_attributes(model), *model.named_buffers()]\n",
        "    return [*tensor_attributes(model)]\n",
        "unrecorded_tensors: buffers a trace writes to not saved (nor restored, nor retraced)",
        K_SAFETY,
        T_WRITES,
        T_CAPTURE,
    ),
    # 3. the export front end, and absorb_padding
    _m(
        "export-pad-positional-value-dropped",
        EXPORT,
        '    value = rest[0] if rest else kwargs.get("value", 0)\n',
        '    value = kwargs.get("value", 0)\n',
        "to_torch_level: aten.constant_pad_nd's positional fill value dropped (zeros instead)",
        K_SAFETY,
        T_EXPORT,
        T_PADDING,
    ),
    _m(
        "export-hooks-ignore-pre-hooks",
        EXPORT,
        "if path and forward_hooks_of(m)]",
        "if path and m._forward_hooks]",
        "capture_exported: a submodule with only forward pre-hooks exported (its hooks would "
        "run while capturing only)",
        K_SAFETY,
        T_EXPORT,
    ),
    _m(
        "export-written-constant-view-missed",
        EXPORT,
        "                targets[user] = targets[node]\n                frontier.append(user)\n",
        "                pass\n",
        "_refuse_written_constants: a write through a view of a lifted tensor attribute not "
        "refused",
        K_SAFETY,
        T_EXPORT,
        T_WRITES,
    ),
    _m(
        "padding-positional-value-ignored",
        PADDING,
        '    value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)\n',
        '    value = pad.kwargs.get("value", None)\n',
        "absorb_padding._pad_value: F.pad's positional value ignored (read as zeros)",
        K_SAFETY,
        T_PADDING,
        T_EXPORT,
    ),
    _m(
        "padding-mask-threshold-at-fill",
        PADDING,
        "not 0 < threshold < fill",
        "not 0 < threshold <= fill",
        "absorb_padding._padded_above: a border mask with the threshold at the fill (all "
        "False) taken as the border",
        K_SAFETY,
        T_PADDING,
    ),
    # 4. scale regions: axes and broadcasts
    _m(
        "scale-sum-broadcast-operand",
        SCALE_REGION,
        "    return shape is not None and len(shape) >= -axis and shape[axis] == out[axis]\n",
        "    return shape is not None and len(shape) >= -axis\n",
        "_has_every_channel: an operand broadcast along the channel axis taken as having them all",
        K_SAFETY,
        T_SCALES,
        T_AFFINE,
    ),
    _m(
        "scale-region-two-axes",
        SCALE_REGION,
        "            if axes[node] != axis:\n"
        '                return Fail(f"{op_name(ctx.gm, node)} would be scaled along two axes")\n',
        "",
        "scaled_region._walk: a value reached along two different channel axes scaled once",
        K_SAFETY,
        T_SCALES,
        T_AFFINE,
    ),
    _m(
        "scale-gate-first-factor",
        SCALE_REGION,
        "    return [((whole or every_channel)[0], axis)]\n",
        "    return [(operands[0], axis)]\n",
        "_product_operand: the scale moved into the first factor of a gate, broadcast or not",
        K_SAFETY,
        T_SCALES,
        T_AFFINE,
    ),
    _m(
        "channelwise-relu-any-sign",
        OPS,
        "return Channelwise(node, x, axis, False, nonnegative_only=True) if is_relu else None",
        "return Channelwise(node, x, axis, False, nonnegative_only=False) if is_relu else None",
        "_relu_channelwise: relu taken to commute with a negative scale",
        K_SAFETY,
        T_SCALES,
        K_VIEWS,
    ),
    _m(
        "channelwise-mean-over-the-channels",
        OPS,
        "    if not 0 <= axis + r_out < len(kept) or kept[axis + r_out] in reduced:\n",
        "    if not 0 <= axis + r_out < len(kept):\n",
        "_mean_channelwise: a keepdim mean over the channel axis taken as channel-wise",
        K_SAFETY,
        T_SCALES,
        K_VIEWS,
    ),
    # 5. fold_inside: replacements proven alone and together
    _m(
        "narrowed-together-unproven",
        FOLD_INSIDE,
        "    if together.refusal is not None:\n        return proof, refused\n",
        "",
        "fold_inside._narrowed: the replacements that pass alone made without passing together",
        K_SAFETY,
        T_FOLD_INSIDE,
    ),
    _m(
        "narrowed-single-refusals-dropped",
        FOLD_INSIDE,
        "    return together, {path: single.refusal for path, single in alone.items() if "
        "single.refusal}\n",
        "    return together, {}\n",
        "fold_inside._narrowed: the replacements that fail alone not listed as refused",
        K_SAFETY,
        T_FOLD_INSIDE,
    ),
    _m(
        "narrowed-all-passing-reproven",
        FOLD_INSIDE,
        "    if not passing or len(passing) == len(paths):",
        "    if not passing:",
        "fold_inside._narrowed: replacements that all pass alone proven together a second time",
        K_SAFETY,
        T_FOLD_INSIDE,
        equivalent="when every replacement passes alone, `passing` is all of `paths`, which "
        "were just proven together and refused: the same deterministic proof (the same "
        "children folded the same way, run on the same inputs) refuses them again",
    ),
    # 6. flatten and norm axes on ranks other than 4
    _m(
        "flatten-axis-assumes-rank-4",
        FLATTEN,
        "    if op.axis is not None and len(shape) + op.axis != 1:",
        "    if op.axis is not None and op.axis != -3:",
        "fold_affine_through_flatten.check: the channel axis taken as -3 whatever the rank",
        K_SAFETY,
        T_FLATTEN,
    ),
    _m(
        "flatten-rank-4-only",
        FLATTEN,
        "        if shape is None or len(shape) < 3:",
        "        if shape is None or len(shape) != 4:",
        "fold_affine_through_flatten.check: only a rank-4 tensor flattened into a linear",
        K_SAFETY,
        T_FLATTEN,
    ),
    _m(
        "norm-axis-assumes-rank-4",
        OPS,
        "        axis = None if rank is None else 1 - rank\n",
        "        axis = None if rank is None else -3\n",
        "norm_op: a group norm's channel axis taken as -3 whatever the rank",
        K_SAFETY,
        T_NORMS,
        "tests/test_fold_norm_affine.py",
        T_AFFINE,
    ),
    _m(
        "norm-function-shape-any-length",
        OPS,
        "and len(second) == 1 and type(second[0]) is int",
        "and type(second[0]) is int",
        "_norm_function_channels: a functional layer norm over several trailing dims taken as "
        "per-channel over its first",
        K_SAFETY,
        T_NORMS,
        "tests/test_fold_norm_affine.py",
        T_AFFINE,
    ),
    # 7. the verifier's thresholds
    _m(
        "discontinuity-threshold-lowered",
        TOLERANCES,
        "DISCONTINUITY = 1e-2\n",
        "DISCONTINUITY = 1e-4\n",
        "tolerances: an output moving by 1e-4 under a 1-ulp perturbation called discontinuous",
        K_SAFETY,
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "discontinuous-nonfinite-check-removed",
        TOLERANCES,
        "    return not math.isfinite(sensitivity) or sensitivity >= DISCONTINUITY\n",
        "    return sensitivity >= DISCONTINUITY\n",
        "tolerances.discontinuous: a non-finite sensitivity not a jump",
        K_SAFETY,
        T_VERIFY,
        K_VERIFY,
        equivalent="+inf >= DISCONTINUITY already holds, and a sensitivity is never NaN: each "
        "move is a relative error over positions finite in both (finite or +inf, divided by a "
        "finite scale) or +inf, and Python's max() keeps 0.0 over a NaN anyway",
    ),
    _m(
        "recheck-nonfinite-mismatches",
        VERIFY,
        "    return c.verdict == FAILED and c.rel_error is not None and c.nonfinite_mismatches "
        "== 0\n",
        "    return c.verdict == FAILED and c.rel_error is not None\n",
        "verify._recheckable: an output whose NaN / Inf positions differ re-checked (and excused)",
        K_SAFETY,
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "discontinuous-without-determinism",
        VERIFY,
        "            if discontinuous(sensitivity) and self.deterministic():\n",
        "            if discontinuous(sensitivity):\n",
        "verify: an output that changes from run to run called discontinuous (not judged)",
        K_SAFETY,
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "tensor-error-zero-scale",
        TOLERANCES,
        "abs_err / scale if scale > 0 else abs_err",
        "abs_err / scale if scale > 0 else 0.0",
        "tensor_error: any output passes against an all-zero expected output",
        K_SAFETY,
        T_VERIFY,
        K_VERIFY,
    ),
    _m(
        "pure-ignores-in-place-calls",
        "repfx/proof/pure.py",
        "        if writes_in_place(node):\n            return False\n",
        "",
        "pure: a folded graph with an in-place write is run without a copy (verification changes "
        "the module it returns)",
        "tests/test_pure.py",
    ),
    _m(
        "pure-ignores-training-mode",
        "repfx/proof/pure.py",
        "type(m).__module__.startswith(_STOCK_MODULES) and not m.training and not has_hooks(m)",
        "type(m).__module__.startswith(_STOCK_MODULES) and not has_hooks(m)",
        "pure: a training-mode BatchNorm's graph is run without a copy",
        "tests/test_pure.py",
    ),
    _m(
        "redrawn-check-skipped-always",
        FOLD,
        "    redrawn_too = verify_redrawn and any(f.reads_state for f in report.folded)\n",
        "    redrawn_too = False\n",
        "fold: the re-drawn verification never runs (a fold exact only on identity statistics "
        "passes)",
        T_VERIFY,
    ),
    _m(
        "region-constants-not-state",
        REGION,
        "    if region.constants:\n        return True\n",
        "",
        "region.reads_module_state: a region reading parameters through attributes counts as "
        "parameter-free (its re-drawn check is skipped)",
        T_VERIFY,
    ),
    _m(
        "module-tensors-not-state",
        REGION,
        '        node.op == "call_module" and _holds_tensors(fetch_attr(gm, node.target))\n',
        "        False\n",
        "region.reads_module_state: a batch norm module's statistics count as no state",
        T_VERIFY,
    ),
    _m(
        "sharing-opaque-modules-write-the-model",
        "repfx/capture/frontend.py",
        "    for path in opaque:\n        shared.release(gm.get_submodule(path))\n",
        "",
        "sharing: a module run opaque writes its parameters into the user's model",
        "tests/test_sharing.py",
    ),
    _m(
        "sharing-hooks-write-the-model",
        "repfx/capture/frontend.py",
        "(node.meta.get(MUTATED_KEY) or has_hooks(module))",
        "node.meta.get(MUTATED_KEY)",
        "sharing: a hook writes its module's parameters into the user's model",
        "tests/test_sharing.py",
    ),
    _m(
        "sharing-fold-handed-back-aliases-the-model",
        FOLD,
        "    if handed_back:  # the user's model and the fold never share a tensor\n",
        "    if False:\n",
        "sharing: the fold handed back shares the storage of untouched parameters with the model",
        "tests/test_sharing.py",
    ),
    _m(
        "sharing-redraw-writes-the-model",
        VERIFY,
        "    shared.release(redrawn, only=foldable_tensors(redrawn))\n",
        "",
        "sharing: the re-drawn verification re-draws the user's own parameters",
        "tests/test_sharing.py",
    ),
    _m(
        "float64-copy-keeps-dtype-assertions",
        VERIFY,
        "        self.weights64 = output_tensors(run(float64_copy(folded), self.inputs64))\n",
        "        self.weights64 = output_tensors(run(copy_model(folded).double(), "
        "self.inputs64))\n",
        "verify: an exported low-precision fold's float64 re-check cannot run (dtype assertions)",
        T_VERIFY,
    ),
    _m(
        "dunder-writes-not-writes",
        GRAPH,
        '    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS\n',
        '    return name.endswith("_") and not name.endswith("__")\n',
        "is_inplace_name: t.__iadd__(y) / t.__setitem__(i, v) recorded as methods write nothing",
        T_WRITES,
    ),
    _m(
        "refold-proves-again",
        BASE,
        "        if (rule, location) in self.proven:\n",
        "        if False:\n",
        "commit point: the float64 re-check's refold proves every rewrite again (cost only)",
        T_VERIFY,
    ),
    _m(
        "commit-point-trusts-everything",
        BASE,
        "        if (rule, location) in self.proven:\n",
        "        if True:\n",
        "commit point: every rewrite applied without a proof",
        T_COMMIT,
        K_COMMIT,
    ),
    _m(
        "probes-keep-every-channel-sized-dim-only",
        PROBE_SHAPES,
        "    return [frozenset([i]) for i in order] + [frozenset(named)]\n",
        "    return [frozenset(named)]\n",
        "probe_shapes: a spatial dim that equals the channel count is probed at full size",
        T_COMMIT,
    ),
    _m(
        "fx-keeps-one-random-draw",
        "repfx/capture/fx.py",
        "    if eager.random:\n",
        "    if False:\n",
        "capture: a random draw torch.fx ran while tracing stays in the graph as a constant",
        "tests/test_random_draws.py",
    ),
    _m(
        "export-fixes-the-sequence-length",
        "repfx/capture/torch_export.py",
        "    _ShapePolicy(batch=True, lengths=True),\n",
        "",
        "export capture: token ids keep the example's length",
        "tests/test_capture_export.py",
    ),
    _m(
        "opened-output-object-never-rebuilt",
        "repfx/capture/outputs.py",
        "        return copy.deepcopy(self.value, dict(zip(map(id, self.slots), tensors, "
        "strict=True)))\n",
        "        return self.value\n",
        "outputs: an object pytree does not know comes back as the example's skeleton",
        "tests/test_output_types.py",
    ),
    _m(
        "opaque-leaf-attributes-never-written",
        "repfx/capture/live_state.py",
        "    return [*module.buffers(), *module.parameters(), "
        "*(t for _, t in tensor_attributes(module))]\n",
        "    return [*module.buffers(), *module.parameters()]\n",
        "capture: a plain tensor attribute that code run opaque updates is folded as a constant",
        "tests/test_unseen_writes.py",
    ),
    _m(
        "pickled-fold-loses-its-calling-convention",
        "repfx/capture/portable.py",
        "    gm = rebuild(*arguments)\n    gm.graph._codegen = codegen\n",
        "    gm = rebuild(*arguments)\n",
        "portable: a loaded fold returns flat leaves instead of the original's output types",
        "tests/test_output_types.py",
    ),
    _m(
        "defaults-checked-by-torch-fx",
        "repfx/capture/fx.py",
        '        if node.op == "call_function" and node.target is _assert_is_none:\n',
        "        if False:\n",
        "capture: an argument traced at its default keeps torch.fx's bare assertion",
        "tests/test_capture_export.py",
    ),
    _m(
        "refold-draws-from-the-callers-random-state",
        "repfx/dynamo.py",
        "            with torch.random.fork_rng():\n",
        "            if True:\n",
        "compile backend: a refold in the middle of a call moves the global random state",
        "tests/test_dynamo.py",
    ),
    _m(
        "probes-ignore-the-signs-of-zeros",
        "repfx/proof/validate.py",
        "                if (fail := same_special_values(want, got, bool(signs))) is not None:\n"
        "                    return SpecialValuesDiffer",
        "                if False:\n                    return SpecialValuesDiffer",
        "commit point: a zero of the other sign on the random probes passes",
        "tests/test_special_values.py",
    ),
    _m(
        "commit-point-proves-random-regions",
        "repfx/proof/validate.py",
        "        if torch.Tag.nondeterministic_seeded in func.tags:\n",
        "        if False:\n",
        "commit point: a region that draws random numbers is evaluated as if it could be proven",
        "tests/test_commit_point.py",
    ),
)


MUTANTS: tuple[Mutant, ...] = (
    AUDIT
    + ALGEBRA_MUTANTS
    + OPS_MUTANTS
    + GRAPH_MUTANTS
    + PASS_MUTANTS
    + CHECK_MUTANTS
    + GUARD_MUTANTS
    + EQUIVALENT
    + SAFETY_MUTANTS
)
