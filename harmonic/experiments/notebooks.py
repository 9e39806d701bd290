"""Execute the notebooks with papermill: ``python -m harmonic reproduce`` (what ``make reproduce`` runs).

::

    python -m harmonic reproduce --profile default|smoke [--only NAMES] [--results-dir DIR]
    python -m harmonic reproduce --profile coco --coco-root COCO | --profile voc --voc-root VOCdevkit [--dry-run]
    python -m harmonic reproduce --sweep NAME       # a grid of 03_train_eval runs (harmonic.experiments.sweeps)
    python -m harmonic reproduce --list

A *profile* is a table ``notebook stem -> [(output name, parameters), ...]``: each entry executes
``notebooks/<stem>.ipynb`` with those parameters into ``<results dir>/<output name>.ipynb``, in table
order. ``default`` is the full reproduction, ``smoke`` the same notebooks with tiny parameters (what the
tests run); it writes under ``results/smoke`` unless ``--results-dir`` says otherwise, so it never
overwrites the real results. ``long`` is the default study at twice the length: its runs go beside the
default's (``results/runs``), its other notebooks, figures, report and timing to ``results/long``
(``OUTPUT_SUBDIRS``, passed as ``output_dir``); ``faster_rcnn``, the paper's ablation on Faster R-CNN, likewise
into ``results/faster_rcnn``, ``faster_rcnn_long``, its baseline and whole method at twice the length, into
``results/faster_rcnn_long``, ``faster_rcnn_data``, the same on ten times the training images, into
``results/faster_rcnn_data``, and ``faster_rcnn_data_long``, that at twice its length, into
``results/faster_rcnn_data_long``. To add a notebook, add one line to each profile.

Notebooks run with ``kernel_name="python3"`` and the repository root as working directory. The parameters
``results_dir``, ``coco_root`` and ``voc_root`` (from ``--results-dir`` / ``--coco-root`` / ``--voc-root``)
are passed to every notebook whose parameters cell declares them; the ``voc`` profile needs ``--voc-root``. An executed notebook is written to a temporary file and renamed
when the run succeeds, so a failed run never leaves a half-written copy under the output name: its
partial output is kept beside it as ``<output name>.failed.ipynb`` and the command exits non-zero.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harmonic.experiments.sweeps import SWEEPS, failed_runs, run_sweep
from harmonic.utils.files import atomic_write_json
from harmonic.utils.provenance import provenance

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
KERNEL_NAME = "python3"

Entry = tuple[str, dict[str, Any]]  # (output name, parameters)

def _training_entries(sweep_name: str) -> list[Entry]:
    """One ``03_train_eval`` entry per run of a named sweep, executed into ``runs/<run>/03_train_eval``."""
    return [(f"runs/{name}/03_train_eval", params) for name, params in SWEEPS[sweep_name].runs()]


def _convergence(sweep_name: str) -> dict[str, Any]:
    """Notebook 04's runs: seed 0 of the baseline and of Harmonic + HIoU (and of the detached variant, where
    the sweep has it)."""
    runs = {"baseline": f"{sweep_name}-baseline-s0", "harmonic + HIoU": f"{sweep_name}-harmonic_hiou-s0"}
    if "harmonic_hiou_detached" in SWEEPS[sweep_name].variants:
        runs["harmonic + HIoU, detached"] = f"{sweep_name}-harmonic_hiou_detached-s0"
    return {"runs": runs}


def _faster_rcnn_pair(sweep_name: str) -> dict[str, list[Entry]]:
    """A Faster R-CNN side profile of two variants, the baseline and the paper's whole method (Harmonic +
    task-contrasting + HIoU, the variant its verdict is about); notebook 04 draws their seed 0."""
    return {
        "03_train_eval": _training_entries(sweep_name),
        "04_convergence": [("04_convergence", {"runs": {
            label: f"{sweep_name}-faster_rcnn-{variant}-s0"
            for label, variant in (("baseline", "baseline"), ("harmonic + TC + HIoU", "harmonic_tc_hiou"))}})],
        "05_results": [("05_results", {"sweeps": [sweep_name], "main_variant": "harmonic_tc_hiou"})],
    }


PROFILES: dict[str, dict[str, list[Entry]]] = {
    "default": {
        "01_derivations": [("01_derivations", {})],
        "02_loss_landscapes": [("02_loss_landscapes", {"grid": 201, "dpi": 120})],
        "03_train_eval": _training_entries("default"),
        "04_convergence": [("04_convergence", _convergence("default"))],
        # the report reads the attribution and dose sweeps too, where their runs are committed (make sweep)
        "05_results": [("05_results", {"sweeps": ["default", "attribution", "head_norm", "factor_terms", "alpha", "gamma",
                                                 "beta_c", "comparison", "ablation"], "update_readme": "README.md"})],
    },
    "quick": {
        "01_derivations": [("01_derivations", {"n_points": 16})],
        "02_loss_landscapes": [("02_loss_landscapes", {"grid": 101, "dpi": 80})],
        "03_train_eval": _training_entries("quick"),
        "04_convergence": [("04_convergence", {**_convergence("quick"), "smooth": 10, "dpi": 80})],
        "05_results": [("05_results", {"sweeps": ["quick"], "dpi": 80})],
    },
    "smoke": {
        "01_derivations": [("01_derivations", {"n_points": 8})],
        "02_loss_landscapes": [("02_loss_landscapes", {"grid": 21, "gammas": [0.4, 0.8], "dpi": 40})],
        "03_train_eval": _training_entries("smoke"),
        "04_convergence": [("04_convergence", {**_convergence("smoke"), "smooth": 2, "dpi": 40})],
        "05_results": [("05_results", {"sweeps": ["smoke"], "dpi": 40})],
    },
    "coco": {
        "03_train_eval": _training_entries("coco"),
        "04_convergence": [("04_convergence", _convergence("coco"))],
        "05_results": [("05_results", {"sweeps": ["coco"]})],
    },
    # the default study at twice the length (about 80 minutes on the 2-core CPU, outside the default's budget):
    # its runs beside the default's under results_dir/runs, the rest in results_dir/long (OUTPUT_SUBDIRS)
    "long": {
        "03_train_eval": _training_entries("long"),
        "04_convergence": [("04_convergence", _convergence("long"))],
        "05_results": [("05_results", {"sweeps": ["long"]})],
    },
    # the paper's ablation rows on its ablation detector, Faster R-CNN R18-FPN on the test bed (about two hours on
    # the 2-core CPU): runs beside the default's, the rest in results_dir/faster_rcnn. Its own baseline, and the
    # method as the ablation builds it (+ task-contrasting, + HIoU) as the variant the report's verdict is about
    "faster_rcnn": {
        "03_train_eval": _training_entries("faster_rcnn_ablation"),
        "04_convergence": [("04_convergence", {"runs": {
            label: f"faster_rcnn_ablation-faster_rcnn-{variant}-s0"
            for label, variant in (("baseline", "baseline"), ("harmonic", "harmonic"),
                                   ("harmonic + TC + HIoU", "harmonic_tc_hiou"))}})],
        "05_results": [("05_results", {"sweeps": ["faster_rcnn_ablation"], "main_variant": "harmonic_tc_hiou"})],
    },
    # the whole method against the baseline on Faster R-CNN at 4800 iterations, 6 seeds (about 2.5 hours on the 2-core
    # CPU): runs beside the default's, the rest in results_dir/faster_rcnn_long
    "faster_rcnn_long": _faster_rcnn_pair("faster_rcnn_long"),
    # the same pair on ten times the training images, 4 seeds (about 1.7 hours): the rest in results_dir/faster_rcnn_data
    "faster_rcnn_data": _faster_rcnn_pair("faster_rcnn_data"),
    # that pair at 9600 iterations, 4 seeds (about 3 hours, two runs at a time): the rest in
    # results_dir/faster_rcnn_data_long
    "faster_rcnn_data_long": _faster_rcnn_pair("faster_rcnn_data_long"),
    # VOC07+12 trainval -> VOC07 test (make reproduce PROFILE=voc VOC_ROOT=VOCdevkit)
    "voc": {
        "03_train_eval": _training_entries("voc"),
        "04_convergence": [("04_convergence", _convergence("voc"))],
        "05_results": [("05_results", {"sweeps": ["voc"]})],
    },
}
DEFAULT_RESULTS_DIRS = {"default": "results", "quick": "results/quick", "smoke": "results/smoke", "coco": "results/coco", "voc": "results/voc",
                        "long": "results", "faster_rcnn": "results", "faster_rcnn_long": "results", "faster_rcnn_data": "results",
                        "faster_rcnn_data_long": "results"}
# Profiles whose training runs sit beside the default's (results_dir/runs, so they pair with the sweeps run
# there) while their other executed notebooks, figures, report and timing go to results_dir/<subdir>: the
# notebooks that declare ``output_dir`` get that folder, so the default's report and figures stay as they are.
OUTPUT_SUBDIRS = {"long": "long", "faster_rcnn": "faster_rcnn", "faster_rcnn_long": "faster_rcnn_long",
                  "faster_rcnn_data": "faster_rcnn_data", "faster_rcnn_data_long": "faster_rcnn_data_long"}
# Parameters filled from the command line, for the notebooks that declare them.
COMMAND_LINE_PARAMETERS = ("results_dir", "coco_root", "voc_root")
# Profiles that cannot run without a dataset given on the command line: profile -> parameter
REQUIRED_PARAMETERS = {"voc": "voc_root"}


class NotebookError(RuntimeError):
    """A notebook failed to execute; ``partial_path`` is where its partial output was kept (or None)."""

    def __init__(self, message: str, partial_path: Path | None) -> None:
        super().__init__(message)
        self.partial_path = partial_path


def notebook_path(stem: str, notebooks_dir: str | Path | None = None) -> Path:
    """``notebooks/<stem>.ipynb``; a clear error if there is no such notebook."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    path = folder / f"{stem}.ipynb"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.ipynb"))
        raise FileNotFoundError(f"notebook {stem!r} not found: no {path.name} in {folder} (found: {known})")
    return path


def declared_parameters(path: str | Path) -> set[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (empty if it has none)."""
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def run_notebook(
    stem: str,
    parameters: dict[str, Any] | None,
    output_path: str | Path,
    *,
    notebooks_dir: str | Path | None = None,
    progress_bar: bool = True,
    strict: bool = True,
) -> Path:
    """Execute ``notebooks/<stem>.ipynb`` with ``parameters`` into ``output_path`` (atomically).

    The kernel is ``python3`` and its working directory the repository root, so relative paths in the
    parameters are relative to the root; ``output_path`` is resolved against the caller's directory.
    With ``strict`` (default), a parameter the notebook's parameters cell does not declare is an error
    (papermill would only warn, and a misspelt parameter would silently keep its default).

    Returns:
        the path of the executed notebook.

    Raises:
        FileNotFoundError: no such notebook.
        ValueError: unknown parameters (with ``strict``).
        NotebookError: the execution failed; the partial output is at ``err.partial_path``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path(stem, notebooks_dir)
    parameters = dict(parameters or {})
    if strict and parameters:
        unknown = sorted(set(parameters) - declared_parameters(source))
        if unknown:
            raise ValueError(
                f"{source.name}: unknown parameter(s) {unknown}; its parameters cell declares "
                f"{sorted(declared_parameters(source))}"
            )
    output_path = Path(output_path).resolve()
    if output_path.suffix != ".ipynb":
        raise ValueError(f"output_path must end in .ipynb, got {str(output_path)!r}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    failed_path = output_path.with_name(f"{output_path.stem}.failed.ipynb")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output_path.stem}.", suffix=".partial.ipynb", dir=output_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    kernel_log = output_path.with_name(f"{output_path.stem}.kernel.log")
    try:
        with open(kernel_log, "wb") as log:
            papermill.execute_notebook(
                str(source),
                str(tmp_path),
                parameters=parameters,
                kernel_name=KERNEL_NAME,
                cwd=str(ROOT),
                log_output=False,
                progress_bar=progress_bar,
                kernel_manager_class=_kernel_manager_logging_to(log),
            )
    except KeyboardInterrupt:
        _keep_partial(tmp_path, failed_path)
        raise
    except Exception as err:
        kept = _keep_partial(tmp_path, failed_path)
        where = f"partial output kept at {kept}" if kept else "no partial output was written"
        summary = f"{err.ename}: {err.evalue}" if isinstance(err, PapermillExecutionError) else repr(err)
        raise NotebookError(f"notebook {stem} failed ({summary}); {where}; the kernel's own log is {kernel_log}",
                            kept) from err
    kernel_log.unlink(missing_ok=True)  # a finished notebook's kernel log holds only shutdown chatter
    _finalize(tmp_path, source, output_path)
    os.replace(tmp_path, output_path)
    failed_path.unlink(missing_ok=True)  # a stale failure from an earlier run no longer applies
    return output_path


def _kernel_manager_logging_to(log) -> type:
    """A kernel manager class whose kernels write their own log (stderr) to the open file ``log``.

    A kernel's stderr carries only its own diagnostics (a warning about its local TCP transport at start,
    "KeyboardInterrupt caught in kernel" at shutdown); what the notebook prints is captured separately,
    in the executed notebook. Without this, those lines would reach the terminal after every notebook.
    """
    from jupyter_client.manager import AsyncKernelManager  # papermill's stack, loaded when a notebook runs

    class KernelLoggingToFile(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["stderr"] = log
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return KernelLoggingToFile


def _finalize(tmp_path: Path, source: Path, output_path: Path) -> None:
    """Record repository-relative paths in the papermill metadata (not the temporary file's, nor this
    machine's absolute ones), write the repository root as ``.`` in text the cells printed (warnings name
    the files of ``.venv``, for example), and give the file the usual permissions (``mkstemp`` makes it
    private). Executed notebooks are shared results: they name no folder of the machine that made them."""
    import nbformat

    notebook = nbformat.read(tmp_path, as_version=4)
    meta = notebook.metadata.get("papermill")
    if meta is not None:
        meta["input_path"] = _parameter_path(source)
        meta["output_path"] = _parameter_path(output_path)
    root = str(ROOT) + os.sep
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and root in output.get("text", ""):
                output["text"] = output["text"].replace(root, "")
    nbformat.write(notebook, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)


def _keep_partial(tmp_path: Path, failed_path: Path) -> Path | None:
    """Move a failed run's partial notebook to ``failed_path`` (None if nothing was written)."""
    if tmp_path.is_file() and tmp_path.stat().st_size > 0:
        os.replace(tmp_path, failed_path)
        return failed_path
    tmp_path.unlink(missing_ok=True)
    return None


def _parameter_path(path: str | Path) -> str:
    """A path as a notebook (run from the repository root) should see it: relative to the root if inside."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(resolved)


def select(profile: str, only: list[str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """The ``(stem, output name, parameters)`` runs of ``profile``, filtered by stems or output names."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    runs = [(stem, name, dict(params)) for stem, entries in PROFILES[profile].items() for name, params in entries]
    if only:
        wanted = {w.strip() for item in only for w in item.split(",") if w.strip()}
        known = {stem for stem, _, _ in runs} | {name for _, name, _ in runs}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"--only: {unknown} not in profile {profile!r}; known: {sorted(known)}")
        runs = [r for r in runs if r[0] in wanted or r[1] in wanted]
    return runs


def reproduce(
    profile: str = "default",
    *,
    only: list[str] | None = None,
    results_dir: str | Path | None = None,
    coco_root: str | Path | None = None,
    voc_root: str | Path | None = None,
    keep_going: bool = False,
    progress_bar: bool = True,
    dry_run: bool = False,
    jobs: int | str = 1,
    started_at: float | None = None,
) -> int:
    """Execute the notebooks of ``profile`` into ``results_dir``; return a process exit status.

    ``started_at``: the Unix time the whole command began (``make reproduce`` passes the moment make
    started, before it set up the environment); ``reproduce_timing.json`` then also records the wall
    time from there (``total_wall_minutes``), beside the notebooks' own (``wall_minutes``).

    ``jobs``: how many training runs (``03_train_eval`` entries) execute at once, each in its own kernel
    with ``cpu_count // jobs`` threads; ``"auto"``: one per CPU core (at most 4) without CUDA, else 1.
    Small CPU runs share two cores better as two single-threaded processes than as one with two threads.

    ``dry_run``: run only the notebooks that declare a ``dry_run`` parameter (the training runs), with
    ``dry_run=True``: they check their data and train a few iterations, into ``*-dryrun`` outputs.

    ``coco_root`` / ``voc_root``: the dataset folder of the ``coco`` / ``voc`` profile. Raises
    ``ValueError`` (naming the command-line flag) when a profile's required folder is not given.
    """
    runs = select(profile, only)
    given = {"coco_root": coco_root, "voc_root": voc_root}
    required = REQUIRED_PARAMETERS.get(profile)
    if required is not None and given[required] is None:
        flag = "--" + required.replace("_", "-")
        raise ValueError(f"profile {profile!r} needs {flag} (make reproduce PROFILE={profile} "
                         f"{required.upper()}=...)")
    if dry_run:
        runs = [(stem, f"{name}-dryrun", {**params, "dry_run": True}) for stem, name, params in runs
                if "dry_run" in declared_parameters(NOTEBOOKS_DIR / f"{stem}.ipynb")]
    results_dir = Path(results_dir if results_dir is not None else DEFAULT_RESULTS_DIRS.get(profile, "results"))
    missing = sorted({stem for stem, _, _ in runs if not (NOTEBOOKS_DIR / f"{stem}.ipynb").is_file()})
    if missing:
        print(f"[reproduce] missing notebook(s) {missing} in {NOTEBOOKS_DIR}; nothing was run", file=sys.stderr)
        return 2
    extra = {"results_dir": _parameter_path(results_dir)}
    output_dir = results_dir / OUTPUT_SUBDIRS[profile] if profile in OUTPUT_SUBDIRS else results_dir
    if output_dir != results_dir:
        extra["output_dir"] = _parameter_path(output_dir)
    for key, value in given.items():
        if value is not None:
            extra[key] = _parameter_path(value)
    failures: list[str] = []
    jobs = resolve_jobs(jobs)
    started = time.perf_counter()

    def execute(index: int, stem: str, name: str, params: dict[str, Any]) -> str | None:
        declared = declared_parameters(NOTEBOOKS_DIR / f"{stem}.ipynb")
        params = {**{k: v for k, v in extra.items() if k in declared}, **params}
        if jobs > 1 and stem in PARALLEL_STEMS and "train_overrides" in declared:
            # several runs share the CPU: one thread each is faster than oversubscribed threads
            threads = threads_per_job(jobs)
            params["train_overrides"] = {"num_threads": threads, **params.get("train_overrides", {})}
        output = (results_dir if stem in PARALLEL_STEMS else output_dir) / f"{name}.ipynb"
        print(f"[reproduce] ({index}/{len(runs)}) {stem} -> {output}", flush=True)
        try:
            run_notebook(stem, params, output, progress_bar=progress_bar and jobs == 1)
        except (NotebookError, ValueError) as err:
            print(f"[reproduce] FAILED: {err}", file=sys.stderr, flush=True)
            return name
        return None

    position = 0
    for group in _groups(runs, jobs):
        if len(group) == 1:
            stem, name, params = group[0]
            failed = [execute(position + 1, stem, name, params)]
        else:
            start = position + 1
            with ThreadPoolExecutor(max_workers=jobs) as pool:  # each notebook runs in its own kernel process
                failed = list(pool.map(lambda item, start=start: execute(start + item[0], *item[1]), enumerate(group)))
        position += len(group)
        failures += [f for f in failed if f is not None]
        if failures and not keep_going:
            remaining = [n for _, n, _ in runs[position:]]
            if remaining:
                print(f"[reproduce] not run: {remaining}", file=sys.stderr)
            return 1
    if failures:
        print(f"[reproduce] {len(failures)} of {len(runs)} notebook(s) failed: {failures}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if not dry_run and only is None:
        timing = {"profile": profile, "notebooks": len(runs), "jobs": jobs, "wall_minutes": round(elapsed / 60.0, 2)}
        if started_at is not None:
            timing["total_wall_minutes"] = round((time.time() - started_at) / 60.0, 2)
        timing["provenance"] = provenance({"profile": profile, "jobs": jobs})
        atomic_write_json(output_dir / "reproduce_timing.json", timing)
    print(f"[reproduce] done: {len(runs)} notebook(s) in {output_dir} in {elapsed / 60.0:.1f} min")
    return 0


PARALLEL_STEMS = frozenset({"03_train_eval"})  # the training runs: executed into results_dir/runs/<run>


def threads_per_job(jobs: int) -> int:
    """The torch threads of each of ``jobs`` runs side by side: the machine's cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // jobs)


def resolve_jobs(jobs: int | str) -> int:
    if jobs == "auto":
        import torch

        return 1 if torch.cuda.is_available() else max(1, min(4, os.cpu_count() or 1))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f'jobs must be an integer >= 1 or "auto", got {jobs!r}')
    return jobs


def _groups(runs, jobs: int):
    """Consecutive runs of a parallel-safe notebook are grouped (up to all of them); others alone."""
    group: list = []
    for run in runs:
        if jobs > 1 and run[0] in PARALLEL_STEMS and (not group or group[0][0] == run[0]):
            group.append(run)
            continue
        if group:
            yield group
            group = []
        if jobs > 1 and run[0] in PARALLEL_STEMS:
            group = [run]
        else:
            yield [run]
    if group:
        yield group


def run_named_sweep(name: str, results_dir: str | Path = "results", *, jobs: int | str = 1) -> int:
    """``--sweep NAME``: run :data:`harmonic.experiments.sweeps.SWEEPS` [NAME], ``jobs`` runs at once (as
    :func:`reproduce`: ``"auto"`` is one per CPU core, at most 4, without CUDA; ``cpu_count // jobs``
    threads each); non-zero if any run failed."""
    if name not in SWEEPS:
        print(f"[reproduce] unknown sweep {name!r}; known: {sorted(SWEEPS)}", file=sys.stderr)
        return 2
    jobs = resolve_jobs(jobs)
    threads = threads_per_job(jobs) if jobs > 1 else None
    status = run_sweep(SWEEPS[name], _parameter_path(results_dir), run_notebook, jobs=jobs, threads=threads)
    failed = failed_runs(status)
    if failed:
        print(f"[reproduce] sweep {name}: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0
