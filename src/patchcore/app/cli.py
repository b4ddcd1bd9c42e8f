"""``patchcore`` command line: a thin layer over the application's commands (train, evaluate, predict).

patchcore train --config configs/elpv.yaml [key=value ...]
patchcore evaluate --model results/elpv/default/models --config configs/elpv.yaml
patchcore predict --model patchcore_mono.pt image.png folder/ --out predictions/
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence

from .._version import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..data import DataError
    from ..engine.backbones import BackboneError
    from ..engine.model import ModelFileError, NonFiniteError
    from ..engine.params import ParamError
    from .config import ConfigError
    from .runs import OutputError
    from .tracking import TrackingError

    return (
        ConfigError, DataError, BackboneError, ModelFileError, NonFiniteError, ParamError, OutputError,
        TrackingError,
        FileNotFoundError,
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
    """argparse with a one-line error (no usage block): ``patchcore train: error: ...``, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchcore", description="PatchCore industrial anomaly detection")
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="fit, save and evaluate one model per object of a data set")
    train.add_argument(
        "--config", "-c", help="YAML configuration (configs/elpv.yaml, mvtec.yaml, autovi.yaml)"
    )
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="override any key, e.g. model.percentage=0.01 (every key: patchcore params)",
    )  # fmt: skip
    train.add_argument(
        "--log-online", choices=["wandb", "mlflow"], help="send metrics to W&B or MLflow (extras)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

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

    sub.add_parser("backbones", help="list the registered backbones")
    sub.add_parser(
        "params", help="every configuration key and estimator parameter: type, default, constraint, help"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except _user_errors() as exc:
        print(f"patchcore {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished objects and their reports are kept", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from .config import load_config

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
    if args.command == "train":
        from .train import train

        config = load_config(args.config, _with_progress(args.overrides, args.no_progress))
        summary = train(config, online=args.log_online)
        print(summary.reports["markdown"].read_text())
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate_models

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

        records = predict_images(
            args.model, args.images, args.out, device=args.device, batch_size=args.batch_size,
            heatmaps=not args.no_heatmaps, weights=args.weights, overwrite=args.overwrite,
        )  # fmt: skip
        for record in records:
            print(json.dumps(record))
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def _with_progress(overrides: Sequence[str], no_progress: bool) -> list[str]:
    return [*overrides, "logging.progress=false"] if no_progress else list(overrides)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
