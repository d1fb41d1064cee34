"""The run's report as text (the default; ``--json`` prints the same result as JSON)."""

from __future__ import annotations

from ..report.fold_report import FoldReport, relative_error_text


def human_report(report: FoldReport, result: dict, explain: bool, everything: bool) -> str:
    fold, total = result["fold_seconds"], result["seconds"]
    lines = [str(report), f"  time: fold {fold:.1f} s, whole run {total:.1f} s"]
    graph = result.get("graph")
    if graph:
        drawn = graph["path"]
        lines.append(f"drew {graph['block'] or 'the model'} before and after into {drawn}"
                     if drawn else f"no picture: {graph['why']}")  # fmt: skip
    output = result.get("output")
    if output:
        size = output["bytes"] / 1e6
        lines.append(f"wrote {output['path']} ({output['format']}, {size:.1f} MB)")
        check = output["check"]
        if check:
            sizes = check.get("batch_sizes") or ()
            at = f" at batch {' and '.join(map(str, sizes))}" if len(sizes) > 1 else ""
            errors = relative_error_text(check["max_rel_error"], check["tolerance"])
            lines.append(f"  reloaded with {check['runner']}{at}: {errors}")
        onnx = output.get("onnx")
        if onnx:
            lines.append(_onnx_lines(onnx))
        lines.append(f"  load it with {output['loader']}")
    bench = result.get("benchmark")
    if bench:
        threads = f"{bench['threads']} thread{'s' if bench['threads'] != 1 else ''}"
        lines.append(
            f"benchmark: eager latency {bench['before_ms']:.2f} ms -> {bench['after_ms']:.2f} ms "
            f"(speedup {bench['speedup']:.2f}x), median of {bench['rounds']} interleaved rounds, "
            f"{threads}; median paired ratio after/before {bench['paired_ratio_median']:.3f}"
        )
    if explain:
        which = "every candidate" if everything else "what you could change"
        lines.append(f"not folded ({which}), with reasons:")
        lines.extend(f"  {line}" for line in report.explain(everything=everything).splitlines())
    return "\n".join(lines)


def _onnx_lines(onnx: dict) -> str:
    header = f"  onnx ({onnx['exporter']} exporter, opset {onnx['opset']})"
    if "unfolded_nodes" not in onnx:
        why = onnx.get("unfolded_error", "")
        return f"{header}: {onnx['nodes']} nodes (unfolded model not exported: {why})"
    before, after = onnx["unfolded_ops"], onnx["ops"]
    lines = [f"{header}: nodes {onnx['unfolded_nodes']} -> {onnx['nodes']} (unfolded -> folded)"]
    for op in sorted(set(before) | set(after)):
        lines.append(f"    {op:<22} {before.get(op, 0):>5} -> {after.get(op, 0)}")
    return "\n".join(lines)
