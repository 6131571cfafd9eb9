"""The ``neuroray`` command.

Each subcommand is a thin shell over a library function. Input errors (a
:class:`~neuroray.errors.NeurorayError`) print one line and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from neuroray.errors import NeurorayError

if TYPE_CHECKING:
    from neuroray.registry import Registry
    from neuroray.trainers.methods import PretrainMethod

EXIT_USAGE = 2


class NeurorayParser(argparse.ArgumentParser):
    """An argparse parser whose job commands list their config keys in ``--help``.

    ``keys_from`` (set by :func:`_add_job_arguments`) returns the job's pydantic model; it is
    called only when help is shown, so building the parser imports no job module.
    """

    keys_from: Callable[[], type] | None = None

    def format_help(self) -> str:
        text = super().format_help()
        if self.keys_from is None:
            return text
        from neuroray.config_docs import keys_table

        return (
            f"{text}\nconfig keys (KEY=VALUE overrides; type = default before the YAML; "
            f"--print-config shows the resolved job):\n{keys_table(self.keys_from())}\n"
        )


class ConfigPrinted(Exception):
    """``--print-config`` printed the resolved job: stop before any work (exit 0)."""


def _parse_chunks(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must be z,y,x integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"chunks must be 3 positive integers z,y,x, got {text!r}")
    return values  # type: ignore[return-value]


def _parse_voxel_size(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"voxel size must be z,y,x numbers (nm), got {text!r}"
        ) from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"voxel size must be 3 positive numbers z,y,x (nm), got {text!r}"
        )
    return values  # type: ignore[return-value]


def _parse_roi(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"roi must be 6 integers, got {text!r}") from None
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"roi must be z0,y0,x0,z1,y1,x1, got {text!r}")
    return values


# ---------------------------------------------------------------------- data
def cmd_data_info(args: argparse.Namespace) -> None:
    from neuroray.platform.ingest import read_manifest
    from neuroray.platform.volume import open_volume

    volume = open_volume(args.url)
    info = volume.info()
    manifest = None
    if volume.format_name in ("precomputed", "zarr"):  # only ingested layers carry a manifest
        try:
            manifest = read_manifest(args.url)
        except (NeurorayError, ValueError, OSError):
            manifest = None
    if manifest is not None:
        table = manifest.to_pandas()
        info["manifest"] = {"chunks": len(table)}
        if table["foreground_fraction"].notna().any():
            info["manifest"]["mean_foreground_fraction"] = round(
                float(table["foreground_fraction"].mean()), 4
            )
            info["manifest"]["max_ids_per_chunk"] = int(table["n_ids"].max())
        else:
            info["manifest"]["mean_intensity"] = round(float(table["mean"].mean()), 3)
    print(json.dumps(_finite(info), indent=2, allow_nan=False))


def _finite(value):
    """``value`` with NaN / Inf floats as None, so the JSON stays valid (``null``)."""
    import math

    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cmd_data_ingest(args: argparse.Namespace) -> None:
    from neuroray.platform.ingest import format_of_output, ingest
    from neuroray.view import view_command

    labels = True if args.labels else (False if args.image else None)
    if args.multiscale and format_of_output(args.dst) != "precomputed":
        raise NeurorayError("--multiscale adds levels to precomputed layers; drop it for zarr")
    result = ingest(
        args.src,
        args.dst,
        chunk_shape=args.chunks,
        labels=labels,
        overwrite=args.overwrite,
        repair=args.repair,
        voxel_size=args.voxel_size,
    )
    print(result.summary())
    if args.multiscale:
        from neuroray.platform.multiscale import add_levels

        levels = add_levels(args.dst)
        print(
            f"{args.dst}: downsampled levels 1-{levels} added"
            if levels
            else f"{args.dst}: no downsampled level: it is under two chunks across"
        )
    print(f"view: {view_command(args.dst)}")


def cmd_data_lm(args: argparse.Namespace) -> None:
    from neuroray.errors import ConfigError
    from neuroray.platform.lm_data import prepare_lm_stacks
    from neuroray.view import view_command

    if len(args.stacks) % 2:
        raise ConfigError("give TIFF and SWC files in pairs: STACK.tif STACK.swc [...]")
    pairs = list(zip(args.stacks[::2], args.stacks[1::2], strict=True))
    layers = prepare_lm_stacks(
        pairs,
        args.dst,
        radius_floor_px=args.radius_floor_px,
        gap_z=args.gap_z,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"image: {layers.image}\nlabels: {layers.labels}")
    print(f"view: {view_command(layers.image, layers.labels)}")
    for name, box in layers.stacks.items():
        print(f"{name}: roi {box.to_list()}")


def cmd_data_synth(args: argparse.Namespace) -> None:
    from neuroray.platform.synthetic import write_synthetic

    for name, url in write_synthetic(args.kind, args.dst, shape=args.shape, seed=args.seed).items():
        print(f"{name}: {url}")


# ---------------------------------------------------------------------- training jobs
def _add_job_arguments(
    parser: argparse.ArgumentParser,
    config_required: bool = True,
    job: Callable[[], type] | None = None,
) -> None:
    """The YAML + overrides arguments of a job command; ``job`` returns its pydantic model (for
    the keys listed in --help and by ``neuroray config show``)."""
    what = "CONFIG.yaml" if config_required else "[CONFIG.yaml]"
    parser.add_argument(
        "args",
        nargs="+" if config_required else "*",
        metavar=f"{what} KEY=VALUE",
        help="a job YAML (see configs/) and dotted overrides, e.g. run.steps=200",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved job (YAML + overrides + defaults) as YAML and exit",
    )
    parser.set_defaults(config_required=config_required)
    if isinstance(parser, NeurorayParser):
        parser.keys_from = job


def _job_class(module: str) -> Callable[[], type]:
    """A loader of ``module.JOB_CLASS`` (imported only when asked)."""

    def load() -> type:
        import importlib

        return importlib.import_module(module).JOB_CLASS

    return load


def _segment_job() -> type:
    from neuroray.segmentation.blockwise import SegmentJob

    return SegmentJob


def job_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, NeurorayParser]:
    """Every job command under ``parser`` by its words (``"pretrain mae"``, ``"segment"``)."""
    found = {}
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                words = f"{prefix}{name}"
                if getattr(sub, "keys_from", None) is not None:
                    found[words] = sub
                found.update(job_commands(sub, f"{words} "))
    return found


def cmd_config_show(args: argparse.Namespace) -> None:
    from neuroray.config_docs import keys_table
    from neuroray.errors import ConfigError
    from neuroray.registry import closest

    commands = job_commands(args.root)
    name = " ".join(args.job)
    if name not in commands:
        hint = closest(name, list(commands))
        raise ConfigError(
            f"no job command {name!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" (jobs: {', '.join(commands)})"
        )
    model = commands[name].keys_from()
    print(f"neuroray {name}: {model.__name__} (KEY=VALUE overrides; type = default)")
    print(keys_table(model, full=True))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from neuroray import __version__

    parts = []
    for package in ("ray", "torch"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return f"neuroray {__version__}" + (f" ({', '.join(parts)})" if parts else "")


def _load_job(model: type, args: argparse.Namespace):
    from neuroray.config import load_config
    from neuroray.errors import ConfigError
    from neuroray.paths import check_inputs

    paths = [a for a in args.args if "=" not in a]
    overrides = [*getattr(args, "fixed_overrides", []), *(a for a in args.args if "=" in a)]
    if len(paths) > 1 or (args.config_required and not paths):
        raise ConfigError(f"give one config YAML followed by KEY=VALUE overrides (got {args.args})")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    job = load_config(model, paths[0] if paths else None, overrides)
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
        raise ConfigPrinted
    check_inputs(job)  # before Ray starts: a missing layer should not cost a cluster start-up
    return job


def _report_training(result) -> None:
    metrics = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(
        json.dumps(
            {
                "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "metrics": metrics,
            },
            indent=2,
        )
    )


def pretrain_methods() -> Registry[PretrainMethod]:
    """Every registered pretraining method (cheap: each loads its module on first use)."""
    import neuroray.agents  # noqa: F401 - registers dbmim (the RL side is its home)
    from neuroray.trainers.methods import PRETRAIN_METHODS

    return PRETRAIN_METHODS


def cmd_pretrain(args: argparse.Namespace) -> None:
    method = pretrain_methods().get(args.method)
    _report_training(method.run(_load_job(method.job_class, args)))


# A job module for cmd_job defines JOB_CLASS (its pydantic config) and run_job(job) -> Result.
def cmd_job(args: argparse.Namespace) -> None:
    import importlib

    module = importlib.import_module(args.job_module)
    _report_training(module.run_job(_load_job(module.JOB_CLASS, args)))


def cmd_pretrain_2d(args: argparse.Namespace) -> None:
    from neuroray.models import pretrain2d

    print(pretrain2d.run_job(_load_job(pretrain2d.JOB_CLASS, args)).summary())


def cmd_tune(args: argparse.Namespace) -> None:
    from neuroray.tuning import sweeps

    print(sweeps.run_job(_load_job(sweeps.JOB_CLASS, args)).summary())


def cmd_segment(args: argparse.Namespace) -> None:
    from neuroray.segmentation.blockwise import SegmentJob, segment
    from neuroray.view import view_command

    args.args = [
        *args.args,
        *(["mesh=true"] if args.mesh else []),
        *(["multiscale=true"] if args.multiscale else []),
    ]
    result = segment(_load_job(SegmentJob, args))
    print(result.summary())
    for name, url in result.layers.items():
        print(f"{name}: precomputed://file://{Path(url).resolve()}")
    print(f"view: {view_command(result.output)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from neuroray.segmentation.evaluate import evaluate_layers
    from neuroray.view import view_command

    report = evaluate_layers(
        args.segmentation,
        args.labels,
        task=args.task,
        roi=args.roi,
        image=args.image,
        out=args.out,
        border_threshold_nm=args.border_nm,
        swc=args.swc,
    )
    print(report.table())
    shown = [args.image] if args.image else []
    labels = [] if args.labels.lower().endswith(".swc") else [args.labels]
    print(f"view: {view_command(*shown, *labels, args.segmentation)}")


# ---------------------------------------------------------------------- export
def cmd_export_swc(args: argparse.Namespace) -> None:
    from neuroray.segmentation.export import export_swc

    tree = export_swc(
        args.segmentation,
        args.swc,
        roi=args.roi,
        dust_voxels=args.dust_voxels,
        scale=args.scale,
        const_nm=args.const_nm,
    )
    trees = len(tree.roots)
    print(f"{args.swc}: {len(tree)} nodes in {trees} tree{'s' * (trees != 1)} (voxel coordinates)")


# ---------------------------------------------------------------------- view
def cmd_view(args: argparse.Namespace) -> None:
    from neuroray.view import run_view

    run_view(
        args.layers,
        bind=args.bind,
        port=args.port,
        screenshot_png=args.screenshot,
        size=args.size,
        layout=args.layout,
        timeout_s=args.timeout,
    )


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if min(width, height) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from neuroray.demo import run_demo

    run_demo(args.out, address=args.address, fresh=args.fresh)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = NeurorayParser(
        prog="neuroray",
        description="Pretrain and fine-tune neuron segmentation models for 3D microscopy, on Ray.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="inspect, ingest and synthesise volumes")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    info = data_commands.add_parser("info", help="shape, dtype, voxel size, chunks, manifest")
    info.add_argument("url", help="volume URL: precomputed://…, x.zarr, f.h5#key, s.tif, a.npy")
    info.set_defaults(func=cmd_data_info)

    ingest = data_commands.add_parser(
        "ingest", help="convert a volume into a chunked precomputed or zarr v3 layer + manifest"
    )
    ingest.add_argument("src", help="source volume URL")
    ingest.add_argument("dst", help="destination: a directory (precomputed) or a *.zarr path")
    ingest.add_argument(
        "--chunks", type=_parse_chunks, default=(64, 64, 64), help="chunk shape z,y,x"
    )
    kind = ingest.add_mutually_exclusive_group()
    kind.add_argument("--labels", action="store_true", help="write a segmentation layer")
    kind.add_argument("--image", action="store_true", help="write an image layer")
    ingest.add_argument(
        "--voxel-size",
        type=_parse_voxel_size,
        default=None,
        metavar="Z,Y,X",
        help="voxel size in nm (default: what the source records; 1,1,1 with a warning if none)",
    )
    ingest.add_argument(
        "--overwrite", action="store_true", help="replace an existing layer instead of resuming"
    )
    ingest.add_argument(
        "--repair", action="store_true", help="rewrite the chunks of the layer that fail to decode"
    )
    ingest.add_argument(
        "--multiscale",
        action="store_true",
        help="add downsampled levels (precomputed; images averaged, labels by mode)",
    )
    ingest.set_defaults(func=cmd_data_ingest)

    lm = data_commands.add_parser(
        "lm",
        help="light-microscopy stacks + gold SWCs -> aligned image and rasterised label layers",
    )
    lm.add_argument("dst", help="output directory (image/ and labels/ layers)")
    lm.add_argument("stacks", nargs="+", metavar="TIF SWC", help="pairs of stack and its SWC")
    lm.add_argument(
        "--radius-floor-px", type=float, default=2.0, help="minimum neurite radius (x pixels)"
    )
    lm.add_argument("--gap-z", type=int, default=32, help="empty slices between stacks")
    lm.add_argument(
        "--overwrite", action="store_true", help="replace existing layers instead of resuming"
    )
    lm.set_defaults(func=cmd_data_lm)

    synth = data_commands.add_parser("synth", help="write a synthetic EM or LM volume")
    synth.add_argument("kind", choices=["em", "lm"])
    synth.add_argument("dst", help="output directory")
    synth.add_argument("--shape", type=_parse_chunks, default=None, help="z,y,x voxels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining on Ray Train")
    methods = pretrain.add_subparsers(dest="method", metavar="METHOD", required=True)
    registered = pretrain_methods()
    for name in registered:
        method = methods.add_parser(name, help=registered.get(name).help)
        _add_job_arguments(method, job=lambda name=name: registered.get(name).job_class)
        method.set_defaults(func=cmd_pretrain)

    finetune = commands.add_parser("finetune", help="fine-tune a UNETR for segmentation")
    tasks = finetune.add_subparsers(dest="task", metavar="TASK", required=True)
    from neuroray.segmentation.tasks import TASKS

    for name in TASKS:
        task = tasks.add_parser(name, help=TASKS.get(name).help)
        _add_job_arguments(task, job=_job_class("neuroray.trainers.finetune"))
        task.set_defaults(
            func=cmd_job, job_module="neuroray.trainers.finetune", fixed_overrides=[f"task={name}"]
        )

    models = commands.add_parser("models", help="model utilities")
    model_commands = models.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pretrain_2d = model_commands.add_parser(
        "pretrain-2d",
        help="pretrain a small 2D ViT on scikit-image's bundled photographs (offline stand-in "
        "for natural-image weights; use as finetune model.init=file:...)",
    )
    _add_job_arguments(
        pretrain_2d, config_required=False, job=_job_class("neuroray.models.pretrain2d")
    )
    pretrain_2d.set_defaults(func=cmd_pretrain_2d)

    tune = commands.add_parser(
        "tune", help="Ray Tune sweep of a fine-tuning job (ASHA, resumable, writes the best job)"
    )
    _add_job_arguments(tune, job=_job_class("neuroray.tuning.sweeps"))
    tune.set_defaults(func=cmd_tune)

    seg = commands.add_parser(
        "segment", help="blockwise prediction + agglomeration of a whole volume on Ray"
    )
    _add_job_arguments(seg, config_required=False, job=_segment_job)
    seg.add_argument(
        "--mesh", action="store_true", help="mesh the objects for 3D views (same as mesh=true)"
    )
    seg.add_argument(
        "--multiscale",
        action="store_true",
        help="add downsampled levels to the outputs (same as multiscale=true)",
    )
    seg.set_defaults(func=cmd_segment)

    evaluate = commands.add_parser(
        "evaluate", help="VOI / ARAND (EM) or Dice / IoU (binary) of a segmentation vs labels"
    )
    evaluate.add_argument("segmentation", help="segmentation layer URL")
    evaluate.add_argument(
        "labels", help="ground-truth layer URL (or, with --task lm, a gold .swc of the box)"
    )
    evaluate.add_argument(
        "--task",
        choices=[*TASKS, "binary"],
        default="em",
        help="the task whose metrics to report (binary: Dice / IoU of any foreground mask)",
    )
    evaluate.add_argument("--roi", type=_parse_roi, default=None, help="z0,y0,x0,z1,y1,x1")
    evaluate.add_argument("--image", default=None, help="image layer for the PNG preview")
    evaluate.add_argument("--out", default=None, help="folder for metrics.json and preview.png")
    evaluate.add_argument(
        "--border-nm", type=float, default=None, help="CREMI border mask: ignore GT boundaries"
    )
    evaluate.add_argument(
        "--swc",
        default=None,
        help="--task lm: gold SWC (voxel coordinates of the evaluated box) for ESA / DSA / PDS "
        "and node precision / recall / F1",
    )
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser("export", help="write outputs in other tools' formats")
    export_commands = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    swc = export_commands.add_parser(
        "swc",
        help="skeletonise an LM segmentation (its foreground) into an SWC tree with kimimaro",
    )
    swc.add_argument(
        "segmentation", help="segmentation layer URL or a `neuroray segment` output folder"
    )
    swc.add_argument("swc", help="the SWC file to write (x, y, z in voxels of the box)")
    swc.add_argument("--roi", type=_parse_roi, default=None, help="z0,y0,x0,z1,y1,x1")
    swc.add_argument(
        "--dust-voxels", type=int, default=20, help="skip components with fewer voxels"
    )
    swc.add_argument(
        "--scale", type=float, default=1.5, help="TEASAR: invalidation radius per boundary distance"
    )
    swc.add_argument(
        "--const-nm", type=float, default=1000.0, help="TEASAR: constant invalidation radius (nm)"
    )
    swc.set_defaults(func=cmd_export_swc)

    view = commands.add_parser(
        "view",
        help="show layers or a segment output folder in Neuroglancer (served offline on this "
        "machine), or --screenshot one view to a PNG",
    )
    view.add_argument(
        "layers",
        nargs="+",
        metavar="LAYER_OR_OUTPUT",
        help="layer URLs (precomputed, zarr, f.h5#key, tif, npy) or `neuroray segment` outputs",
    )
    view.add_argument("--screenshot", metavar="PNG", default=None, help="render, save and exit")
    view.add_argument("--size", type=_parse_size, default=(1280, 960), help="screenshot WxH")
    view.add_argument(
        "--layout", default="4panel", choices=["4panel", "xy", "xz", "yz", "3d", "xy-3d"]
    )
    view.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    view.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    view.add_argument(
        "--timeout", type=float, default=180.0, help="seconds a screenshot may take to render"
    )
    view.set_defaults(func=cmd_view)

    demo = commands.add_parser(
        "demo", help="the whole pipeline on synthetic data with an embedded Ray"
    )
    demo.add_argument("--out", default="demo_out", help="where the demo writes everything")
    demo.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="delete --out first, if the demo made it (else a rerun resumes)",
    )
    demo.set_defaults(func=cmd_demo)

    config = commands.add_parser("config", help="what a job command accepts")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser(
        "show", help="every config key of a job with its type, default and description"
    )
    show.add_argument(
        "job", nargs="+", metavar="JOB", help="e.g. pretrain mae, finetune em, segment"
    )
    show.set_defaults(func=cmd_config_show, root=parser)

    for extend in EXTENSIONS:
        extend(commands)
    return parser


# Later subsystems (pretrain, finetune, segment, evaluate, tune) add their subcommands here.
EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings.showwarning's signature
    """neuroray's own warnings (e.g. NaN voxels at ingest) read like its errors: one line."""
    if not str(filename).startswith(_PACKAGE_DIR):
        _show_warning(message, category, filename, lineno, file, line)
        return
    print(f"neuroray: warning: {message}", file=file or sys.stderr)


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _warn_in_one_line
    try:
        args.func(args)
    except ConfigPrinted:
        return 0
    except NeurorayError as err:
        print(f"neuroray: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neuroray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
