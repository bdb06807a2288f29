"""Downloading from the CDS: a few requests in flight, retries, and a manifest of finished chunks
so an interrupted download resumes where it stopped."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aurora_sweep.config.study import DataConfig, StudyConfig
from aurora_sweep.data.era5.assemble import import_files, progress_bar
from aurora_sweep.data.era5.plan import CDS_URL, FIELDS_PER_REQUEST, Request, plan_requests
from aurora_sweep.data.era5.read import CorruptFileError, open_pieces
from aurora_sweep.data.era5.scratch import make_dir
from aurora_sweep.errors import AuroraSweepError

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
CREDENTIALS_HELP = (
    f"~/.cdsapirc must hold two lines 'url: {CDS_URL}' and 'key: <your-personal-access-token>'"
    " (the token is on your profile page at https://cds.climate.copernicus.eu/profile), or set the"
    " environment variables CDSAPI_URL and CDSAPI_KEY"
)

# --------------------------------------------------------------------------------------------
# Downloading


def _redact(text: str) -> str:
    """Hide anything that looks like a CDS personal access token."""
    text = re.sub(
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "<key>",
        text,
    )
    return re.sub(r"\b\d{3,8}:[0-9a-fA-F-]{20,}", "<key>", text)


@dataclass(frozen=True)
class _Failure:
    transient: bool
    message: str


def classify_failure(exc: BaseException, request: Request) -> _Failure:
    """Decide whether a failed retrieve is worth retrying, and what to tell the user if not."""
    if isinstance(exc, AuroraSweepError):  # already said in one line (check_reachable)
        return _Failure(False, str(exc))
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    text = _redact(str(exc) or type(exc).__name__)
    low = text.lower()

    def has_code(code: int) -> bool:
        return status == code or re.search(rf"\b{code}\b", low) is not None

    if "missing/incomplete configuration" in low or "configuration file" in low:
        return _Failure(False, f"no CDS credentials: {CREDENTIALS_HELP}")
    if has_code(401) or "authentication failed" in low or "invalid api key" in low:
        return _Failure(False, f"the CDS refused your key (HTTP 401): check it. {CREDENTIALS_HELP}")
    if has_code(403) or "licen" in low or "terms of use" in low:
        return _Failure(
            False,
            f"the CDS refused {request.dataset} (HTTP 403): the dataset's licence is not accepted."
            f" Log in, accept the licence at https://cds.climate.copernicus.eu/datasets/"
            f"{request.dataset}?tab=download (at the bottom of the page), then run the download"
            " again",
        )
    if has_code(413) or "too large" in low or "cost limit" in low or "request too big" in low:
        return _Failure(
            False,
            f"the CDS refused {request.target} as too large ({request.fields} fields): split it"
            " smaller with --max-fields (e.g. half the current value), or ask for fewer levels or"
            " a smaller region",
        )
    unreachable = _unreachable(exc, text)
    if unreachable is not None:
        return unreachable
    server = status is not None and 500 <= int(status) < 600
    if server or any(
        s in low
        for s in (
            "queued too long",
            "queue",
            "503",
            "502",
            "500",
            "504",
            "service unavailable",
            "try again",
        )
    ):
        return _Failure(
            True,
            f"the CDS kept failing for {request.target} ({text}); finished chunks are kept, run"
            " the download again later",
        )
    return _Failure(False, f"the CDS request for {request.target} failed: {text}")


def _unreachable(exc: BaseException, text: str) -> _Failure | None:
    """The failure of a CDS that cannot be reached (not retried: offline or a wrong url does not
    mend by waiting, and the CDS client has retried a dropped connection --retries times)."""
    low = text.lower()
    if any(
        s in low
        for s in (
            "name resolution",
            "name or service not known",
            "failed to resolve",
            "nodename nor servname",
            "getaddrinfo failed",
        )
    ):
        return _Failure(
            False,
            f"cannot reach the CDS: the name {_host(text)} does not resolve. Check the internet "
            "connection, a proxy (HTTPS_PROXY) and the url in ~/.cdsapirc (or CDSAPI_URL); "
            "finished chunks are kept, run the download again",
        )
    network = isinstance(exc, ConnectionError | TimeoutError) or any(
        s in low
        for s in (
            "connection",
            "name or service",
            "temporary failure in name",
            "max retries exceeded",
            "network is unreachable",
            "timed out",
        )
    )
    if not network:
        return None
    return _Failure(
        False,
        f"cannot reach the CDS at {_host(text)} ({_cause(text)}): check the internet "
        "connection, a proxy (HTTPS_PROXY) and the url in ~/.cdsapirc (or CDSAPI_URL), then "
        "run the download again; finished chunks are kept",
    )


def _host(text: str) -> str:
    """The host a requests/urllib3 connection error names, else the CDS's."""
    found = re.search(r"host='([^']+)'", text) or re.search(r"resolve '([^']+)'", text)
    return found.group(1) if found else CDS_URL.split("/")[2]


def _cause(text: str) -> str:
    """The last reason in a urllib3 error chain ('Connection refused', 'timed out')."""
    found = re.findall(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if found:
        return found[-1].strip()
    return "timed out" if "timed out" in text.lower() else "no connection"


def check_reachable(url: str, *, timeout: float = 10.0) -> None:
    """Say at once, in one line, when the CDS cannot be reached at all (offline, a wrong url, a
    proxy needed): the client would retry that for minutes before giving up."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    what = (
        "check the internet connection, a proxy (HTTPS_PROXY) and the url in ~/.cdsapirc (or "
        "CDSAPI_URL); finished chunks are kept, run the download again"
    )
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return  # the connection goes through the proxy: the request will tell
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror:
        raise AuroraSweepError(
            f"cannot reach the CDS: the name {host} does not resolve. {what[0].upper()}{what[1:]}"
        ) from None
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise AuroraSweepError(f"cannot reach the CDS at {host} ({reason}): {what}") from None


def _default_client(*, retries: int = 5, sleep: float = 10.0) -> Any:
    """cdsapi's client with its own retry loop held to `--retries` (its default tries 500
    times, two minutes apart, so an unreachable CDS would be waited on for hours) and its
    messages kept off the terminal: failures reach the user as one line from `classify_failure`.
    """
    import cdsapi

    try:
        url, _, _ = cdsapi.api.get_url_key_verify(None, None, None)
    except Exception:  # no credentials: the client below says so, classified by the caller
        url = None
    if url:
        check_reachable(url)  # before the client, which retries fetching the CDS's news

    def quiet(*args: Any, **kwargs: Any) -> None:
        log.debug("cdsapi: %s", " ".join(map(str, args)))

    # the client warns (in the thread that first uses it) when it cannot fetch the CDS's news,
    # and its HTTP layer logs every retry; a CDS that cannot be reached is said once, by the
    # failed request
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ecmwf\.datastores")
    logging.getLogger("multiurl").setLevel(logging.ERROR)
    return cdsapi.Client(
        quiet=True,
        progress=False,
        retry_max=retries + 1,
        sleep_max=sleep,
        timeout=30,
        info_callback=quiet,
        warning_callback=quiet,
        error_callback=quiet,
    )


def load_manifest(folder: Path) -> dict[str, dict]:
    """Finished chunks in the download folder: target -> {dataset, key, bytes, finished}."""
    path = folder / MANIFEST
    if not path.exists():
        return {}
    try:
        chunks = json.loads(path.read_text())["chunks"]
        return {k: dict(v) for k, v in chunks.items()}
    except (ValueError, KeyError, TypeError):
        return {}  # a damaged manifest only costs a re-download


def _save_manifest(folder: Path, chunks: dict[str, dict]) -> None:
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "chunks": chunks}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def check_chunk(path: Path) -> None:
    """Open every NetCDF in a downloaded chunk; raise `CorruptFileError` if one is broken."""
    for ds in open_pieces(path):
        try:
            for v in ds.data_vars.values():
                _ = v.isel({d: -1 for d in v.dims}).values  # touches the last block of the file
        except (OSError, RuntimeError, ValueError, IndexError) as e:
            raise CorruptFileError(path, str(e)) from None
        finally:
            ds.close()


def download_folder(data: DataConfig) -> Path:
    """Where the CDS chunks and their manifest live."""
    return data.store.parent / "cds"


def download(
    config: StudyConfig,
    *,
    client_factory: Callable[[], Any] | None = None,
    max_workers: int = 4,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 10.0,
    max_fields: int = FIELDS_PER_REQUEST,
) -> Path:
    """Fetch the chunks the store still needs from the CDS, then build the store.

    Finished chunks are listed in `<store parent>/cds/manifest.json` and never fetched again; a
    chunk is written to `<target>.partial` and renamed only once it opens cleanly. Transient
    failures (network, 5xx, long queues) are retried `retries` times with exponential backoff
    from `backoff` seconds; anything else stops the download with an `AuroraSweepError`.
    """
    folder = make_dir(download_folder(config.data))
    plan = plan_requests(config, max_fields=max_fields)
    chunks = load_manifest(folder)
    for stale in folder.glob("*.partial"):
        stale.unlink()
    done = {
        r.target
        for r in plan
        if (e := chunks.get(r.target)) is not None
        and e.get("key") == r.key
        and (folder / r.target).is_file()
        and (folder / r.target).stat().st_size == e.get("bytes")
    }
    chunks = {k: v for k, v in chunks.items() if k in done}
    todo = [r for r in plan if r.target not in done]
    if todo:
        _fetch_all(
            todo,
            folder,
            chunks,
            client_factory
            or functools.partial(_default_client, retries=retries, sleep=min(backoff, 120.0)),
            max_workers=max_workers,
            progress=progress,
            retries=retries,
            backoff=backoff,
            total=len(plan),
        )
    try:
        return import_files([folder / r.target for r in plan], config.data, progress=progress)
    except CorruptFileError as e:
        chunks.pop(e.path.name, None)
        _save_manifest(folder, chunks)
        e.path.unlink(missing_ok=True)
        raise AuroraSweepError(
            f"{e.path.name} was truncated or corrupt ({e}); it was removed from the manifest and"
            " deleted: run the download again to fetch it again"
        ) from None


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download: the finished chunks are kept, in-flight requests abandoned."""

    def __init__(self, finished: int, total: int, folder: Path) -> None:
        super().__init__(
            f"download interrupted: {finished} of {total} chunks are in {folder} (listed in "
            f"{MANIFEST}); run 'aurora-sweep data download' again to fetch the rest"
        )
        self.finished, self.total = finished, total


def _fetch_all(
    todo: list[Request],
    folder: Path,
    chunks: dict[str, dict],
    client_factory: Callable[[], Any],
    *,
    max_workers: int,
    progress: bool,
    retries: int,
    backoff: float,
    total: int,
) -> None:
    """Fetch `todo` with at most `max_workers` requests in flight.

    Worker threads only talk to the CDS; checking a file (HDF5 is not thread-safe), renaming it
    and writing the manifest happen on the calling thread. The workers are daemon threads: on
    Ctrl-C or a failure the calling thread stops at once instead of waiting for requests that
    may sit in the CDS queue for an hour; an abandoned request can only leave a `.partial`
    file, which the next download removes.
    """
    try:
        first = client_factory()
    except Exception as e:  # cdsapi raises a bare Exception for missing credentials
        raise AuroraSweepError(classify_failure(e, todo[0]).message) from None
    fetcher = _Fetcher(folder, client_factory, retries=retries, backoff=backoff)
    fetcher.local.client = first  # the calling thread never fetches, but keeps it alive
    threads = fetcher.start(todo, max_workers)
    interrupted = False
    outstanding = len(todo)
    with progress_bar(progress) as bar:
        task = bar.add_task("CDS chunks", total=total, completed=total - len(todo))
        try:
            while outstanding:
                try:
                    req, outcome = fetcher.results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                if fetcher.accept(req, outcome, chunks):
                    bar.advance(task)
                    outstanding -= 1
        except KeyboardInterrupt:
            interrupted = True
            fetcher.stop.set()
            raise DownloadInterrupted(total - outstanding, total, folder) from None
        finally:
            fetcher.finish(threads, settle=not interrupted)


class _Fetcher:
    """What `_fetch_all`'s worker threads share: the queues, a CDS client per thread, a stop."""

    def __init__(
        self, folder: Path, client_factory: Callable[[], Any], *, retries: int, backoff: float
    ) -> None:
        self.folder, self.client_factory = folder, client_factory
        self.retries, self.backoff = retries, backoff
        self.local = threading.local()
        self.stop = threading.Event()
        self.jobs: queue.Queue[tuple[Request, int]] = queue.Queue()
        self.results: queue.Queue[tuple[Request, int | BaseException]] = queue.Queue()

    def start(self, todo: list[Request], max_workers: int) -> list[threading.Thread]:
        """Queue `todo` and start the worker threads (daemons, see `_fetch_all`)."""
        for req in todo:
            self.jobs.put((req, 0))
        threads = [
            threading.Thread(target=self.work, name=f"cds-{i}", daemon=True)
            for i in range(max(1, min(max_workers, len(todo))))
        ]
        for thread in threads:
            thread.start()
        return threads

    def finish(self, threads: list[threading.Thread], *, settle: bool) -> None:
        """Stop the workers; after a failure (`settle`) give requests about to land a moment;
        remove every `.partial` file."""
        self.stop.set()
        if settle:
            deadline = time.monotonic() + 5.0
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for stale in self.folder.glob("*.partial"):
            stale.unlink(missing_ok=True)

    def client(self) -> Any:
        if not hasattr(self.local, "client"):
            self.local.client = self.client_factory()
        return self.local.client

    def fetch(self, req: Request, attempt: int) -> int:
        """Retrieve into `<target>.partial`; returns the attempts used so far."""
        partial = self.folder / f"{req.target}.partial"
        while True:
            try:
                self.client().retrieve(req.dataset, req.request, str(partial))
                return attempt
            except Exception as e:
                partial.unlink(missing_ok=True)
                failure = classify_failure(e, req)
                if not failure.transient or attempt >= self.retries:
                    raise AuroraSweepError(failure.message) from None
            if self.stop.wait(min(self.backoff * 2**attempt, 600.0)):
                raise AuroraSweepError("stopped")
            attempt += 1

    def work(self) -> None:
        """A worker thread: fetch queued requests until stopped; each result goes back."""
        while not self.stop.is_set():
            try:
                req, attempt = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.results.put((req, self.fetch(req, attempt)))
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                self.results.put((req, e))
            if self.stop.is_set():  # arrived after the download stopped: nobody will check it
                (self.folder / f"{req.target}.partial").unlink(missing_ok=True)

    def accept(self, req: Request, attempts: int, chunks: dict[str, dict]) -> bool:
        """On the calling thread: check an arrived file, then keep it and record it in the
        manifest (True), or queue it again when it arrived corrupt (False)."""
        partial, target = self.folder / f"{req.target}.partial", self.folder / req.target
        try:
            check_chunk(partial)
        except CorruptFileError as e:
            partial.unlink(missing_ok=True)
            if attempts >= self.retries:
                raise AuroraSweepError(
                    f"{req.target} arrived truncated or corrupt {attempts + 1} times"
                    f" ({e}); run the download again later"
                ) from None
            self.jobs.put((req, attempts + 1))
            return False
        os.replace(partial, target)
        chunks[req.target] = {
            "dataset": req.dataset,
            "key": req.key,
            "bytes": target.stat().st_size,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        _save_manifest(self.folder, chunks)
        return True
