"""Rich consoles and the renderers that turn results into tables (stdout) or JSON; logs go to stderr."""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: dict) -> None:
    # Plain print: no rich wrapping or markup inside machine output.
    print(json.dumps(data, indent=2, default=str, allow_nan=True))


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {_escape(message)}")
    if hint:
        err.print(f"[dim]hint:[/] {_escape(hint)}")


def note(message: str) -> None:
    err.print(f"[dim]•[/] {_escape(message)}")


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.2e}"


def _shape(shape) -> str:
    return r"\[" + ", ".join(str(d) for d in shape) + "]"


def parity_table(report) -> Table:
    table = Table(title=f"parity: {report.reference} vs {report.candidate}", title_justify="left")
    for col in ("case", "output", "shape", "max abs", "mean abs", "max rel", "atol", "rtol", "result"):
        table.add_column(col, justify="right" if col.startswith(("max", "mean", "atol", "rtol")) else "left")
    for c in report.comparisons:
        table.add_row(c.case, c.output, _shape(c.shape_out), _fmt(c.max_abs), _fmt(c.mean_abs), _fmt(c.max_rel),
                      f"{c.atol:g}", f"{c.rtol:g}",
                      "[green]✓ pass[/]" if c.passed else f"[red]✗ {_escape(c.problem or 'fail')}[/]")
    return table


def render_parity(report) -> None:
    out.print(parity_table(report))
    for name in report.missing_outputs:
        out.print(f"[red]✗ output {name} is missing from {report.candidate}[/]")
    for message in report.errors:
        out.print(f"[red]✗ {_escape(message)}[/]")


def render_convert(result) -> None:
    facts = result.facts
    if result.parity is not None:
        for name, c in result.parity.worst_per_output().items():
            err.print(f"[green]✓[/] output {name}: max_abs {_fmt(c.max_abs)} ≤ atol {c.atol:g} "
                      f"(worst of {len(result.parity.summary()['cases'])} size cases)")
    else:
        err.print("[yellow]![/] parity check skipped (--no-verify)")
    for text in result.notes:
        note(text)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(result.output))
    if facts.external_files:
        table.add_row("external data", ", ".join(facts.external_files))
    table.add_row("manifest", str(result.manifest_path))
    table.add_row("source", f"{result.kind} ({result.framework} {result.framework_version})")
    table.add_row("exporter", result.exporter)
    table.add_row("opset", str(result.opset))
    for spec in facts.inputs:
        table.add_row("input", f"{spec.name} {_shape(spec.shape)} {spec.dtype}")
    for spec in facts.outputs:
        table.add_row("output", f"{spec.name} {_shape(spec.shape)} {spec.dtype}")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    out.print(table)


def render_inspect(result) -> None:
    d = result.to_dict()
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", d["path"])
    table.add_row("producer", d["producer"] or "-")
    table.add_row("ir version", str(d["ir_version"]))
    table.add_row("opsets", ", ".join(f"{k} {v}" for k, v in d["opsets"].items()))
    table.add_row("size", f"{d['size_bytes'] / 1e6:.2f} MB" + (
        f" (external data: {', '.join(d['external_data'])})" if d["external_data"] else ""))
    table.add_row("parameters", f"{d['parameters']:,}")
    table.add_row("nodes", str(d["nodes"]))
    for spec in result.facts.inputs:
        table.add_row("input", f"{spec.name} {_shape(spec.shape)} {spec.dtype}")
    for spec in result.facts.outputs:
        table.add_row("output", f"{spec.name} {_shape(spec.shape)} {spec.dtype}")
    out.print(table)
    ops = Table(title="operators", title_justify="left")
    ops.add_column("op type")
    ops.add_column("count", justify="right")
    for op, count in d["op_histogram"].items():
        ops.add_row(op, str(count))
    out.print(ops)
    m = d["manifest"]
    if m:
        info = Table(title="manifest", title_justify="left", show_header=False)
        info.add_column(style="bold")
        info.add_column()
        info.add_row("file", m["path"])
        info.add_row("source", str(m["source"]))
        fw = m.get("framework") or {}
        info.add_row("framework", f"{fw.get('name')} {fw.get('version')}")
        info.add_row("exporter", str(m["exporter"]))
        info.add_row("parity", {True: "[green]passed[/]", False: "[red]failed[/]", None: "skipped"}[
            m["parity_passed"]])
        info.add_row("created", str(m["created_at"]))
        info.add_row("history", " → ".join(m["history"]))
        out.print(info)


def divergence_table(title: str, divergences) -> Table:
    """Intermediate tensors (``divergence.NodeDivergence``) as a table: node, op, tensor and error figures."""
    table = Table(title=title, title_justify="left")
    for col in ("#", "node", "op", "tensor", "max abs", "max rel", "cosine", "result"):
        table.add_column(col, justify="right" if col in ("#", "max abs", "max rel", "cosine") else "left")
    for d in divergences:
        c = d.comparison
        table.add_row(str(d.index), _escape(d.label), d.op_type, _escape(d.tensor), _fmt(c.max_abs), _fmt(c.max_rel),
                      f"{c.cosine:.6f}", "[green]✓ pass[/]" if c.passed else f"[red]✗ {_escape(c.problem or 'fail')}[/]")
    return table


def render_validate(result) -> None:
    for text in result.notes:
        err.print(f"[yellow]![/] {_escape(text)}")
    for c in result.comparisons:
        if c.status == "skipped":
            err.print(f"[yellow]-[/] skipped {_escape(c.candidate)} vs {_escape(c.reference)}: {_escape(c.skipped)}")
            continue
        render_parity(c.report)
        if c.divergence is not None:
            out.print(divergence_table(
                f"first diverging node: {c.candidate} vs {c.divergence_against} at {c.divergence_case}",
                [c.divergence]))
        elif c.divergence_note:
            out.print(f"[yellow]![/] {_escape(c.divergence_note)}")
    s = result.summary()["counts"]
    mark = "[green]✓[/] validation passed" if result.passed else "[red]✗[/] validation failed"
    err.print(f"{mark}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped "
              f"(reference {_escape(result.reference)}; cases {', '.join(result.cases)})")
    if result.junit_path:
        err.print(f"[dim]•[/] JUnit report: {_escape(str(result.junit_path))}")
    if result.manifest_path:
        err.print(f"[dim]•[/] recorded in {_escape(str(result.manifest_path))}")


def render_quantize(result) -> None:
    for text in result.notes:
        err.print(f"[yellow]![/] {_escape(text)}")
    err.print(f"[dim]•[/] mode: {_escape(result.mode_reason)}")
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(result.output))
    table.add_row("manifest", str(result.manifest_path))
    table.add_row("mode", result.mode + (f" ({result.method}, {result.quant_format})" if result.method else ""))
    table.add_row("size", f"{result.size_before / 1e6:.3f} MB → {result.size_after / 1e6:.3f} MB "
                          f"({result.ratio:.2f}x smaller)")
    table.add_row("quantized ops", ", ".join(f"{op} ×{n}" for op, n in result.quantized_ops.items()) or "none")
    table.add_row("kept in float32", ", ".join(result.excluded) or "none")
    table.add_row("budget", result.budget.describe())
    table.add_row("validated on", f"{result.samples} samples ({result.data_source})")
    out.print(table)
    acc = Table(title="accuracy vs fp32", title_justify="left")
    for col in ("output", "max abs", "cosine", "top-1 agreement"):
        acc.add_column(col, justify="left" if col == "output" else "right")
    for a in result.accuracy:
        acc.add_row(a.output, _fmt(a.max_abs), f"{a.cosine:.6f}", "-" if a.top1 is None else f"{a.top1:.1%}")
    out.print(acc)
    if len(result.attempts) > 1:
        err.print(f"[dim]•[/] fallback: {len(result.attempts)} attempts; kept {len(result.excluded)} node(s) in "
                  "float32 to meet the budget")
