"""The offline batch on a Ray cluster (``python -m daemon.batch ... --ray [ADDRESS]``).

Each actor is one daemon: it parses the daemon's options and builds its server and registry
through ``daemon.cli`` exactly as ``run_model.py`` does (models loaded once), and answers the
requests it is handed through ``Server.answer``, the stdin loop's own path (validation,
batching, a failed batch retried one by one, error codes). Replies stream back one by one.
An actor that dies is replaced; the requests it had not answered are retried once, each alone
(so one poisonous request cannot take its batch-mates with it), and one whose actor dies again
is answered ``internal`` ("not answered: its Ray actor died ...") rather than tried forever.

Plain actors rather than Ray Data's ``map_batches``: the inputs are a list of small request
dicts (the actors read the images themselves), and Ray Data's actor pool retries a dead actor's
whole block out of our sight (forever by default: ``max_restarts=-1, max_task_retries=-1``) or
fails the run, where the promise here is per request: retried once, then one row that says so.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.exceptions import ActorDiedError, RayError

from daemon import cli
from daemon.errors import INTERNAL
from daemon.protocol import fail_reply

log = logging.getLogger("daemon.ray_batch")


class ActorStartError(RuntimeError):
    """The actors could not start (so no request can be answered)."""


class BatchWorker:
    """A Ray actor holding one daemon's server and models; ``answer`` streams replies in order."""

    def __init__(self, daemon_argv: list[str], cwd: str) -> None:
        args = cli.parse_args(daemon_argv)
        logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if os.path.isdir(cwd):  # relative paths in requests mean what they mean to the driver
            os.chdir(cwd)
        self.server = cli.make_server(args)
        cli.load_models(self.server, args)

    def ready(self) -> dict[str, Any]:
        """The daemon's ready line, plus the node it runs on."""
        return {**self.server.ready_line(), "node": ray.util.get_node_ip_address()}

    def answer(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from self.server.answer(requests)


@dataclass
class _Work:
    """Requests (indexes) handed to one actor at a time; ``retry`` marks a second attempt."""
    indexes: list[int]
    retry: bool = False
    answered: int = 0


def _cause(exc: BaseException) -> str:
    if isinstance(exc, ActorDiedError):
        return "its Ray actor died (process killed or crashed, or its node lost; see the actor's log)"
    return f"its Ray actor failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})"


def _unanswered_reply(request: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The reply of a request whose actor failed on it twice (once in a batch, once alone)."""
    return fail_reply(INTERNAL, f"not answered: {_cause(exc)} while serving this request, and had before: "
                                "retried alone once, not again (a rerun tries it once more)",
                      task=request.get("task"), has_id="id" in request, request_id=request.get("id"))


def _connect(address: str) -> bool:
    """Join the cluster at ``address`` ('local': start one here); True when this call started Ray."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def replies(weights: Path, daemon_args: list[str], requests: list[dict[str, Any]], indexes: list[int], *,
            address: str = "local", actors: int | None = None, gpus_per_actor: float | None = None,
            cpus_per_actor: float = 1.0, batch_size: int = 16) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, reply) for ``requests[index]`` of every index, as replies arrive, from a pool of actors."""
    daemon_argv = [str(Path(weights).resolve()), *daemon_args]
    cli.parse_args(daemon_argv)  # a bad daemon option fails here, before any actor starts
    started = _connect(address)
    try:
        resources = ray.cluster_resources()
        cluster_gpus = resources.get("GPU", 0)
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if cluster_gpus >= 1 else 0.0
        if actors is None:
            actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor else 1
        if not gpus_per_actor and not any(arg.split("=")[0] == "--device" for arg in daemon_args):
            # Ray leaves every GPU visible to an actor that holds none: keep it off them.
            daemon_argv += ["--device", "cpu"]
        if actors * gpus_per_actor > cluster_gpus or actors * cpus_per_actor > resources.get("CPU", 0):
            log.warning("%d actors x (%g GPU, %g CPU) do not fit the cluster now (%g GPU, %g CPU): some wait "
                        "for resources", actors, gpus_per_actor, cpus_per_actor, cluster_gpus, resources.get("CPU", 0))
        worker = ray.remote(BatchWorker).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                                                 max_restarts=0, max_task_retries=0)
        cwd = os.getcwd()

        def new_actor():
            return worker.remote(daemon_argv, cwd)

        pool = [new_actor() for _ in range(actors)]
        try:
            lines = ray.get([actor.ready.remote() for actor in pool])
        except RayError as exc:  # nothing could be served: the weights or the package missing on a node...
            raise ActorStartError(f"a Ray actor could not load the models: {exc}") from None
        for line in lines:
            log.info("actor pid %s on %s (%s): %s", line["pid"], line["node"], line["device"],
                     ", ".join(task for task, status in line["tasks"].items() if status["available"]) or "no task")
        yield from _serve(pool, new_actor, requests, indexes, batch_size)
    finally:
        if started:
            ray.shutdown()


def _serve(idle: list, new_actor, requests: list[dict[str, Any]], indexes: list[int],
           batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Hand work to idle actors and yield replies as they stream back. An actor that fails is
    dropped, and a new one started when there is work for it."""
    size = len(idle)
    queue = deque(_Work(indexes[start:start + batch_size]) for start in range(0, len(indexes), batch_size))
    running: dict[Any, tuple[Any, _Work]] = {}
    while queue or running:
        while queue and (idle or len(running) < size):
            actor, work = idle.pop() if idle else new_actor(), queue.popleft()
            stream = actor.answer.options(num_returns="streaming").remote([requests[i] for i in work.indexes])
            running[stream] = (actor, work)
        ready, _ = ray.wait(list(running), num_returns=1)
        stream = ready[0]
        actor, work = running[stream]
        try:
            reply = ray.get(next(stream))
        except StopIteration:
            del running[stream]
            idle.append(actor)
            continue
        except RayError as exc:
            del running[stream]
            ray.kill(actor)
            left = work.indexes[work.answered:]
            log.warning("%s; %s its %d unanswered request(s)", _cause(exc),
                        "giving up on" if work.retry else "retrying one by one", len(left))
            for index in left:
                if work.retry:
                    yield index, _unanswered_reply(requests[index], exc)
                else:
                    queue.append(_Work([index], retry=True))
            continue
        index = work.indexes[work.answered]
        work.answered += 1
        yield index, reply
