"""The ``mpack`` command line: thin commands over the library.

Each command parses options, builds a ``*Config``, calls one library function and renders its result. Heavy
imports (onnx, onnxruntime, torch, tensorflow) happen inside the commands, never at module import, so
``mpack --help`` stays fast and works without the framework extras.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpack import __version__, console
from mpack.errors import MpackError, ParityError

app = typer.Typer(
    name="mpack",
    help="From a trained PyTorch or TensorFlow model to a checked ONNX package.\n\n"
         "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 parity failure, 4 missing extra, 5 export failure, "
         "6 performance regression, 7 image build failure, 8 image over size budget, 9 queue unavailable, "
         "130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.out.print(f"mpack {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug


def handled(json_flag: str | None = "json_out"):
    """Map MpackError to one red line (plus hint) and its exit code; with --debug, re-raise for the traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                try:
                    return fn(*args, **kwargs)
                except ModuleNotFoundError as exc:
                    # An optional framework imported at call time: name the extra, as require() does.
                    from mpack._optional import EXTRAS, missing

                    top = (exc.name or "").split(".")[0]
                    if top not in EXTRAS:
                        raise
                    raise missing(top) from exc
            except MpackError as exc:
                if _state["debug"]:
                    raise
                if isinstance(exc, ParityError) and exc.report is not None:
                    is_parity = hasattr(exc.report, "comparisons")
                    if json_flag and kwargs.get(json_flag):
                        console.print_json({"passed": False, "error": exc.message,
                                            "parity" if is_parity else "report": exc.report.to_dict()})
                    elif is_parity:
                        console.render_parity(exc.report)
                console.error(exc.message, exc.hint)
                raise typer.Exit(exc.exit_code) from None

        return inner

    return wrap


@app.command()
@handled()
def convert(
    source: Annotated[str, typer.Argument(help="Model file (.pt/.pth TorchScript or torch.save, .pt2, .keras, .h5, "
                                               ".tflite), SavedModel directory, or package.module:factory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")],
    input_: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="Input as NAME:SHAPE[:DTYPE], e.g. pixels:batch,3,32,32:float32 or "
                              "tokens:batch,seq=16:int64. Repeat per input, in forward() order. "
                              "Default: the model's own signature.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (13-18).")] = 18,
    exporter: Annotated[str, typer.Option(help="PyTorch exporter: auto (dynamo, TorchScript-based as fallback), "
                                               "dynamo or torchscript.")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(help="state_dict to load into an entry point's module.")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                help="Make axis 0 of every input symbolic.")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check parity against the source.")] = True,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global (1e-4) or per output (NAME=1e-3). Default 1e-4.")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes the parity check runs at.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the parity inputs.")] = 0,
    external_data: Annotated[str, typer.Option(
        help="Store weights in a separate .onnx.data file: auto (above 1.8 GiB), always, never.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Convert a PyTorch or TensorFlow model to ONNX, check it and verify parity.

    Example: mpack convert model.pt2 -o model.onnx
    """
    from mpack import convert as convert_mod
    from mpack.parity import parse_tolerances
    from mpack.specs import parse_input_spec

    cfg = convert_mod.ConvertConfig(
        source=source, output=output,
        inputs=tuple(parse_input_spec(text) for text in input_) if input_ else None,
        opset=opset, exporter=exporter, weights=weights, dynamic_batch=dynamic_batch, verify=verify,
        tolerances=parse_tolerances(atol, rtol), batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed,
        external_data=external_data)
    with console.err.status("converting", spinner="dots") as status:
        result = convert_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_convert(result)


@app.command()
@handled()
def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Show an ONNX model's inputs, outputs, opsets, size, parameters, operators and manifest."""
    from mpack import inspection

    result = inspection.run(model)
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_inspect(result)


@app.command()
@handled()
def optimize(
    model: Annotated[Path, typer.Argument(help="The float .onnx model (e.g. from mpack convert).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The optimized .onnx file to write.")],
    level: Annotated[str, typer.Option(
        help="ONNX Runtime graph optimization: basic (runs on any provider), extended or all (bound to "
             "--provider; all also to this CPU).")] = "basic",
    provider: Annotated[str, typer.Option(
        help="Execution provider the graph is optimized and verified for: cpu, cuda, or auto (cpu; cuda with "
             "--float16 when a CUDA device works here).")] = "auto",
    model_type: Annotated[str, typer.Option(
        help="Transformer fusions: auto (detected from the graph), none, or an ONNX Runtime model type "
             "(bert, bart, gpt2, vit, ...).")] = "auto",
    fuser: Annotated[str, typer.Option(
        help="Who fuses: ort (ONNX Runtime's transformer optimizer, matches TorchScript-based exports), onnxscript "
             "(onnxscript's ORT fusions, match dynamo exports) or auto (ort, then onnxscript if no attention "
             "fused).")] = "auto",
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads. Default: read from the graph.")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Hidden size. Default: read from the graph.")] = None,
    float16: Annotated[bool, typer.Option("--float16", help="Convert to float16 (for GPUs); inputs/outputs and "
                                                            "numerically sensitive ops stay float32.")] = False,
    float16_io: Annotated[bool, typer.Option("--float16-io", help="With --float16, make inputs/outputs "
                                                                  "float16 too.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="Check parity of the optimized model against the input.")] = True,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global or NAME=VALUE. Default 1e-4 (1e-2 with --float16).")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3 (1e-2 with --float16).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes the parity check runs at.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the parity inputs.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Optimize an ONNX model with ONNX Runtime (graph levels, transformer fusions, float16) and verify parity.

    Example: mpack optimize model.onnx -o model.opt.onnx --level extended
    """
    from mpack import optimize as optimize_mod
    from mpack.parity import parse_tolerances

    cfg = optimize_mod.OptimizeConfig(
        model=model, output=output, level=level, provider=provider, model_type=model_type, fuser=fuser,
        num_heads=num_heads,
        hidden_size=hidden_size, float16=float16, float16_io=float16_io, verify=verify,
        tolerances=parse_tolerances(atol, rtol) if atol or rtol else None,
        batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed)
    with console.err.status("optimizing", spinner="dots") as status:
        result = optimize_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_optimize(result)


@app.command()
@handled()
def quantize(
    model: Annotated[Path, typer.Argument(help="The float .onnx model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The INT8 .onnx file to write.")],
    mode: Annotated[str, typer.Option(help="auto (dynamic for MatMul-heavy graphs, static QDQ per-channel for "
                                           "conv nets), dynamic or static.")] = "auto",
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration samples for static mode: a .npz keyed by input name, a directory of .npz/.npy, or "
             "'random' (smoke tests only).")] = None,
    method: Annotated[str, typer.Option(help="Calibration method: minmax, entropy or percentile.")] = "minmax",
    quant_format: Annotated[str, typer.Option("--format", help="Static format: qdq or qoperator.")] = "qdq",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales.")] = True,
    activation_type: Annotated[str, typer.Option(help="Static activations: quint8 or qint8.")] = "quint8",
    weight_type: Annotated[str, typer.Option(help="Weights: qint8 or quint8.")] = "qint8",
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess",
                                             help="Run ONNX Runtime's shape inference + optimisation first.")] = True,
    reduce_range: Annotated[Optional[bool], typer.Option(
        "--reduce-range/--full-range", help="7-bit weights. Default: on when the CPU lacks VNNI (INT8 sums "
                                            "saturate there otherwise).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Validation samples for the accuracy figures. Default: the calibration set, else seeded random.")] = None,
    max_drop: Annotated[Optional[list[str]], typer.Option(
        help="Accuracy budget: cosine=DROP (default 0.01, i.e. cosine ≥ 0.99) and/or top1=DROP (e.g. 1%).")] = None,
    fallback: Annotated[bool, typer.Option("--fallback/--no-fallback",
                                           help="Keep the most sensitive nodes in float32 when over budget.")] = True,
    max_excluded: Annotated[int, typer.Option(help="Most nodes the fallback may keep in float32.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of random samples.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Quantize an ONNX model to INT8 within an accuracy budget (exit 3 and nothing written when it cannot).

    Example: mpack quantize model.onnx -o model.int8.onnx --calibration samples.npz
    """
    from mpack import quantize as quantize_mod

    cfg = quantize_mod.QuantizeConfig(
        model=model, output=output, mode=mode, calibration=calibration, method=method, quant_format=quant_format,
        per_channel=per_channel, activation_type=activation_type, weight_type=weight_type, preprocess=preprocess,
        reduce_range=reduce_range, data=data, budget=quantize_mod.parse_budget(max_drop), fallback=fallback,
        max_excluded=max_excluded, seed=seed)
    with console.err.status("quantizing", spinner="dots") as status:
        result = quantize_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_quantize(result)


@app.command()
@handled()
def validate(
    models: Annotated[list[Path], typer.Argument(
        help="ONNX models (e.g. fp32 then INT8). The first is the reference unless --source; each other model, "
             "on each provider, is compared with the reference on CPU.")],
    source: Annotated[bool, typer.Option(
        "--source/--no-source", help="Also run the PyTorch/TensorFlow source named in the first model's manifest "
                                     "(model.mpack.json) and make it the reference. Needs its framework extra.")
    ] = False,
    providers: Annotated[str, typer.Option(
        help="ONNX Runtime providers to compare: cpu, cuda, tensorrt (comma-separated). One missing here (no GPU) "
             "is skipped with a note, not failed.")] = "cpu",
    data: Annotated[Optional[Path], typer.Option(
        help="An .npz of inputs keyed by input name, instead of seeded random inputs.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes of the random inputs.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global (1e-4) or per output (NAME=1e-3). Default 1e-4.")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3.")] = None,
    locate: Annotated[bool, typer.Option(
        "--locate/--no-locate", help="On a failure, find the first diverging node of the ONNX graph.")] = True,
    chunk_size: Annotated[int, typer.Option(
        help="Intermediate tensors exposed per ONNX Runtime session while locating (lower uses less memory).")
    ] = 64,
    junit: Annotated[Optional[Path], typer.Option(help="Write a JUnit XML report to this file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Check numerical parity between a source model, its ONNX and INT8 versions, and ORT providers (CI gate).

    Exit 0 when every comparison passes (skipped ones do not fail), 3 when one differs beyond tolerance.

    Example: mpack validate model.onnx model.int8.onnx --source --providers cpu,cuda --atol 1e-2 --junit report.xml
    """
    from mpack import validate as validate_mod
    from mpack.parity import parse_tolerances

    cfg = validate_mod.ValidateConfig(
        models=tuple(models), source=source, providers=tuple(providers.split(",")), data=data,
        batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed, tolerances=parse_tolerances(atol, rtol),
        locate=locate, chunk_size=chunk_size, junit=junit)
    with console.err.status("validating", spinner="dots") as status:
        result = validate_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_validate(result)
    if not result.passed:
        raise ParityError(f"validation failed: {len(result.failed)} of {len(result.comparisons)} comparisons differ "
                          "beyond tolerance", hint="loosen --atol/--rtol if the differences are acceptable")


@app.command()
@handled(json_flag=None)
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models; the first is the reference for ratios.")],
    source: Annotated[bool, typer.Option("--source/--no-source",
                                         help="Also time the first model's source framework model (from its "
                                              "manifest).")] = False,
    providers: Annotated[str, typer.Option(help="Providers, comma-separated (cpu, cuda, tensorrt); ones this "
                                                "ONNX Runtime lacks are skipped with a note.")] = "cpu",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    threads: Annotated[str, typer.Option(help="intra-op thread counts, comma-separated; 0 = all cores.")] = "0",
    iterations: Annotated[int, typer.Option(help="Timed calls per row.")] = 100,
    duration: Annotated[Optional[float], typer.Option(help="Seconds per row (stops at whichever of iterations and "
                                                           "duration comes first).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per row first.")] = 10,
    concurrency: Annotated[int, typer.Option(help="Threads sharing one session (server-like load).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = 0,
    baseline: Annotated[Optional[Path], typer.Option(help="A previous --json result to gate against.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed slowdown of p50 and p90 vs the baseline.")] = "10%",
    retries: Annotated[int, typer.Option(help="Re-measurements of a suspect row before it counts as "
                                              "regressed.")] = 2,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the full result (environment "
                                                                    "included) as JSON to this file; - for "
                                                                    "stdout.")] = None,
) -> None:
    """Measure latency percentiles and throughput, models side by side; gate against a baseline (exit 6).

    Example: mpack bench model.onnx model.int8.onnx --batch-sizes 1,8 --json bench.json
    """
    from mpack import bench as bench_mod
    from mpack.errors import RegressionError

    cfg = bench_mod.BenchConfig(
        models=tuple(models), source=source, providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
        batch_sizes=_int_list("--batch-sizes", batch_sizes), threads=_int_list("--threads", threads, minimum=0),
        iterations=iterations, duration=duration, warmup=warmup, concurrency=concurrency, seed=seed,
        baseline=baseline, max_regression=_fraction("--max-regression", max_regression), retries=retries)
    if json_path not in (None, "-") and not Path(json_path).parent.is_dir():
        from mpack.errors import ConfigError

        raise ConfigError("--json", json_path, f"directory {Path(json_path).parent} does not exist",
                          hint="create it first, or write the JSON elsewhere")
    try:
        with console.progress() as bar:
            result = bench_mod.run(cfg, progress=lambda total: bar.task("measuring", total))
    except RegressionError as exc:
        _emit_bench(exc.result, json_path)
        raise
    _emit_bench(result, json_path)


def _emit_bench(result, json_path: str | None) -> None:
    if json_path == "-":
        console.print_json(result.to_dict())
        return
    console.render_bench(result)
    if json_path:
        from mpack import manifest

        manifest.write_atomic(Path(json_path), result.to_dict())
        console.note(f"wrote {json_path}")


export_app = typer.Typer(help="Export to the engines users scale out on: Triton, Kubernetes / KServe.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("triton")
@handled()
def export_triton(
    model: Annotated[Path, typer.Argument(help="The .onnx model, or a deployment file (mpack.deploy.yaml): "
                                               "every model and version in it.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model repository directory to create.")],
    name: Annotated[Optional[str], typer.Option(help="Model name. Default: the file's stem.")] = None,
    version: Annotated[int, typer.Option(help="Version directory.")] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size (0: no batching).")] = 32,
    max_queue_delay_us: Annotated[int, typer.Option(help="dynamic_batching max queue delay, µs.")] = 5000,
    preferred_batch_sizes: Annotated[str, typer.Option(help="dynamic_batching preferred sizes, e.g. 8,16.")] = "",
    instances: Annotated[int, typer.Option(help="Instances per device.")] = 1,
    kind: Annotated[str, typer.Option(help="Instance kind: cpu or gpu.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write a Triton model repository: NAME/VERSION/model.onnx and config.pbtxt.

    Example: mpack export triton model.onnx -o repo/
    """
    from mpack import export as export_mod

    cfg = export_mod.TritonExportConfig(
        model=model, output=output, name=name, version=version, max_batch_size=max_batch_size,
        queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=_int_list("--preferred-batch-sizes", preferred_batch_sizes) if preferred_batch_sizes
        else (), instances=instances, kind=kind)
    _emit_export(export_mod.export_triton(cfg), json_out)


@export_app.command("k8s")
@handled()
def export_k8s(
    image: Annotated[str, typer.Option(help="The serving image, NAME:TAG or NAME@sha256:... (mpack build-image).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the manifests.")],
    name: Annotated[str, typer.Option(help="Name of the Kubernetes objects.")],
    deployment: Annotated[Optional[Path], typer.Argument(
        help="The deployment file the image serves (mpack.deploy.yaml): ports and canary weight come from it.")]
    = None,
    replicas: Annotated[int, typer.Option(help="Replicas (and the autoscaler's minimum).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="The autoscaler's maximum.")] = 4,
    target_cpu: Annotated[int, typer.Option(help="Autoscaling target CPU utilisation, %.")] = 70,
    cpu: Annotated[str, typer.Option(help="CPU request and limit.")] = "1",
    memory: Annotated[str, typer.Option(help="Memory request and limit.")] = "1Gi",
    http_port: Annotated[int, typer.Option(help="The server's REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="The server's gRPC port.")] = 8001,
    canary_percent: Annotated[Optional[int], typer.Option(help="KServe canaryTrafficPercent.")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace of the objects.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write Kubernetes Deployment, Service and HorizontalPodAutoscaler, and a KServe InferenceService (V2).

    Example: mpack export k8s --image registry/cnn:1.0 --name cnn -o k8s/
    """
    from mpack import export as export_mod

    cfg = export_mod.K8sExportConfig(
        image=image, output=output, name=name, replicas=replicas, max_replicas=max_replicas, target_cpu=target_cpu,
        cpu=cpu, memory=memory, http_port=http_port, grpc_port=grpc_port, canary_percent=canary_percent,
        namespace=namespace, deployment=deployment)
    _emit_export(export_mod.export_k8s(cfg), json_out)


def _emit_export(result, json_out: bool) -> None:
    if json_out:
        console.print_json(result.to_dict())
        return
    for text in result.notes:
        console.note(text)
    for file in result.files:
        console.out.print(f"[green]✓[/] {result.output / file}")


@app.command("build-image")
@handled()
def build_image(
    source: Annotated[Path, typer.Argument(
        metavar="MODEL|DEPLOY_FILE", help="An .onnx model (served under its file stem, version 1) or a deployment "
                                          "file (mpack.deploy.yaml / .json, as mpack serve --config reads it).")],
    tag: Annotated[str, typer.Option(help="Image tag NAME:VERSION, e.g. team/cnn:1.0.")],
    base: Annotated[Optional[str], typer.Option(
        help="Base image providing python3 3.11 with venv; pinned by digest (or local image ID) before use. "
             "Default: python:3.11-slim-bookworm.")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="CUDA variant: onnxruntime-gpu with CUDA/cuDNN wheels.")] = False,
    context_only: Annotated[Optional[Path], typer.Option(
        "--context-only", metavar="DIR", help="Write the build context (Dockerfile, locks, wheels, models) to DIR "
                                              "and build nothing.")] = None,
    max_size: Annotated[Optional[str], typer.Option(
        help="Size budget, e.g. 500MB or 1.5GB: exit 8 when the image is larger.")] = None,
    smoke: Annotated[bool, typer.Option("--smoke/--no-smoke", help="Run the image and check a V2 infer request "
                                                                   "per model against local ONNX Runtime.")] = True,
    name: Annotated[Optional[str], typer.Option(help="Served name of a single .onnx model. Default: its stem.")
    ] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="Extra image label KEY=VALUE (repeatable).")] = None,
    templates: Annotated[Optional[Path], typer.Option(
        help="A folder of templates searched before the built-in ones (override Dockerfile blocks).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Build a hash-pinned, hermetic serving image (no network during the build), then smoke-test it.

    Exit 7 when no engine is reachable, the base image cannot be pinned, the build or the smoke test fails;
    exit 8 when the image is over --max-size.

    Example: mpack build-image model.onnx --tag team/cnn:1.0 --max-size 500MB
    """
    from mpack import image as image_mod
    from mpack.errors import DockerError, SizeBudgetError

    cfg = image_mod.ImageConfig(
        source=source, tag=tag, base=base, gpu=gpu, context_only=context_only,
        max_size=image_mod.parse_size(max_size) if max_size is not None else None, smoke=smoke, name=name,
        labels=tuple(image_mod.parse_label(text) for text in label or ()), templates=templates)
    try:
        with console.build_progress() as show:
            result = image_mod.run(cfg, progress=show.status, on_build_event=show.event)
    except SizeBudgetError as exc:
        _emit_image(exc.result, json_out)
        raise
    except DockerError as exc:
        console.details(exc.details)
        raise
    _emit_image(result, json_out)


def _emit_image(result, json_out: bool) -> None:
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_image(result)


@app.command()
@handled()
def batch(
    model: Annotated[Path, typer.Argument(help="The .onnx model.")],
    input_: Annotated[Path, typer.Argument(metavar="INPUT", help="A .parquet, .npz, .npy or .jsonl file, or a "
                                                                 "directory of files of one format.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.parquet, .npz, .npy, .jsonl: the "
                                                                "suffix names the format) or a directory of parts.")],
    map_: Annotated[Optional[list[str]], typer.Option(
        "--map", help="Feed a model input from a column: INPUT=COLUMN (repeatable). Default: the column of the "
                      "input's name; a one-input model also takes the only column.")] = None,
    id_column: Annotated[Optional[str], typer.Option(
        "--id", help="A column copied to the output unchanged, to join the results back.")] = None,
    outputs: Annotated[Optional[str], typer.Option(help="Model outputs to write, comma-separated. Default: all.")
    ] = None,
    batch_size: Annotated[str, typer.Option(help="Rows per inference call, or auto (a short probe on the first "
                                                 "chunk picks it).")] = "auto",
    chunk_rows: Annotated[str, typer.Option(help="Rows per chunk: the unit of memory, part files and resume. "
                                                 "auto: about 32 MiB of input.")] = "auto",
    output_format: Annotated[Optional[str], typer.Option(
        "--format", help="Format of a directory output: parquet, npz, npy or jsonl. Default: parquet.")] = None,
    engine: Annotated[str, typer.Option(help="local, or ray (Ray Data; one ONNX Runtime session per actor).")
    ] = "local",
    restart: Annotated[bool, typer.Option("--restart", help="Discard an unfinished job's progress at this output "
                                                            "and start over.")] = False,
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers, comma-separated (cpu, cuda).")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="intra-op threads per session.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to run on (auto, ray://HOST:10001). Default: RAY_ADDRESS, else a local instance on "
             "127.0.0.1.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(help="Ray actors (one model session each). Default: the "
                                                           "cluster's CPUs / --threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Offline batch inference: read a table in chunks, run the model, write the results (resumable).

    Interrupted (Ctrl-C exits 130, or a crash)? Run the same command again: it continues where it stopped.

    Example: mpack batch model.onnx data.parquet -o scores.parquet --map x=features --id user_id
    """
    from mpack import batch as batch_mod
    from mpack.errors import ConfigError

    mapping = []
    for text in map_ or ():
        name, sep, column = text.partition("=")
        if not sep or not name or not column:
            raise ConfigError("--map", text, "is not INPUT=COLUMN", hint="e.g. --map pixels=image")
        mapping.append((name, column))
    cfg = batch_mod.BatchConfig(
        model=model, input=input_, output=output, mapping=tuple(mapping), id_column=id_column,
        outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()) if outputs else None,
        batch_size=_auto_int("--batch-size", batch_size), chunk_rows=_auto_int("--chunk-rows", chunk_rows),
        output_format=output_format, engine=engine, restart=restart,
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()), threads=threads,
        ray_address=ray_address, ray_actors=ray_actors)
    with console.rows_progress() as bar:
        result = batch_mod.run(cfg, progress=bar.update)
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_batch(result)


def _auto_int(field: str, text: str) -> int | None:
    from mpack.errors import ConfigError

    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(field, text, "is neither a number nor auto", hint="e.g. 256 or auto") from None
    if value < 1:
        raise ConfigError(field, text, "must be >= 1 or auto")
    return value


@app.command()
@handled()
def worker(
    model: Annotated[Path, typer.Argument(help="The .onnx model.")],
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL.")] = "redis://127.0.0.1:6379/0",
    stream: Annotated[str, typer.Option(help="Stream the jobs arrive on.")] = "mpack:jobs",
    group: Annotated[str, typer.Option(help="Consumer group shared by this model's workers.")] = "mpack-workers",
    name: Annotated[Optional[str], typer.Option(help="This worker's consumer name. Default: HOST-PID.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most rows per inference call (micro-batching whole jobs).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="After a job arrives, how long to wait for more to batch.")
    ] = 5.0,
    claim_idle: Annotated[float, typer.Option(
        help="Seconds a job may sit unacknowledged at another worker before this one claims it (set above the "
             "longest batch time).")] = 30.0,
    max_queue: Annotated[Optional[int], typer.Option(
        help="Waiting jobs at which submitters are refused (stored for the stream). Default: as stored, else "
             "1000.")] = None,
    result_ttl: Annotated[int, typer.Option(help="Seconds results are kept.")] = 3600,
    max_deliveries: Annotated[int, typer.Option(help="A job delivered this often (it keeps killing workers) is "
                                                     "failed instead.")] = 5,
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers, comma-separated (cpu, cuda).")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="intra-op threads.")] = None,
    max_jobs: Annotated[Optional[int], typer.Option(help="Stop after this many jobs. Default: run until "
                                                         "SIGINT/SIGTERM.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final counts as JSON on stdout.")] = False,
) -> None:
    """Serve queued inference jobs from a Redis stream (at-least-once; see mpack.queue for the client side).

    SIGINT or SIGTERM stops it after the batch in flight; a killed worker's jobs are claimed by another.

    Example: mpack worker model.onnx --redis redis://127.0.0.1:6379/0 --stream jobs:cnn
    """
    import signal
    import threading

    from mpack import queue as queue_mod
    from mpack._optional import require
    from mpack.errors import ConfigError, InputFileError, QueueServiceError

    require("redis")

    for field, value, low in (("--max-batch", max_batch, 1), ("--result-ttl", result_ttl, 1),
                              ("--max-deliveries", max_deliveries, 1), ("--max-queue", 1 if max_queue is None else max_queue, 1)):
        if value < low:
            raise ConfigError(field, value, f"must be >= {low}")
    if claim_idle <= 0 or max_wait_ms < 0:
        raise ConfigError("--claim-idle" if claim_idle <= 0 else "--max-wait-ms",
                          claim_idle if claim_idle <= 0 else max_wait_ms, "must be positive")
    cfg = queue_mod.WorkerConfig(
        model=model, url=redis_url, stream=stream, group=group, consumer=name, max_batch=max_batch,
        max_wait_ms=max_wait_ms, claim_idle_s=claim_idle, result_ttl_s=result_ttl, max_queue=max_queue,
        max_deliveries=max_deliveries, providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
        threads=threads, max_jobs=max_jobs)
    stop = threading.Event()

    def on_signal(signum, frame):  # first signal: finish the batch in flight; second: stop now
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        job_worker = queue_mod.Worker(cfg)
        job_worker.start()
        console.err.print(f"worker {console._escape(job_worker.name)} consuming {console._escape(stream)} "
                          f"(group {console._escape(group)}) on {queue_mod.redact(redis_url)}")
        with console.err.status("waiting for jobs", spinner="dots") as status:
            result = job_worker.run(stop, on_step=lambda r: status.update(
                f"{r.jobs} jobs ({r.failed} failed, {r.reclaimed} reclaimed) in {r.batches} batches"))
    except queue_mod.WorkerConfigError as exc:
        raise InputFileError(exc.message, hint=exc.hint) from None
    except queue_mod.QueueError as exc:
        raise QueueServiceError(exc.message, hint=exc.hint) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_worker(result)


@app.command()
@handled(json_flag=None)
def serve(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Models: PATH, NAME=PATH or NAME:VERSION=PATH (repeat a name for more versions; its first is the "
             "primary). Default: the deployment file's.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Deployment file (YAML or JSON). "
                                                   "Default: MPACK_SERVE_CONFIG, else ./mpack.deploy.yaml.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind. Default 127.0.0.1 (loopback only).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="REST port; 0 picks a free one. Default 8000.")] = None,
    grpc_port: Annotated[Optional[str], typer.Option(help="gRPC port; 0 picks a free one, off disables. "
                                                          "Default 8001.")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Most samples per run; 1 turns batching off. "
                                                               "Default 32.")] = None,
    max_queue_delay_ms: Annotated[Optional[float], typer.Option(
        help="Longest a batch waits to reach a preferred size. Default 5.")] = None,
    max_queue_size: Annotated[Optional[int], typer.Option(
        help="Most waiting requests per model version; more get 503 / UNAVAILABLE. Default 256.")] = None,
    preferred_batch_sizes: Annotated[Optional[str], typer.Option(
        help="Batch sizes worth waiting for, e.g. 8,16. Default none (greedy).")] = None,
    instances: Annotated[Optional[int], typer.Option(help="Concurrent runs per model version. Default 1.")] = None,
    canary: Annotated[Optional[list[str]], typer.Option(help="NAME:VERSION=WEIGHT, e.g. cnn:2=10%.")] = None,
    shadow: Annotated[Optional[list[str]], typer.Option(help="NAME:VERSION[=LOG.jsonl]: mirror requests to it.")
    ] = None,
    ab: Annotated[Optional[list[str]], typer.Option(help="NAME:V1=W1,V2=W2 sticky A/B split, e.g. cnn:1=50,2=50.")
    ] = None,
    providers: Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu, cuda. Default auto.")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="intra-op threads per session; 0 = ONNX Runtime's "
                                                        "choice. Default 0.")] = None,
    max_request_bytes: Annotated[Optional[int], typer.Option(help="Larger bodies get 413. Default 64 MiB.")] = None,
    access_log: Annotated[Optional[bool], typer.Option("--access-log/--no-access-log",
                                                       help="JSON access log lines on stderr. Default on.")] = None,
    drain_timeout: Annotated[Optional[float], typer.Option(help="Seconds in-flight requests get after SIGTERM. "
                                                                "Default 30.")] = None,
    drain_delay: Annotated[Optional[float], typer.Option(help="Seconds to keep serving while not-ready after "
                                                              "SIGTERM. Default 0.")] = None,
    admin_token: Annotated[Optional[str], typer.Option(help="Bearer token the admin endpoints require.")] = None,
    queue: Annotated[Optional[str], typer.Option(
        help="Redis URL of the job queue behind POST /v2/models/{m}/jobs, e.g. redis://127.0.0.1:6379/0. "
             "Default: none (job endpoints off).")] = None,
    queue_stream: Annotated[Optional[str], typer.Option(
        help="Stream of a model's jobs, {model} standing for its name. Default mpack:jobs:{model}.")] = None,
    queue_max_jobs: Annotated[Optional[int], typer.Option(
        help="Waiting jobs at which more are refused (503). Default: the stream's bound (mpack worker "
             "--max-queue), else 1000.")] = None,
    callback_host: Annotated[Optional[list[str]], typer.Option(
        help="Host a job's parameters.callback_url may point at (repeat for more). Default: none (callback URLs "
             "refused).")] = None,
    max_concurrency: Annotated[Optional[int], typer.Option(
        help="Most connections/requests in flight per listener; past it 503 / RESOURCE_EXHAUSTED. Default 4 x "
             "the versions' max-queue-size, at least 64.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved configuration as "
                                                                      "JSON and exit.")] = False,
) -> None:
    """Serve ONNX models over the V2 inference protocol (REST + gRPC) with batching and canary/shadow/A-B routing.

    Runs until SIGTERM or Ctrl+C, then drains. Example: mpack serve cnn=cnn.onnx --http-port 8000 --grpc-port 8001
    """
    from mpack._optional import is_available
    from mpack.errors import MissingDependencyError
    from mpack.serving import ServeConfigError, load_config

    overrides = {
        "host": host, "http_port": http_port, "grpc_port": grpc_port, "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms, "max_queue_size": max_queue_size,
        "preferred_batch_sizes": preferred_batch_sizes, "instances": instances, "providers": providers,
        "threads": threads, "max_request_bytes": max_request_bytes, "access_log": access_log,
        "drain_timeout_s": drain_timeout, "drain_delay_s": drain_delay, "admin_token": admin_token, "queue": queue,
        "queue_stream": queue_stream, "queue_max_jobs": queue_max_jobs,
        "callback_hosts": tuple(callback_host) if callback_host else None, "max_concurrency": max_concurrency}
    try:
        cfg = load_config(tuple(models or ()), config_file=config, overrides=overrides, canary=tuple(canary or ()),
                          shadow=tuple(shadow or ()), ab=tuple(ab or ()))
        if print_config:
            console.print_json(cfg.to_dict())
            return
        needed = (("onnxruntime", "cpu"), ("uvicorn", "serve"), ("grpc", "serve"))
        for module, extra in needed + ((("redis", "serve"),) if cfg.queue else ()):
            if not is_available(module):
                raise MissingDependencyError(f"mpack serve needs the Python package '{module}', which is not "
                                             "installed", hint=f"install it with: pip install 'mpack[{extra}]'")
        from mpack.serving.server import serve as run_server

        code = run_server(cfg)
    except ServeConfigError as exc:
        raise MpackError(exc.message, hint=exc.hint) from None
    raise typer.Exit(code)


def _fraction(field: str, text: str) -> float:
    from mpack.errors import ConfigError

    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise ConfigError(field, text, "is not a number or percentage", hint="e.g. 10%") from None
    if value < 0:
        raise ConfigError(field, text, "must be >= 0")
    return value


def _int_list(field: str, text: str, minimum: int = 1) -> tuple[int, ...]:
    from mpack.errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(field, text, "is not a comma-separated list of integers", hint="e.g. 1,4") from None
    if not values or min(values) < minimum:
        raise ConfigError(field, text, f"must list integers >= {minimum}", hint="e.g. 1,4")
    return values


def main() -> None:
    app()
