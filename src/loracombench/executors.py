"""Executors run one stage's cells (pipeline.Cell); the cells of a stage are independent of
each other and depend only on earlier stages, so an executor may run them in any order or at once.

SerialExecutor runs them one after another in this process (the default); with `run --workers N`
ProcessExecutor runs them in N local worker processes. RayExecutor submits
them as Ray tasks, on a local Ray or an existing cluster (`pip install 'loracombench[ray]'`).
Every worker reads and writes the run folder itself, so all machines must see it at the same
path (a shared filesystem); the run's lock stays with the driver.
"""

from __future__ import annotations

RAY_EXTRA = "pip install 'loracombench[ray]'"
EXECUTORS = ("serial", "ray")


class SerialExecutor:
    """Runs cells one after another in this process."""

    def run(self, cells) -> None:
        for cell in cells:
            cell.ensure()

    def close(self) -> None:
        """Nothing to release."""


def _start_worker(threads: int) -> None:
    """A local worker's set-up: its share of the threads, and a watch on the driver, so that a
    worker never outlives it (a killed driver's workers would go on writing into a run folder
    that the next run has locked)."""
    import os
    import threading
    import time

    import torch

    torch.set_num_threads(threads)
    driver = os.getppid()

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="driver-watch").start()


def _ensure_pickled(pickled: bytes) -> bool:
    import cloudpickle

    return cloudpickle.loads(pickled).ensure()


class ProcessExecutor:
    """Runs each stage's cells in `workers` processes on this machine, each with its share of the
    CPU threads (`run --workers N`). Workers live for the whole run and keep their base model
    between cells; numbers match a serial run's up to floating-point summation order (the thread
    count changes it). It pays where one process cannot use the machine (many cores, small
    models). On 2 cores it does not: the default run's training took 9.5 min with two 1-thread
    workers against 9.2 min in one 2-thread process, and an evaluation cell 80-93 s per worker
    (about 43 s per cell overall) against about 40 s, because the 135M model's matmuls already
    use both threads well."""

    def __init__(self, workers: int = 2, threads_per_worker: int | None = None):
        import os

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self._pool = None

    def run(self, cells) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.threads,))
        import cloudpickle  # cells carry closures over the run, which the standard pickle refuses

        futures = {self._pool.submit(_ensure_pickled, cloudpickle.dumps(cell)): cell for cell in cells}
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise RuntimeError(f"{futures[future].what} failed: {future.exception()}") from future.exception()
        except BaseException:
            # A failed cell, Ctrl-C or SIGTERM stops the stage now, as in a serial run: the other
            # workers' cells are stopped too, not waited for (minutes of training), and leave
            # nothing that looks complete (cells write atomically; a rerun resumes).
            self._stop_workers()
            raise

    def _stop_workers(self) -> None:
        if self._pool is None:
            return
        for process in list((self._pool._processes or {}).values()):  # no public way before Python 3.14
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def import_ray():
    """Ray, or one clear error naming the extra that installs it (Ray is optional)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def _ensure(cell) -> bool:
    return cell.ensure()


class RayExecutor:
    """Runs a stage's cells as Ray tasks and waits for all of them.

    address: None starts a local Ray (with `init_options`, e.g. num_cpus), even where a Ray is
    already running on the machine or RAY_ADDRESS names one (ray.init alone would join it); "auto"
    or "ray://host:10001" joins an existing cluster. Each cell asks for `cpus_per_cell` CPUs, and a
    cell that runs the base model (`Cell.gpu`) for one GPU when the cluster has any. A worker
    process keeps the run's base model between the cells it runs (pipeline.Experiment travels
    without it and loads it once per process); Ray starts a fresh worker after each GPU task to
    release the GPU's memory, so a GPU cell loads the base itself.
    """

    def __init__(self, address: str | None = None, cpus_per_cell: float = 1, **init_options):
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.init_options = init_options
        self._started = False

    def _connect(self):
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address or "local", **self.init_options)
            self._started = True
        return ray

    def close(self) -> None:
        """Stop the local Ray this executor started (a cluster it joined keeps running)."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, cells) -> None:
        if not cells:
            return
        ray = self._connect()
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        # max_calls=1 gives each GPU cell a fresh worker, which frees the GPU's memory when it
        # exits and never holds a base model loaded on a GPU that Ray has since given to another
        # task. Ray sets it only for functions declared with GPUs, and .options() cannot set it.
        cpu_task, gpu_task = ray.remote(_ensure), ray.remote(max_calls=1)(_ensure)
        pending = {}
        for cell in cells:
            on_gpu = gpus and cell.gpu
            options = {"num_cpus": self.cpus_per_cell, "num_gpus": 1 if on_gpu else 0, "name": cell.what}
            pending[(gpu_task if on_gpu else cpu_task).options(**options).remote(cell)] = cell
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                try:
                    ray.get(done[0])
                except ray.exceptions.RayError as err:  # the cell's own error, or its worker died
                    cause = getattr(err, "cause", None) or err
                    raise RuntimeError(f"{cell.what}: {type(cause).__name__}: {cause}") from cause
        finally:
            # The first error or Ctrl-C stops the stage, as in a serial run; a cancelled cell
            # leaves nothing behind (cells write atomically) and a rerun resumes.
            for ref in pending:
                ray.cancel(ref)


def make_executor(name: str, ray_address: str | None = None, workers: int = 1):
    """The executor a run's --executor (and --workers, for local processes) names."""
    if ray_address and name != "ray":
        raise ValueError(f"--ray-address is for --executor ray, not --executor {name}")
    if workers > 1 and name != "serial":
        raise ValueError(f"--workers is for local processes; with --executor {name} the cluster decides")
    if name == "serial":
        return ProcessExecutor(workers) if workers > 1 else SerialExecutor()
    if name == "ray":
        import_ray()
        return RayExecutor(ray_address)
    raise ValueError(f"--executor {name!r}: unknown; valid: {', '.join(EXECUTORS)}")
