"""``patchcore federated``: clients (partitions of the training images) build local memory banks where their
images are; a server merges them into one ordinary model per object, which ``predict``, ``serve`` and
``evaluate`` use as any other. With ``federated.compare_centralised`` the same images are also fitted
centrally and both are evaluated on the same test split (``federated.md`` / ``federated.json``).

Partitions (``federated.partition``):

- ``iid``: each object's training images shuffled (seeded) and dealt to ``clients`` clients;
- ``by_category``: one client per object (category), one joint bank for all of them, evaluated on each
  object's test split and saved as each object's model;
- ``folders``: ``sites`` lists one folder of good images per site (the data set's single object gives the
  test split).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataError, ObjectData, Sample
from ..data.loading import expand_images
from ..distributed.federated import ClientSpec, NoiseSpec, federated_fit, gaussian_sigma, run_clients
from ..engine.backbones import ensure_weights
from ..engine.model import PatchCore
from ..evaluation.evaluate import evaluate_object
from ..evaluation.reports import ObjectResult, write_reports
from ..fileio import atomic_write_json, atomic_write_text, safe_name
from .config import Config, ConfigError, config_to_dict
from .runs import (
    Progress,
    finish_run,
    lock_run,
    make_run_dir,
    mark_object,
    metrics_line,
    seed_everything,
    start_run,
    unlock_run,
)
from .train import (
    SampleImages,
    build_model,
    evaluation_settings,
    fit_object,
    load_objects,
    model_record,
    ray_options,
    run_header,
)

__all__ = ["Partition", "federated", "partitions"]

log = logging.getLogger("patchcore")

REPORTED = ("image_auroc", "pixel_auroc", "au_pro", "au_spro@0.05", "au_spro@0.3")


@dataclass
class Partition:
    """One federated model: its clients' images and the objects whose test splits evaluate it."""

    name: str
    clients: list[tuple[str, list[Sample]]]
    evaluate_on: list[ObjectData] = field(default_factory=list)
    central: list[Sample] = field(default_factory=list)  # the same images in data order (central fit)


def partitions(config: Config, objects: list[ObjectData]) -> list[Partition]:
    fed = config.federated
    if fed.partition == "iid":
        out = []
        for obj in objects:
            if len(obj.train) < fed.clients:
                raise DataError(f"{obj.name}: {len(obj.train)} training images for {fed.clients} clients")
            order = np.random.default_rng(config.seed).permutation(len(obj.train))
            parts = np.array_split(order, fed.clients)
            clients = [
                (f"{obj.name}/client{k}", [obj.train[i] for i in sorted(p)]) for k, p in enumerate(parts)
            ]
            out.append(Partition(obj.name, clients, [obj], list(obj.train)))
        return out
    if fed.partition == "by_category":
        if len(objects) < 2:
            raise ConfigError(f"{config.source}: federated.partition by_category needs at least two objects")
        clients = [(o.name, list(o.train)) for o in objects]
        return [Partition("joint", clients, list(objects), [s for _, samples in clients for s in samples])]
    if not fed.sites:
        raise ConfigError(
            f"{config.source}: federated.partition folders needs federated.sites (one folder per site)"
        )
    if len(objects) != 1:
        raise ConfigError(
            f"{config.source}: federated.partition folders evaluates on one object; data gives "
            f"{', '.join(o.name for o in objects)} (set data.objects)"
        )
    _check_distinct_sites(config, fed.sites)
    clients = []
    owner: dict[Path, str] = {}
    for k, site in enumerate(fed.sites):
        images = expand_images([site])
        for image in images:
            other = owner.setdefault(image.resolve(), site)
            if other != site:
                raise ConfigError(
                    f"{config.source}: federated.sites {other} and {site} share the image {image}: each image "
                    "belongs to one site (nested site folders?)"
                )
        clients.append((f"site{k}:{Path(site).name}", [Sample(p, "good", (), p.stem) for p in images]))
    return [Partition(objects[0].name, clients, [objects[0]], [s for _, samples in clients for s in samples])]


def _check_distinct_sites(config: Config, sites: list[str]) -> None:
    """Refuse a site listed twice (compared by resolved path: ``sites/a``, ``./sites/a/`` and a link to it are
    one folder): its images would be counted, and weighted, twice."""
    seen: dict[Path, str] = {}
    for site in sites:
        resolved = Path(site).expanduser().resolve()
        if resolved in seen:
            raise ConfigError(
                f"{config.source}: federated.sites lists the folder {resolved} twice ({seen[resolved]!r} and "
                f"{site!r}): each site is one client; list it once"
            )
        seen[resolved] = site


def _evaluate(
    model: PatchCore, obj: ObjectData, out_dir: Path, config: Config, progress: Progress
) -> ObjectResult:
    model.stats_ = replace(model.stats_, object=obj.name)
    progress.start(obj.name, {"predict": len(obj.test)})
    metrics, eval_stats, model.evaluation_ = evaluate_object(
        model, obj, out_dir, evaluation_settings(config), progress
    )
    stats = {**model.stats_.to_dict(), **eval_stats}
    path = model.save(out_dir / "models" / f"patchcore_{safe_name(obj.name)}.pt")
    atomic_write_json(path.with_suffix(".json"), model_record(model, obj.name, stats, metrics))
    return ObjectResult(obj.name, metrics, stats, str(path))


def federated(config: Config) -> Path:
    """Fit the federated models (and the centralised ones to compare); returns the report's path."""
    fed = config.federated
    objects = load_objects(config)
    plan = partitions(config, objects)
    noise = None
    if fed.noise_epsilon is not None:
        noise = NoiseSpec(fed.noise_epsilon, fed.noise_delta, fed.noise_clip)
    if config.execution.engine == "ray":
        from ..distributed.ray_runner import check_ray_address

        check_ray_address(config.execution.address)  # bounded, before the run folder exists
    ensure_weights(config.model.backbone, config.model.weights, progress=config.logging.progress)  # before the run folder
    run_dir = make_run_dir(config.output_dir, config.project, config.group)
    lock = lock_run(run_dir)
    try:
        return _federated_in(run_dir, config, plan, noise)
    finally:
        shutil.rmtree(run_dir / "tmp", ignore_errors=True)
        unlock_run(lock)


def _federated_in(run_dir: Path, config: Config, plan: list[Partition], noise: NoiseSpec | None) -> Path:
    import yaml

    fed = config.federated
    evaluated = [obj.name for part in plan for obj in part.evaluate_on]
    start_run(run_dir, evaluated, config.logging.level, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log.info("federated run folder: %s", run_dir)
    fraction = (
        fed.local_percentage if fed.local_percentage is not None else min(1.0, 2 * config.model.percentage)
    )
    options = ray_options(config) if config.execution.engine == "ray" else None
    header = {**run_header(config), "federated": config_to_dict(config)["federated"]}
    if noise is not None:
        header["noise_sigma"] = gaussian_sigma(noise)
    rows: list[dict[str, Any]] = []
    fed_results: list[ObjectResult] = []
    central_results: list[ObjectResult] = []
    with Progress(config.logging.progress) as progress:
        for part in plan:
            seed_everything(config.seed)
            model = build_model(config)
            clients = [
                ClientSpec(
                    name,
                    SampleImages(samples, model.transform, config.model.batch_size, config.data.num_workers),
                    k,
                )
                for k, (name, samples) in enumerate(part.clients)
            ]
            log.info(
                "%s: %d clients (%s images), local banks of %.3g of their patches",
                part.name, len(clients), "/".join(str(len(s)) for _, s in part.clients), fraction,
            )  # fmt: skip
            banks = run_clients(model, clients, fraction, noise, options)
            federated_fit(model, banks, fed.bank_size, fed.weighted)
            central = None
            if fed.compare_centralised:
                # The central fit sees the images in data order, as `patchcore train` would.
                joint = ObjectData(part.name, part.central, [], False)
                central = fit_object(config, joint)
            for obj in part.evaluate_on:
                result = _evaluate(model, obj, run_dir, config, progress)
                fed_results.append(result)
                row = {
                    "partition": fed.partition,
                    "model": part.name,
                    "object": obj.name,
                    "clients": len(clients),
                    "bank": result.stats["memory_size"],
                    "federated": result.metrics,
                }
                log.info("%s federated: %s", obj.name, metrics_line(result.metrics, result.stats))
                if central is not None:
                    c = _evaluate(central, obj, run_dir / "centralised", config, progress)
                    central_results.append(c)
                    row["centralised"] = c.metrics
                    row["central_bank"] = c.stats["memory_size"]
                    log.info("%s centralised: %s", obj.name, metrics_line(c.metrics, c.stats))
                rows.append(row)
                mark_object(run_dir, obj.name, "done")
    write_reports(run_dir, fed_results, header)
    if central_results:
        write_reports(run_dir / "centralised", central_results, header)
    atomic_write_json(run_dir / "federated.json", {"header": header, "rows": rows})
    report = run_dir / "federated.md"
    atomic_write_text(report, _markdown(rows, header))
    finish_run(run_dir)
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    keys = [k for k in REPORTED if any(r["federated"].get(k) is not None for r in rows)]
    lines = [f"# Federated vs centralised: {header.get('project', '')} / {header.get('group', '')}", ""]
    fed = header["federated"]
    lines.append(
        f"- partition: {fed['partition']}, weighted: {fed['weighted']}, bank size: {fed['bank_size'] or 'percentage'}"
    )
    if "noise_sigma" in header:
        lines.append(
            f"- Gaussian noise on shared vectors: epsilon {fed['noise_epsilon']}, delta {fed['noise_delta']}, "
            f"clip {fed['noise_clip']}, sigma {header['noise_sigma']:.4g} (per shared vector)"
        )
    lines += ["", "Metrics in percent: federated / centralised (difference).", ""]
    columns = ["model", "object", "clients", "bank fed / central", *keys]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|")
    for r in rows:
        cells = [r["model"], r["object"], str(r["clients"]), f"{r['bank']} / {r.get('central_bank', 'n/a')}"]
        for k in keys:
            f, c = r["federated"].get(k), r.get("centralised", {}).get(k)
            diff = "" if f is None or c is None else f" ({100 * (f - c):+.2f})"
            cells.append(f"{_pct(f)} / {_pct(c)}{diff}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
