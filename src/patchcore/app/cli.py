"""``patchcore`` command line: a thin layer over the application's commands (train, evaluate, predict).

patchcore train --config configs/elpv.yaml [key=value ...]
patchcore evaluate --model results/elpv/default/models --config configs/elpv.yaml
patchcore predict --model patchcore_mono.pt image.png folder/ --out predictions/
patchcore calibrate --model patchcore_mono.pt good_parts/ --false-alarm-rate 0.01
patchcore update --model patchcore_mono.pt new_good_parts/ --note "supplier B"   (learn more good parts)
patchcore history --model patchcore_mono.pt
patchcore rollback --model patchcore_mono.pt --to 0      (or --remove VERSION: undo one update)
patchcore serve --model patchcore_mono.pt --port 8000
patchcore export --model patchcore_mono.pt --format onnx --out exported/
patchcore train -c configs/mvtec.yaml --ray [ADDRESS]      (objects as Ray tasks)
patchcore train --resume results/mvtec/default             (continue an interrupted run)
patchcore federated -c configs/federated.yaml              (clients' local banks merged by a server)
patchcore audit -c configs/elpv.yaml good_parts/           (which "good" images look defective)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..data import DataError
    from ..deploy.calibration import CalibrationError
    from ..deploy.errors import DeployError
    from ..distributed.ray_runner import DistributedError
    from ..distributed.sharded import ShardError
    from ..engine.backbones import BackboneError
    from ..engine.model import ModelFileError, NonFiniteError, UpdateError
    from ..engine.params import ParamError
    from .config import ConfigError
    from .runs import OutputError
    from .tracking import TrackingError
    from .train import ObjectsFailedError

    return (
        ConfigError, DataError, BackboneError, ModelFileError, NonFiniteError, ParamError, OutputError,
        TrackingError, FileNotFoundError, CalibrationError, DeployError, DistributedError, ShardError,
        ObjectsFailedError, UpdateError,
    )  # fmt: skip


def _one_line(exc: BaseException) -> str:
    """The error message on one line.

    An error raised in a DataLoader worker comes back with the worker's whole traceback in its message
    (torch's ExceptionWrapper): keep the original message, its last line. Other multi-line messages (torch.load
    explains itself over several lines) are joined.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and any(line.startswith("Original Traceback") for line in lines):
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if starts:
            return " ".join([lines[starts[-1]][len(prefix) :], *lines[starts[-1] + 1 :]])
        return lines[-1]
    return " ".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``patchcore train: error: ...``, exit status 2.

    ``epilog_fn`` (optional): the epilog, computed when help is shown (the data kinds need an import).
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        epilog_fn = getattr(self, "epilog_fn", None)
        if epilog_fn is not None:
            self.epilog = epilog_fn()
        return super().format_help()


def _data_kinds_epilog() -> str:
    from .starter import data_kinds_help

    return data_kinds_help()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _until(text: str) -> str | float | int:
    """``--until``: radius, a fraction in (0, 1] (with a decimal point) or a row count."""
    from ..engine.updates import UpdateRule

    value: str | float | int
    try:
        value = text if text == "radius" else float(text) if "." in text else int(text)
        UpdateRule.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be radius, a fraction in (0, 1] or a count >= 1 ({exc})") from None
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return value


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a version number (an integer >= 0), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a version number (an integer >= 0), got {value}")
    return value


# --false-alarm-rate: below 1e-6 no realistic set of good images certifies it (a million of them); at 0.5 or
# above the "threshold" flags most good parts, which is not a false-alarm rate anyone means.
RATE_RANGE = (1e-6, 0.5)


def _false_alarm_rate(text: str) -> float:
    low, high = RATE_RANGE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [{low:g}, {high:g}), got {text!r}") from None
    if not low <= value < high:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}), got {text}")
    return value


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServiceSettings` field: its flag, help, default and range come from there."""
    from ..deploy.settings import parse_option, serve_options

    for name, option, default in serve_options():

        def parse(text: str, option=option) -> typing.Any:
            try:
                return parse_option(option, text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        shown = default if option.scale == 1 or default is None else default / option.scale
        parser.add_argument(
            option.flag, dest=f"serve_{name}", type=parse, default=None,
            action="append" if option.repeat else "store",
            metavar=option.flag.removeprefix("--").upper().replace("-", "_"),
            help=f"{option.help}" + (f"; one of {', '.join(option.choices)}" if option.choices else "")
            + (f" (default {shown})" if shown not in (None, ()) else ""),
        )  # fmt: skip


def _serve_settings(args: argparse.Namespace) -> typing.Any:
    """The :class:`ServiceSettings` of a ``serve`` command line (flags not given keep the dataclass default)."""
    from ..deploy.settings import ServiceSettings, serve_options

    given: dict[str, typing.Any] = {}
    for name, _, _ in serve_options():
        value = getattr(args, f"serve_{name}")
        if value is not None:
            given[name] = tuple(value) if isinstance(value, list) else value  # a repeated flag: a tuple
    return ServiceSettings(**given)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchcore", description="PatchCore industrial anomaly detection")
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train", help="fit, save and evaluate one model per object of a data set",
        usage="%(prog)s [-c CONFIG | FOLDER] [KEY=VALUE ...] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.epilog_fn = _data_kinds_epilog  # type: ignore[attr-defined]
    train.add_argument(
        "--config", "-c", help="YAML configuration (configs/elpv.yaml, mvtec.yaml, autovi.yaml; patchcore init)"
    )
    train.add_argument(
        "overrides", nargs="*", metavar="FOLDER | KEY=VALUE",
        help="a folder of your images instead of a config (kind folder, the paper's settings), and/or "
        "overrides of any key, e.g. model.percentage=0.01 (every key: patchcore params)",
    )  # fmt: skip
    train.add_argument(
        "--log-online", choices=["wandb", "mlflow"], help="send metrics to W&B or MLflow (extras)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="train objects as Ray tasks (extra patchcore[ray]); ADDRESS: auto, host:port; none: a local cluster",
    )  # fmt: skip
    train.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted run in RUN_DIR: finished objects with the same config are kept",
    )  # fmt: skip
    train.add_argument(
        "--restart-changed", action="store_true",
        help="with --resume: accept a configuration that differs from the run's (each changed key is logged)",
    )  # fmt: skip

    federated = sub.add_parser(
        "federated", help="clients build local banks on their images; the server merges them into one model"
    )
    federated.add_argument("--config", "-c", required=True, help="YAML configuration with a federated section")
    federated.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    federated.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="clients as Ray actors")
    federated.add_argument("--no-progress", action="store_true")

    evaluate = sub.add_parser("evaluate", help="re-evaluate saved models on a data set's test split")
    evaluate.add_argument(
        "--model", "-m", action="append", required=True, help="model file or folder (repeatable)"
    )
    evaluate.add_argument("--config", "-c", help="YAML configuration giving the data set and output folder")
    evaluate.add_argument("--data", help="data set kind (mvtec, autovi, folder, elpv); overrides the config")
    evaluate.add_argument("--root", help="data set folder; overrides the config")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--weights", help="backbone weights file, if not where the model was fitted")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    evaluate.add_argument("--no-progress", action="store_true")

    predict = sub.add_parser("predict", help="score images with a saved model; heatmaps and JSON lines")
    predict.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument(
        "--out", "-o", default="predictions", help="folder for heatmaps and predictions.jsonl"
    )
    predict.add_argument("--device", default="auto")
    predict.add_argument("--weights", help="backbone weights file, if not where the model was fitted")
    predict.add_argument("--overwrite", action="store_true", help="replace earlier results in a non-empty --out")
    predict.add_argument("--batch-size", type=_positive_int, default=None, help="images per pass (>= 1)")
    predict.add_argument("--no-heatmaps", action="store_true")

    predict.add_argument("--masks", action="store_true", help="also write binary mask PNGs (calibrated)")
    predict.add_argument(
        "--skip-bad", action="store_true",
        help="skip unreadable images (each named on stderr) instead of refusing the whole call",
    )  # fmt: skip
    predict.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on stderr when it is a terminal)"
    )

    calibrate = sub.add_parser(
        "calibrate", help="set a model's decision threshold from good images only (no defects needed)"
    )
    calibrate.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    calibrate.add_argument("images", nargs="+", help="good image files or folders (not used in training)")
    calibrate.add_argument(
        "--false-alarm-rate", type=_false_alarm_rate, default=0.01,
        help="share of good parts flagged, in [1e-6, 0.5) (default 0.01)",
    )
    calibrate.add_argument("--out", "-o", help="write the calibrated model here (default: in place)")
    calibrate.add_argument("--device", default="auto")
    calibrate.add_argument("--weights", help="backbone weights file, if not where the model was fitted")
    calibrate.add_argument("--batch-size", type=_positive_int, default=None, help="images per pass (>= 1)")

    update = sub.add_parser(
        "update", help="teach a saved model more good images (no refit; undo with rollback)"
    )
    update.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    update.add_argument("images", nargs="+", help="good image files or folders")
    update.add_argument("--note", default=None, help="free text kept in the model's history")
    update.add_argument(
        "--force", action="store_true",
        help="accept images scoring above the guard's limit (recorded as forced in the history)",
    )  # fmt: skip
    update.add_argument(
        "--guard", type=_positive_float, default=2.0, metavar="FACTOR",
        help="refuse images scoring above FACTOR x the highest calibration score (default 2)",
    )  # fmt: skip
    update.add_argument(
        "--until", type=_until, default="radius", metavar="RULE",
        help="rows added: radius (default: until every new patch lies within the fit's covering radius), "
        "a fraction in (0, 1] of the new patches, or a count",
    )  # fmt: skip
    update.add_argument("--out", "-o", help="write the updated model here (default: in place)")
    update.add_argument("--device", default="auto")
    update.add_argument("--weights", help="backbone weights file, if not where the model was fitted")
    update.add_argument("--batch-size", type=_positive_int, default=None, help="images per pass (>= 1)")

    history = sub.add_parser("history", help="a saved model's updates: versions, images, rows, notes")
    history.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    history.add_argument("--json", action="store_true", help="the records as JSON instead of a table")

    rollback = sub.add_parser("rollback", help="undo updates: back to a version, or one update out")
    rollback.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    undo = rollback.add_mutually_exclusive_group(required=True)
    undo.add_argument("--to", type=_version, metavar="VERSION", help="back to VERSION (0: as fitted)")
    undo.add_argument(
        "--remove", type=_version, metavar="VERSION", help="take update VERSION out, keep the later ones"
    )
    rollback.add_argument("--out", "-o", help="write the model here (default: in place)")
    rollback.add_argument("--device", default="auto")
    rollback.add_argument("--weights", help="backbone weights file, if not where the model was fitted")

    serve = sub.add_parser("serve", help="REST service + web page (FastAPI, uvicorn; extra: serve)")
    serve.add_argument(
        "--model", "-m", action="append", required=True,
        help="model file (.pt) or export folder; repeatable; NAME=PATH names it (default: file stem)",
    )  # fmt: skip
    _add_serve_options(serve)

    export = sub.add_parser("export", help="export a model to one ONNX / OpenVINO graph (extra: export)")
    export.add_argument("--model", "-m", required=True, help="a patchcore_<object>.pt file")
    from ..deploy.artifacts import EXPORT_FORMATS

    export.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0])
    export.add_argument("--out", "-o", required=True, help="output folder (model + patchcore_export.json)")
    export.add_argument("--weights", help="backbone weights file, if not where the model was fitted")
    export.add_argument(
        "--chunk", type=_positive_int, default=4096, help="memory-bank rows per distance block (>= 1)"
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in a non-empty --out folder"
    )

    for command in (train, federated, evaluate, predict, calibrate, serve, export):
        command.add_argument(
            "--offline", action="store_true",
            help="never download backbone weights (as PATCHCORE_OFFLINE=1): a missing file is an error",
        )  # fmt: skip

    init = sub.add_parser(
        "init", help="write a commented YAML configuration to start from",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    init.epilog_fn = _data_kinds_epilog  # type: ignore[attr-defined]
    init.add_argument("kind", nargs="?", default="folder", help="data set kind (default folder; list below)")
    init.add_argument("--out", "-o", default="patchcore.yaml", help="file to write (default patchcore.yaml; - = stdout)")
    init.add_argument("--force", action="store_true", help="replace an existing file")

    audit = sub.add_parser(
        "audit", help="rank a folder of 'good' images by how unlike the others they look (no training)"
    )
    audit.add_argument(
        "items", nargs="+", metavar="IMAGES|KEY=VALUE",
        help="image files or folders; KEY=VALUE overrides the config's model settings",
    )  # fmt: skip
    audit.add_argument("--config", "-c", help="YAML configuration whose model settings are used")
    audit.add_argument("--top", type=_positive_int, default=20, help="rows of the printed table")
    audit.add_argument("--json", action="store_true", help="print the ranking as JSON instead of a table")
    audit.add_argument("--out", "-o", help="also write audit.json, audit.csv and map pictures here")

    sub.add_parser("backbones", help="list the registered backbones")
    sub.add_parser(
        "params", help="every configuration key and estimator parameter: type, default, constraint, help"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "ray", None) and "=" in args.ray:
        # `--ray key=value`: the optional ADDRESS took an override (a Ray address has no "=").
        args.overrides.append(args.ray)
        args.ray = ""
    if getattr(args, "offline", False):
        from ..engine.weights import OFFLINE_ENV

        os.environ[OFFLINE_ENV] = "1"  # read where the weights are resolved, here and in worker processes
    if args.command in ("train", "federated", "evaluate") and threading.current_thread() is threading.main_thread():
        # A run ends on SIGTERM: cleanup runs (finally blocks), the run folder keeps its `incomplete` marker.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # `patchcore params | head`: the reader left; say nothing more (and no traceback at exit's flush).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _user_errors() as exc:
        print(f"patchcore {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished objects and their reports are kept", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated (SIGTERM); finished objects and their reports are kept", file=sys.stderr)
        return 128 + signal.SIGTERM


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (a BaseException: no ``except Exception`` stops it)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated()


def _run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    if args.command == "backbones":
        from ..engine.backbones import available_backbones

        print("\n".join([*available_backbones(), "timm:<model name>"]))
        return 0
    if args.command == "params":
        from ..engine.params import params_table
        from .config import keys_table

        print("# configuration keys (YAML or KEY=VALUE)\n" + keys_table())
        print("\n# PatchCore(...) parameters (the model section above, plus seed and work_dir)\n" + params_table())
        return 0
    if args.command == "init":
        from .starter import write_starter

        target = write_starter(args.kind, args.out, force=args.force)
        if target is not None:
            print(f"wrote {target}: edit data.root, then `patchcore train -c {target}`", file=sys.stderr)
        return 0
    if args.command == "train":
        from .starter import folder_overrides
        from .train import train

        config_path = args.config
        if args.resume and config_path is None:
            config_path = str(Path(args.resume) / "config.yaml")  # the run's own configuration
        # `patchcore train parts/`: a folder instead of a config (app/starter.py).
        overrides = folder_overrides(args.overrides, config_path)
        overrides = _with_ray(_with_progress(overrides, args.no_progress), args.ray)
        config = load_config(config_path, overrides)
        if args.restart_changed and not args.resume:
            raise ConfigError("--restart-changed needs --resume RUN_DIR")
        summary = train(config, online=args.log_online, resume=args.resume, restart_changed=args.restart_changed)
        print(summary.reports["markdown"].read_text())
        return 0
    if args.command == "federated":
        from .cmd_federated import federated

        overrides = _with_ray(_with_progress(args.overrides, args.no_progress), args.ray)
        report = federated(load_config(args.config, overrides))
        print(report.read_text())
        return 0
    if args.command == "evaluate":
        from .cmd_evaluate import evaluate_models

        overrides = list(args.overrides)
        if args.data:
            overrides.append(f"data.kind={args.data}")
        if args.root:
            overrides.append(f"data.root={args.root}")
        config = load_config(args.config, _with_progress(overrides, args.no_progress))
        summary = evaluate_models(config, args.model, device=args.device, weights=args.weights)
        print(summary.reports["markdown"].read_text())
        return 0
    if args.command == "predict":
        from .predict import predict_images

        predict_images(
            args.model, args.images, args.out, device=args.device, batch_size=args.batch_size,
            heatmaps=not args.no_heatmaps, weights=args.weights, overwrite=args.overwrite, masks=args.masks,
            skip_bad=args.skip_bad, progress=not args.no_progress and sys.stderr.isatty(),
            emit=lambda record: print(json.dumps(record), flush=True),
        )  # fmt: skip
        return 0
    if args.command == "calibrate":
        from ..deploy.calibration import describe_calibration
        from .calibrate import calibrate_model_file

        path, calibration = calibrate_model_file(
            args.model, args.images, args.false_alarm_rate, args.out, device=args.device,
            weights=args.weights, batch_size=args.batch_size,
        )  # fmt: skip
        print(json.dumps(calibration.to_dict(), indent=2))
        print(f"{path}: {describe_calibration(calibration)}", file=sys.stderr)
        return 0
    if args.command in ("update", "rollback"):
        from .update import rollback_model_file, update_model_file

        if args.command == "update":
            outcome = update_model_file(
                args.model, args.images, note=args.note, force=args.force, guard=args.guard, until=args.until,
                out=args.out, device=args.device, weights=args.weights, batch_size=args.batch_size,
            )  # fmt: skip
            assert outcome.record is not None
            print(json.dumps(outcome.record.to_dict(), indent=2))
            what = f"update {outcome.record.version}: +{outcome.record.rows_added} rows"
        else:
            outcome = rollback_model_file(
                args.model, to=args.to, remove=args.remove, out=args.out, device=args.device, weights=args.weights
            )
            what = f"rolled back to version {args.to}" if args.to is not None else f"update {args.remove} removed"
        print(
            f"{outcome.path}: {what}; version {outcome.version}, {outcome.bank_rows} bank rows; "
            f"{outcome.calibration_note}",
            file=sys.stderr,
        )
        return 0
    if args.command == "history":
        from ..engine.model import PatchCore
        from .update import history_text

        model = PatchCore.load(args.model, device="cpu")
        if args.json:
            print(json.dumps([r.to_dict() for r in model.history_], indent=2))
        else:
            print(history_text(model))
        return 0
    if args.command == "audit":
        from .cmd_audit import run_audit_command
        from .train import build_model

        overrides = [i for i in args.items if "=" in i and not Path(i).exists()]
        inputs = [i for i in args.items if i not in overrides]
        model = build_model(load_config(args.config, overrides))
        print(run_audit_command(model, inputs, args.top, args.json, args.out))
        return 0
    if args.command == "serve":
        from ..deploy.service import parse_model_specs, run_service
        from ..deploy.station import StationSettings, station_extension

        settings = _serve_settings(args)
        # The inspection station (the page's recent decisions, feedback, watched folders, drift); --watch is
        # checked against the model names before any model is loaded.
        station = station_extension(StationSettings.from_service(settings), parse_model_specs(args.model))
        run_service(args.model, settings, [station])
        return 0
    if args.command == "export":
        from ..deploy.export import export_model

        files = export_model(
            args.model, args.format, args.out, weights=args.weights, chunk=args.chunk, overwrite=args.overwrite
        )
        for f in files:
            print(f)
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def _with_ray(overrides: list[str], address: str | None) -> list[str]:
    if address is None:
        return overrides
    return [*overrides, "execution.engine=ray", f"execution.address={address or 'null'}"]


def _with_progress(overrides: Sequence[str], no_progress: bool) -> list[str]:
    return [*overrides, "logging.progress=false"] if no_progress else list(overrides)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
