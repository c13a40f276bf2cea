"""Rich consoles and the renderers that turn results into tables (stdout) or JSON; logs go to stderr."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.table import Table

from mpack import manifest

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default; a terminal keeps its width.
_PIPE_WIDTH = 160
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)


def print_json(data: dict) -> None:
    # Plain print: no rich wrapping or markup inside machine output.
    print(json.dumps(manifest.finite(data), indent=2, default=str, allow_nan=False))


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
    # N.B. escaped: labels such as "model.onnx[cpu]" would otherwise be read as Rich markup and vanish.
    table = Table(title=_escape(f"parity: {report.reference} vs {report.candidate}"), title_justify="left")
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


def parity_checklist(report) -> None:
    """One ✓ line per output (its worst case), or a note that the check was skipped."""
    if report is None:
        err.print("[yellow]![/] parity check skipped (--no-verify)")
        return
    cases = len(report.summary()["cases"])
    for name, c in report.worst_per_output().items():
        err.print(f"[green]✓[/] output {_escape(name)}: max_abs {_fmt(c.max_abs)} ≤ atol {c.atol:g} "
                  f"(worst of {cases} size cases)")


def render_convert(result) -> None:
    facts = result.facts
    parity_checklist(result.parity)
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
                _escape(f"first diverging node: {c.candidate} vs {c.divergence_against} at {c.divergence_case}"),
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


def render_optimize(result) -> None:
    parity_checklist(result.parity)
    if result.fusion_note:
        mark = "[dim]•[/]" if result.fusion_status == "skipped" else "[yellow]![/]"
        err.print(f"{mark} {_escape(result.fusion_note)}")
    for text in result.notes:
        note(text)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(result.output))
    table.add_row("manifest", str(result.manifest_path))
    table.add_row("level", f"{result.level} for {result.provider}" + (
        f" (graph bound to {result.optimized_for})" if result.optimized_for else " (runs on any provider)"))
    table.add_row("model type", f"{result.model_type or 'none'} ({result.model_type_source}: "
                                f"{_escape(result.model_type_reason)})")
    if result.model_type:
        table.add_row("heads / hidden", f"{result.num_heads or '?'} / {result.hidden_size or '?'}")
    table.add_row("fused", (", ".join(f"{op} ×{n}" for op, n in result.fused_ops.items()) or "nothing")
                  + (f" ({result.fusion_engine})" if result.fusion_engine and result.fused_ops else ""))
    table.add_row("nodes", f"{result.nodes_before} → {result.nodes_after}")
    if result.float16:
        table.add_row("float16", "weights and compute" + (", inputs/outputs too" if result.float16_io else
                                                           "; inputs/outputs stay float32"))
    if result.timing is not None:
        t = result.timing
        figure = f"{t.reference_ms:.2f} ms → {t.optimized_ms:.2f} ms ({t.speedup:.2f}x) at {t.case} on {t.provider}"
        table.add_row("latency", figure if t.meaningful else f"[dim]{figure} (not meaningful)[/]")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    out.print(table)
    if result.timing is not None and not result.timing.meaningful:
        err.print(f"[yellow]![/] {_escape(result.timing.note)}")


class _Progress:
    """A rich progress bar on stderr whose tasks hand back a tick() callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, transient=True)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        task = self.bar.add_task(description, total=total)
        return lambda: self.bar.advance(task)


def progress() -> _Progress:
    return _Progress()


def render_bench(result) -> None:
    for text in result.skipped:
        err.print(f"[yellow]skipped[/] {_escape(text)}")
    for text in result.notes:
        err.print(f"[yellow]![/] {_escape(text)}")
    env = result.environment
    table = Table(title=f"latency (ms) on {env['cpu']}, {env['cores']} cores, {env['versions']['onnxruntime']}",
                  title_justify="left")
    for col in ("model", "provider", "batch", "threads", "conc.", "mean", "p50", "p90", "p99", "min", "max", "std",
                "samples/s", "peak RSS", "p50 ratio"):
        table.add_column(col, justify="left" if col in ("model", "provider") else "right")
    for r in result.rows:
        s = r.stats
        table.add_row(r.model, r.provider, str(r.batch), str(r.threads or "all"), str(r.concurrency),
                      *(f"{v:.3f}" for v in (s.mean, s.p50, s.p90, s.p99, s.min, s.max, s.std)),
                      f"{s.throughput:,.1f}", f"{r.peak_rss_mb:.0f} MB",
                      "-" if r.ratio_p50 is None else f"{r.ratio_p50:.2f}x")
    out.print(table)
    if result.gate is not None:
        gate = Table(title=f"regression gate (max +{result.max_regression:.0%} on p50 and p90)",
                     title_justify="left")
        for col in ("model", "batch", "threads", "baseline p50", "p50", "change", "result"):
            gate.add_column(col, justify="left" if col in ("model", "result") else "right")
        for g in result.gate:
            gate.add_row(g.key[0], str(g.key[2]), str(g.key[3] or "all"), f"{g.baseline_p50:.3f}", f"{g.p50:.3f}",
                         f"{g.slowdown:+.0%}", ("[red]✗ slower[/]" if g.regressed else "[green]✓ ok[/]")
                         + (f" ({g.note})" if g.note else ""))
        out.print(gate)


# --- mpack batch / mpack worker -----------------------------------------------------------------------------------

class _RowsProgress:
    """A rows bar on stderr (done/total, rows/s, ETA) fed absolute counts: ``update(done, total)``."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("rows  {task.fields[rate]}"), TimeRemainingColumn(), console=err,
                            transient=True)
        self.description = description
        self.task = None

    def __enter__(self) -> _RowsProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            # Rows already done by an interrupted run start the bar without counting towards rows/s.
            self.task = self.bar.add_task(self.description, total=total, completed=done, rate="")
            return
        self.bar.update(self.task, completed=done, total=total)
        speed = self.bar.tasks[self.task].speed
        self.bar.update(self.task, rate=f"{speed:,.0f} rows/s" if speed else "")


def rows_progress(description: str = "inferring") -> _RowsProgress:
    return _RowsProgress(description)


def render_batch(result) -> None:
    for text in result.notes:
        note(text)
    if result.probe:
        err.print("[dim]•[/] batch size probe: " + ", ".join(f"{b}: {r:,.0f}" for b, r in result.probe)
                  + " rows/s")
    err.print(f"[green]✓[/] {result.rows - result.rows_resumed:,} rows inferred"
              + (f" ({result.rows_resumed:,} resumed)" if result.rows_resumed else "")
              + f" at {result.rows_per_s:,.0f} rows/s")
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", f"{_escape(str(result.output))} ({result.format}, {result.parts} parts)")
    table.add_row("rows", f"{result.rows:,}")
    table.add_row("inputs", ", ".join(f"{k} ← {_escape(v)}" for k, v in result.inputs.items()))
    table.add_row("outputs", ", ".join(([f"{_escape(result.id_column)} (id)"] if result.id_column else [])
                                       + [_escape(o) for o in result.outputs]))
    table.add_row("batch size", f"{result.batch_size} ({result.batch_size_source})")
    table.add_row("chunk rows", f"{result.chunk_rows:,}")
    table.add_row("engine", result.engine)
    table.add_row("time", f"{result.seconds:.1f}s")
    out.print(table)


def render_worker(result) -> None:
    err.print(f"[green]✓[/] worker {_escape(result.consumer)} stopped: {result.jobs} jobs ({result.failed} failed, "
              f"{result.reclaimed} reclaimed) in {result.batches} batches, {result.seconds:.1f}s")


class _BuildProgress:
    """``mpack build-image``: a status line for the stages, and a step bar fed by the build log (Step N/M)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            console=err, transient=True)
        self.task = None

    def __enter__(self) -> _BuildProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("preparing", total=None)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def status(self, message: str) -> None:
        self.bar.update(self.task, description=_escape(message))

    def event(self, event) -> None:
        """A BuildEvent: a new step moves the bar; cached steps are marked as such."""
        if event.total:
            self.bar.update(self.task, total=event.total, completed=event.index - 1,
                            description=_escape(f"step {event.index}/{event.total}: {event.instruction[:70]}"))
        elif event.cached:
            self.bar.update(self.task, description=self.bar.tasks[0].description.replace(" (cached)", "")
                            + " (cached)")


def build_progress() -> _BuildProgress:
    return _BuildProgress()


def details(lines) -> None:
    """Indented context under an error (a failing build step's output, a container's log tail)."""
    for line in lines:
        err.print(f"[dim]  │ {_escape(line)}[/]")


def render_image(result) -> None:
    for text in result.notes:
        note(text)
    if result.smoke is not None:
        for c in result.smoke.checks:
            err.print(f"[green]✓[/] V2 infer {_escape(c.model)} v{_escape(c.version)}: max_abs {c.max_abs_diff:.1e} "
                      f"vs local ONNX Runtime")
        err.print(f"[green]✓[/] ready in {result.smoke.ready_s:.1f}s, health check {result.smoke.health}, stopped on "
                  f"SIGTERM in {result.smoke.stop_s:.1f}s (exit {result.smoke.exit_code})")
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    if result.image_id:
        table.add_row("image", f"{_escape(result.tag)}  {result.image_id}")
        size = f"{result.size / 1e6:.1f} MB"
        if result.max_size is not None:
            size += (f" [red]✗ over budget {result.max_size / 1e6:.1f} MB[/]" if result.over_budget
                     else f" [green]✓ within {result.max_size / 1e6:.1f} MB[/]")
        table.add_row("size", size + f", {result.layers} layers")
        table.add_row("build", f"{result.total_steps} steps, {result.cached_steps} from cache")
    else:
        table.add_row("context", _escape(str(result.context_dir)))
        table.add_row("build it", _escape(f"docker build --network none -t {result.tag} {result.context_dir}"))
    table.add_row("variant", result.variant)
    table.add_row("base", _escape(f"{result.base_image} → {result.base_ref}"))
    table.add_row("models", ", ".join(_escape(f"{m['name']}:{m['version']}") for m in result.models))
    table.add_row("packages", ", ".join(_escape(f"{p['name']}=={p['version']}") for p in result.packages))
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    out.print(table)
