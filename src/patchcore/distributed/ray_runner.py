"""Run a function over many items, in this process or as Ray tasks across a cluster.

The caller passes what to run (a picklable module-level function and its items); this module knows nothing
of objects, models or files. Every item gets an :class:`Outcome` (its value or its error, and how many
attempts it took), in item order, and a failing item never stops the others. Ray is imported only when asked
for (the optional extra ``patchcore[ray]``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DistributedError",
    "Outcome",
    "RayOptions",
    "check_ray_address",
    "check_task_fits",
    "import_ray",
    "ray_session",
    "run_local",
    "run_ray",
]


class DistributedError(RuntimeError):
    """Ray is missing or the cluster cannot be reached: a setup problem, reported before any work starts."""


@dataclass(frozen=True)
class RayOptions:
    """Where and with what resources tasks run.

    address: None starts a local cluster (or joins the one ``RAY_ADDRESS`` names); ``"auto"`` joins the
    cluster running on this machine; ``"host:port"`` or ``"ray://host:port"`` a remote one.
    retries: how many more times a failed task is tried (an exception, a crashed or killed worker).
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 1
    # A local cluster started here: its size and object store (small by default: results are banks).
    local_cpus: int | None = None
    object_store_memory: int | None = 512 * 1024**2


@dataclass
class Outcome:
    """What one item gave: ``value`` or ``error`` (one line) with ``details`` (the traceback)."""

    item: int
    value: Any = None
    node: str | None = None  # the Ray node it ran on (None: this process)
    error: str | None = None
    details: str | None = None
    attempts: int = 1
    seconds: float = 0.0
    # What Ray reserved for the task that gave the value ({"CPU": 1.0, ...}; None: this process).
    resources: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise DistributedError(
            "the ray engine needs Ray: pip install 'patchcore[ray]' (or set execution.engine: local)"
        ) from exc
    return ray


# How long a cluster's address may take to accept a connection before it counts as unreachable. Ray's own
# connect retries for minutes, inside C++ where no signal handler runs (SIGTERM then waits too).
CONNECT_TIMEOUT_S = 10.0


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds and in one line, a Ray address that cannot be used: not
    ``host:port``, ``auto`` with no cluster on this machine, or a port that does not accept a connection.
    None (a local cluster is started, unless ``RAY_ADDRESS`` names one) passes."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return
    import_ray()
    shown = address if address is not None else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    if address is not None and address.startswith("ray://"):  # Ray Client: host:port after the scheme
        target: str | None = address.removeprefix("ray://")
    else:
        try:  # Ray's own reading of the address (RAY_ADDRESS, "auto": the cluster started on this machine)
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # pragma: no cover - a Ray without it: its own connect decides
            return
        try:
            target = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError, OSError) as exc:
            raise DistributedError(f"Ray address {shown}: {' '.join(str(exc).split())}") from None
        if target is None:  # "local": a cluster is started here
            return
    host, _, port_text = (target or "").rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DistributedError(f"Ray address {shown}: expected host:port (e.g. 10.0.0.5:6379), auto or ray://host:port")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise DistributedError(
            f"cannot reach the Ray cluster at {shown} ({host}:{port_text}: {reason}, tried for up to {timeout:g} s)"
        ) from None


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray connected for the block: joins a running session as it is, else starts or joins a cluster and
    shuts the connection down afterwards (a local cluster started here stops with it)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    check_ray_address(options.address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if options.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=options.local_cpus, object_store_memory=options.object_store_memory)
    try:
        ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot connect to the Ray cluster at {options.address}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _call(function: Callable[[Any], Any], item: Any) -> tuple[Any, float]:
    # Runs where the task runs: the value and the seconds it took there.
    t0 = time.perf_counter()
    value = function(item)
    return value, time.perf_counter() - t0


def _remote_call(function: Callable[[Any], Any], item: Any) -> tuple[Any, float, str, dict[str, float]]:
    import ray

    value, seconds = _call(function, item)
    context = ray.get_runtime_context()
    return value, seconds, context.get_node_id(), dict(context.get_assigned_resources())


def check_task_fits(ray: Any, options: RayOptions) -> None:
    """Refuse, in one line, tasks that no node of the connected cluster could ever run: Ray would keep them
    waiting (infeasible) for a node that never comes. An autoscaling cluster has to offer such a node
    first."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(
        r.get("CPU", 0.0) >= options.num_cpus and r.get("GPU", 0.0) >= options.num_gpus for r in nodes
    ):
        return
    offered = ", ".join(f"{r.get('CPU', 0.0):g} CPUs and {r.get('GPU', 0.0):g} GPUs" for r in nodes) or "none"
    raise DistributedError(
        f"a task asks for {options.num_cpus:g} CPUs and {options.num_gpus:g} GPUs (execution.cpus_per_object, "
        f"gpus_per_object) but no node of the Ray cluster has that much (its nodes: {offered})"
    )


def run_local(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    retries: int = 0,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``function(item)`` for each item in turn, in this process, with the same retry and error policy as
    :func:`run_ray` (KeyboardInterrupt is not caught)."""
    outcomes = []
    for i, item in enumerate(items):
        outcome = Outcome(i)
        for attempt in range(1, retries + 2):
            outcome = Outcome(i, attempts=attempt)
            try:
                outcome.value, outcome.seconds = _call(function, item)
                break
            except Exception as exc:
                outcome.error, outcome.details = _one_line(exc), traceback.format_exc()
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def run_ray(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    options: RayOptions,
    on_done: Callable[[Outcome], None] | None = None,
    on_retry: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``function(item)`` for every item as Ray tasks, all submitted at once (Ray schedules them on the
    cluster's free CPUs/GPUs). ``on_done`` sees each outcome as it finishes (in finishing order); the list
    returned is in item order.

    A task that raises, or whose worker dies (out of memory, killed, its node lost), is submitted again up to
    ``options.retries`` times (``on_retry`` sees the failed attempt); after the last try its error is in its
    outcome and the other tasks carry on. The driver resubmits (rather than Ray's own ``max_retries``) so that
    every outcome knows how many attempts it took.
    """
    with ray_session(options) as ray:
        check_task_fits(ray, options)
        remote = ray.remote(_remote_call).options(
            num_cpus=options.num_cpus, num_gpus=options.num_gpus, max_retries=0, retry_exceptions=False
        )
        function_ref = ray.put(function)
        attempts = dict.fromkeys(range(len(items)), 1)
        pending = {remote.remote(function_ref, item): i for i, item in enumerate(items)}
        outcomes: dict[int, Outcome] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i = pending.pop(ref)
            outcome = Outcome(i, attempts=attempts[i])
            try:
                outcome.value, outcome.seconds, outcome.node, outcome.resources = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                outcome.error, outcome.details = _one_line(cause), str(exc)
            except ray.exceptions.RayError as exc:  # the worker or its node died
                outcome.error, outcome.details = _one_line(exc), str(exc)
            if not outcome.ok and attempts[i] <= options.retries:
                if on_retry is not None:
                    on_retry(outcome)
                attempts[i] += 1
                pending[remote.remote(function_ref, items[i])] = i
                continue
            outcomes[i] = outcome
            if on_done is not None:
                on_done(outcome)
        return [outcomes[i] for i in range(len(items))]
