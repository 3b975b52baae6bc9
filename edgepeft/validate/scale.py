"""``edgepeft validate --ray``: the cases of one or several artifacts as Ray tasks.

Each case is one task (:func:`edgepeft.validate.cases.run_case`) reserving as many CPUs as it
runs threads (``Settings.threads``, default 1). Ray keeps its worker
processes, and each keeps what it loaded (the artifact's sessions, the PyTorch reference, the
token batches) for the next case it gets, so a worker loads an artifact and the reference once.
A worker that dies mid-case (killed, out of memory, its machine gone) is a system failure that Ray
retries on another worker (``max_retries``); the driver holds one result per task, so every case
is counted once. Results come back in the serial order, and each case computes its own references
with torch and onnxruntime on the same number of threads as a serial run, so the report is the
serial one case by case.

The workers need the same paths as the driver (artifacts, reference, adapter folders): a shared
file system on a cluster, or the same layout on every machine.
"""

from __future__ import annotations

import logging
import time

from edgepeft.errors import EdgepeftError

INSTALL = "pip install 'edgepeft[scale]'"
RETRIES = 3  # a case whose worker died is run again up to this many times


def require_ray():
    """The ``ray`` module, or exit 2 with the install line."""
    try:
        import ray
    except ImportError:
        raise EdgepeftError(f"--ray needs Ray, which is not installed: {INSTALL} (or leave out --ray to "
                            "run the cases here).") from None
    return ray


def validate_case(settings, case):
    from edgepeft.validate.cases import run_case

    return run_case(settings, case)


def run_on_ray(tasks: list, address: str, quiet: bool = False) -> tuple[list, dict]:
    """Run ``[(Settings, case)]`` as Ray tasks: ``([(CaseResult, run)] in order, ray info)``.

    ``address``: a cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``), or "" to
    start a local Ray on this machine (on 127.0.0.1, stopped at the end). A Ray already
    initialized in this process (a test's, an application's) is used as it is and left running.
    """
    ray = require_ray()
    from edgepeft.progress import bar

    started = not ray.is_initialized()
    if started:
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(_node_ip_address="127.0.0.1", **kw)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError...
            raise EdgepeftError(f"--ray {address or '(local)'}: could not {'join' if address else 'start'} Ray "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the "
                                "address (ray://HOST:10001, HOST:6379 or auto) and that the cluster runs Ray "
                                f"{ray.__version__}.") from None
    try:
        where = address or "local"
        cpus = int(ray.cluster_resources().get("CPU", 0))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        per_case = max(s.threads or 1 for s, _ in tasks)  # CPUs a case reserves: its threads
        remote = ray.remote(num_cpus=per_case, max_retries=RETRIES, retry_exceptions=False)(validate_case)
        t0 = time.perf_counter()
        refs = [remote.remote(s, case) for s, case in tasks]
        order = {r: k for k, r in enumerate(refs)}
        outs: list = [None] * len(refs)
        progress = bar(total=len(refs), desc=f"validate on Ray ({cpus} CPUs)", unit="case", quiet=quiet)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    outs[order[r]] = _get(ray, r)
                    progress.update(1)
        finally:
            progress.close()
        wall = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    workers = len({(run["host"], run["pid"]) for _, run in outs})
    info = {"address": where, "nodes": nodes, "cpus": cpus, "cpus_per_case": per_case, "workers": workers,
            "seconds": round(wall, 2),
            "summary": f"{len(outs)} cases on {workers} worker processes, {nodes} node(s), {cpus} CPUs, "
                       f"{wall:.1f} s"}
    return outs, info


def _get(ray, ref):
    """One task's result; an edgepeft error raised in the worker is raised here as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EdgepeftError):
            raise EdgepeftError(str(e.cause)) from None
        raise
