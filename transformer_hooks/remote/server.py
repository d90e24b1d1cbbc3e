"""The HTTP server: one model, many researchers, requests as data (Starlette + uvicorn).

    python -m transformer_hooks serve --model PATH --tokens tokens.txt [--host 127.0.0.1 --port 8000]

Every request but ``/health`` needs ``Authorization: Bearer TOKEN`` with a token from the
tokens file (401 otherwise, before the body is read). The body's size is checked before it
is parsed (413 past ``--max-body-bytes``), then pydantic validates it (400 naming the
field), then the request is checked against the model (400 naming the unknown site, the
wrong shape or the bad selector) and against its token's limits (413 for tokens per
request and returned bytes, 429 for concurrent requests; the answer names the limit).
Only then does anything run.

One worker thread runs the model. ``run`` requests that arrive together (within
``--batch-window-ms`` of each other, or while the worker is busy) share a forward when
they have the same number of positions and padding kind (``jobs.py``); every other job
runs alone. A request past its timeout answers 504; a request whose client went away is
cancelled. A cancelled request is dropped from the queue, and a forward whose requests are
all cancelled stops at the next block. Hooks live in ``model.hooks()`` contexts of the
worker, so a failed or cancelled request leaves none.

A model split over processes (``--pipeline-ranks`` under torchrun) serves every request: rank 0
checks it, then every rank runs the same forward or job (``pipeline.py``). There a request is
dropped while queued, but a forward or job once begun runs to the end on every rank (its
client still gets 499 or 504 on time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from ..protocol import HookedModel
from . import jobs, pipeline
from .schema import (
    AttributionRequest,
    DLARequest,
    GenerateRequest,
    LensRequest,
    ParamsRequest,
    PatchRequest,
    RunRequest,
    TokenizeRequest,
    encode_tensors,
)

__all__ = ["Limits", "Server", "TokenTable", "make_app", "read_tokens"]


# Tokens and limits ----------------------------------------------------------------------------
@dataclass
class Limits:
    """Per-token limits. ``max_tokens``: tokens in one request (prompt tokens, plus
    ``max_new_tokens`` per prompt for generate); ``max_concurrent``: requests of the token in
    flight at once; ``max_response_bytes``: bytes of tensors one answer may return."""

    max_tokens: int = 8192
    max_concurrent: int = 8
    max_response_bytes: int = 256 * 2**20

    KEYS = ("max_tokens", "max_concurrent", "max_response_bytes")


@dataclass
class TokenEntry:
    """One line of the tokens file: the bearer ``token``, its ``name``, its ``limits``, and how many
    of its requests are ``active``.
    """

    token: str
    name: str
    limits: Limits
    active: int = 0


class TokenTable:
    """The tokens the server accepts (``read_tokens``).

    Args:
        entries: one ``TokenEntry`` per token; ValueError if there is none.
    """

    def __init__(self, entries: list[TokenEntry]) -> None:
        if not entries:
            raise ValueError("the tokens file has no token: every request would be refused")
        self.entries = entries

    def find(self, presented: str) -> TokenEntry | None:
        """The entry of the ``presented`` token, or None (compared with every token in constant time)."""
        found = None
        for e in self.entries:  # compare with every token, in constant time each
            if hmac.compare_digest(e.token.encode(), presented.encode()):
                found = e
        return found


def read_tokens(path: str | os.PathLike[str], defaults: Limits) -> TokenTable:
    """Read a tokens file: one token (16 characters or more) per line, then optional ``name=...`` and
    limits (``max_tokens=N max_concurrent=N max_response_bytes=N``); ``#`` starts a comment.

    Args:
        path: the tokens file.
        defaults: the limits of a token whose line names none.

    Raises:
        ValueError: a short token, a malformed or unknown option, or no token at all (with the line).
    """
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        token, options = words[0], words[1:]
        if len(token) < 16:
            raise ValueError(f"{path}:{n}: a token must have at least 16 characters")
        limits = Limits(defaults.max_tokens, defaults.max_concurrent, defaults.max_response_bytes)
        name = f"token{n}"
        for opt in options:
            key, sep, value = opt.partition("=")
            if not sep:
                raise ValueError(f"{path}:{n}: expected key=value, got {opt!r}")
            if key == "name":
                name = value
            elif key in Limits.KEYS:
                try:
                    setattr(limits, key, int(value))
                except ValueError:
                    raise ValueError(f"{path}:{n}: {key} must be a whole number, got {value!r}") from None
            else:
                raise ValueError(f"{path}:{n}: unknown option {key!r}; known: name, {', '.join(Limits.KEYS)}")
        entries.append(TokenEntry(token, name, limits))
    return TokenTable(entries)


class HTTPError(Exception):
    """An answer other than 200: ``status``, ``message`` and the ``limit`` it is past, if any."""

    def __init__(self, status: int, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.limit = status, message, limit


# The worker ---------------------------------------------------------------------------------
@dataclass
class Work:
    """One request for the worker: a prepared ``run`` (batched) or a job (a function of the model)."""

    prepared: jobs.Prepared | None
    job: Callable[[Any], Any] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    kind: str = "run"
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The one thread that runs the model, batching ``run`` requests of one key.

    Args:
        model: the served model.
        window: seconds the worker waits for more requests to join a forward.
        max_batch_rows: the most rows (prompts and their copies) in one forward.
        leader: a ``pipeline.Leader`` when the model is split over processes (else None).
    """

    def __init__(self, model: HookedModel, window: float, max_batch_rows: int, leader: Any = None) -> None:
        self.model, self.window, self.max_batch_rows = model, window, max_batch_rows
        self.leader = leader  # pipeline.Leader when the model is split over processes
        self.queue: collections.deque[Work] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.batches: list[int] = []  # requests per forward, for /health and the benchmark
        self.running: str | None = None  # the kind of the work running now
        self.arriving = 0  # requests being read and checked, soon queued
        self.thread = threading.Thread(target=self._loop, name="transformer-hooks-worker", daemon=True)
        self.thread.start()

    def submit(self, work: Work) -> None:
        """Queue ``work`` for the worker thread."""
        with self.cond:
            self.queue.append(work)
            self.cond.notify()

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """A request on its way to the queue (the worker waits a little for it to join a batch)."""
        with self.cond:
            self.arriving += 1
        try:
            yield
        finally:
            with self.cond:
                self.arriving -= 1
                self.cond.notify()

    def stop(self) -> None:
        """Ask the worker thread to stop after its current work."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def __len__(self) -> int:
        return len(self.queue)

    def _take(self) -> list[Work] | None:
        with self.cond:
            idle = False
            while not self.stopping and not self.queue and not idle:
                idle = not self.cond.wait(pipeline.HEARTBEAT if self.leader is not None else None)
            if self.stopping:
                return None
            if idle:  # followers of a model split over processes wait on us: tell them we are here
                first = None
            else:
                first = self.queue.popleft()
        if first is None:
            self.leader.send({"kind": "heartbeat"})
            return []
        if first.cancelled.is_set():
            return []
        if first.prepared is None:
            return [first]
        # Let requests sent together arrive: wait a window when nothing else is queued, and as long
        # as requests are being read and checked (up to a window more), so they join this forward.
        deadline = time.monotonic() + self.window
        with self.cond:
            if not self.queue and self.window > 0:
                self.cond.wait(self.window)
            while self.arriving > 0 and time.monotonic() < deadline + self.window:
                self.cond.wait(self.window / 4)
        key, rows = first.prepared.key, first.prepared.n_rows
        batch = [first]
        with self.cond:
            keep: collections.deque[Work] = collections.deque()
            while self.queue:
                w = self.queue.popleft()
                p = w.prepared
                if w.cancelled.is_set():
                    continue
                if p is not None and p.key == key and rows + p.n_rows <= self.max_batch_rows:
                    batch.append(w)
                    rows += p.n_rows
                else:
                    keep.append(w)
            self.queue = keep
        return batch

    def _loop(self) -> None:
        while True:
            try:
                batch = self._take()
            except Exception as e:  # e.g. a follower rank gone: say so, and keep serving what can be
                print(f"transformer-hooks serve: worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                time.sleep(1.0)
                continue
            if batch is None:
                if self.leader is not None:
                    self.leader.send({"kind": "stop"})
                return
            if batch:
                self.running = batch[0].kind
                try:
                    self._run(batch)
                finally:
                    self.running = None

    def _run(self, batch: list[Work]) -> None:
        if batch[0].prepared is None:
            job, model = batch[0].job, self.model
            assert job is not None
            if self.leader is not None:  # every rank runs it to the end: not cancelled once begun
                self._settle(batch[0], lambda: job(model))
                return

            def run() -> Any:
                with model.hooks(fwd_hooks=jobs.cancel_hooks(model, batch)):  # stops at a block once cancelled
                    return job(model)

            self._settle(batch[0], run)
            return
        items = [w.prepared for w in batch]
        for w, p in zip(batch, items, strict=True):
            p.cancelled = w.cancelled  # type: ignore[union-attr]
        self.batches.append(len(batch))
        try:
            if self.leader is not None:  # every rank runs the same forward
                self.leader.forward(items)
            results = jobs.run_batch(self.model, items, cancel=self.leader is None)  # type: ignore[arg-type]
        except Exception as e:
            if len(batch) == 1 or self.leader is not None:
                for w in batch:
                    self._fail(w, e)
                return
            for w in batch:  # one request's failure must not fail the others: each alone
                self._settle(w, functools.partial(_alone, self.model, w))
            return
        for w, r in zip(batch, results, strict=True):
            self._done(w, r)

    def _settle(self, w: Work, fn: Callable[[], Any]) -> None:
        if w.cancelled.is_set():
            self._fail(w, jobs.Cancelled("cancelled before it ran"))
            return
        try:
            self._done(w, fn())
        except Exception as e:
            self._fail(w, e)

    @staticmethod
    def _done(w: Work, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result (or the error) to the request's event loop."""

        def set() -> None:
            if w.future.done():
                return
            if error is not None:
                w.future.set_exception(error)
            else:
                w.future.set_result(result)

        w.loop.call_soon_threadsafe(set)

    @classmethod
    def _fail(cls, w: Work, e: BaseException) -> None:
        cls._done(w, error=e)


def _alone(model: HookedModel, w: Work) -> dict[str, torch.Tensor]:
    assert w.prepared is not None
    return jobs.run_batch(model, [w.prepared])[0]


# The application ----------------------------------------------------------------------------
class Server:
    """The model, its worker and the HTTP handlers (``make_app`` wraps them in Starlette).

    Args:
        model: the served model.
        tokens: the accepted tokens and their limits (``read_tokens``).
        max_body_bytes: the largest request body.
        timeout: seconds a request may take (a request may ask for less).
        batch_window: seconds the worker waits for more requests to join a forward.
        max_batch_rows: the most rows in one forward.
        model_name: the name ``/info`` reports.
        leader: a ``pipeline.Leader`` when the model is split over processes (every rank then runs each
            forward and job; see ``pipeline.py``).
    """

    def __init__(
        self,
        model: HookedModel,
        tokens: TokenTable,
        *,
        max_body_bytes: int = 64 * 2**20,
        timeout: float = 600.0,
        batch_window: float = 0.002,
        max_batch_rows: int = 64,
        model_name: str = "",
        leader: Any = None,
    ) -> None:
        self.model, self.tokens = model, tokens
        self.max_body_bytes, self.timeout = max_body_bytes, timeout
        self.model_name = model_name
        self.worker = Worker(model, batch_window, max_batch_rows, leader)
        self.split = leader is not None
        self.hook_names = list(model.hook_dict)
        self.others = {n for n, p in model.named_parameters() if p.is_meta}  # split: other ranks' weights

    # Checks before anything runs --------------------------------------------------------------
    def auth(self, headers: Any) -> TokenEntry:
        """The token entry of the bearer token in ``headers``; HTTPError 401 without a valid one."""
        header = headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        entry = self.tokens.find(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if entry is None:
            raise HTTPError(401, "a valid bearer token is needed (Authorization: Bearer TOKEN)")
        return entry

    async def body(self, request: Any) -> bytes:
        """The body of ``request``; HTTPError 413 past ``max_body_bytes`` (declared or read)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HTTPError(400, "bad Content-Length") from None
            if size > self.max_body_bytes:
                raise HTTPError(
                    413, f"the body is {size} bytes, past max_body_bytes={self.max_body_bytes}", "max_body_bytes"
                )
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body_bytes:
                raise HTTPError(413, f"the body is past max_body_bytes={self.max_body_bytes}", "max_body_bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def parse(schema: type[BaseModel], body: bytes) -> Any:
        """``body`` validated as ``schema``; HTTPError 400 naming the first bad field."""
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            if first["type"] == "json_invalid":
                raise HTTPError(400, f"bad JSON: {first['msg']}") from None
            raise HTTPError(400, f"bad request: {where}: {first['msg']} ({e.error_count()} error(s))") from None

    @staticmethod
    def check_tokens(entry: TokenEntry, n: int) -> None:
        """HTTPError 413 if ``n`` tokens are past ``entry``'s ``max_tokens``."""
        if n > entry.limits.max_tokens:
            raise HTTPError(413, f"the request has {n} tokens, past max_tokens={entry.limits.max_tokens}", "max_tokens")

    @staticmethod
    def check_bytes(entry: TokenEntry, n: int) -> None:
        """HTTPError 413 if an answer of ``n`` bytes is past ``entry``'s ``max_response_bytes``."""
        if n > entry.limits.max_response_bytes:
            raise HTTPError(
                413,
                f"the answer would be {n} bytes, past max_response_bytes={entry.limits.max_response_bytes}; "
                f"ask for fewer sites or prompts",
                "max_response_bytes",
            )

    # Running ------------------------------------------------------------------------------------
    async def wait(self, request: Any, work: Work, timeout: float) -> Any:
        """The result of ``work``: HTTPError 504 past ``timeout`` (seconds), 499 when the client of
        ``request`` goes away (the work is then cancelled).
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HTTPError(504, f"the request took longer than its timeout ({timeout:g} s)", "timeout")
                done, _ = await asyncio.wait({work.future}, timeout=min(left, 0.2))
                if done:
                    return work.future.result()
                if await request.is_disconnected():
                    raise HTTPError(499, "the client went away")
        finally:
            work.cancelled.set()  # a no-op once done; otherwise the worker drops or stops it

    async def handle(self, request: Any, kind: str) -> tuple[int, dict[str, Any]]:
        """Answer one ``request`` of ``kind`` (a key of ``SCHEMAS``): authenticate, parse, check the
        limits, queue, wait; returns (HTTP status, JSON body).
        """
        entry = self.auth(request.headers)
        # A forward request announces itself while it is read and checked, so the worker can wait
        # a moment for it to join the forward about to start.
        arriving = self.worker.arrival() if kind == "run" else contextlib.nullcontext()
        with arriving:
            req = self.parse(SCHEMAS[kind], await self.body(request))
            if entry.active >= entry.limits.max_concurrent:
                raise HTTPError(
                    429, f"this token already has {entry.active} requests in flight (max_concurrent)", "max_concurrent"
                )
            entry.active += 1
            try:
                work = self.work(kind, req, entry)
                if work is not None:
                    self.worker.submit(work)
            except BaseException:
                entry.active -= 1
                raise
            if work is None:  # tokenizing: answered here, without the model's worker
                entry.active -= 1
                return 200, jobs.run_tokenize(self.model, req)
        try:
            timeout = min(self.timeout, req.timeout) if getattr(req, "timeout", None) else self.timeout
            result = await self.wait(request, work, timeout)
            return 200, self.encode(entry, kind, result)
        finally:
            entry.active -= 1

    def work(self, kind: str, req: Any, entry: TokenEntry) -> Work | None:
        """The request ``req`` of ``kind`` checked against the model and the limits of ``entry``, as
        ``Work`` for the worker (None for ``tokenize``, answered without it).
        """
        model = self.model
        loop = asyncio.get_running_loop()
        if kind == "run":
            prepared = jobs.prepare_run(model, req)
            self.check_tokens(entry, prepared.n_tokens())
            self.check_bytes(entry, prepared.response_bytes(model))
            return Work(prepared, None, loop, loop.create_future(), kind, prepared.cancelled)
        if kind == "tokenize":
            self.check_tokens(entry, _text_size(req))
            return None
        if kind != "params":
            self.check_tokens(entry, _job_tokens(kind, req))
        job: Callable[[Any], Any]
        if self.split:  # every rank runs it: checked here, so that a bad request is never broadcast
            pipeline.check(model, kind, req)
            job = functools.partial(self.worker.leader.job, kind=kind, req=req)
        else:
            run = pipeline.JOBS[kind][1]
            job = lambda m: run(m, req)  # noqa: E731
        return Work(None, job, loop, loop.create_future(), kind)

    def encode(self, entry: TokenEntry, kind: str, result: Any) -> dict[str, Any]:
        """The JSON body for ``result`` of a ``kind`` request, tensors base64-encoded; HTTPError 413 past
        ``entry``'s ``max_response_bytes``.
        """
        if kind in ("dla", "lens"):
            plain, tensors = jobs.dataclass_fields(result)
            out = {"type": type(result).__name__, "fields": plain}
        elif kind == "generate":
            return result
        elif kind == "params":
            # A weight stored as a view (a transpose) goes out contiguous; its strides come along so the
            # client can lay it out the same way: matmuls then round as on the server.
            tensors, out = result, {"strides": {k: list(t.stride()) for k, t in result.items() if _dense(t)}}
        else:
            tensors, out = result, {}
        self.check_bytes(entry, sum(t.numel() * t.element_size() for t in tensors.values()))
        out["tensors"] = encode_tensors(tensors)
        return out

    def info(self, entry: TokenEntry) -> dict[str, Any]:
        """The ``/info`` answer for ``entry``: the model's name, config, dtype, sites, the token's limits
        and the jobs served.
        """
        model = self.model
        return {
            "model": self.model_name,
            "cfg": model.cfg.to_dict(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "tl_flags": sorted(model.tl_flags),
            "tokenizer": model.tokenizer is not None,
            "sites": self.hook_names,
            "cache_sites": model.cache_names(None),
            "limits": {k: getattr(entry.limits, k) for k in Limits.KEYS},
            "max_body_bytes": self.max_body_bytes,
            "timeout": self.timeout,
            "queue": len(self.worker),
            "jobs": {"patch": jobs.sweep_names("get_act_patch_"), "attribution": jobs.sweep_names("get_attr_patch_")},
        }

    def health(self) -> dict[str, Any]:
        """The ``/health`` answer: status, queue length, the work running,
        hooks attached, forwards, batched requests, and the bytes of other ranks' weights rank 0
        holds copies of (split over processes; 0 on one process).
        """
        held = sum(1 for hp in self.model.hook_dict.values() if hp.observed)
        batches = self.worker.batches
        return {
            "status": "ok",
            "queue": len(self.worker),
            "running": self.worker.running,
            "hooks_attached": held,
            "forwards": len(batches),
            "batched_requests": sum(batches),
            "held_weight_bytes": sum(
                p.numel() * p.element_size()
                for n, p in self.model.named_parameters()
                if n in self.others and not p.is_meta
            ),
        }


SCHEMAS: dict[str, type[BaseModel]] = {
    "run": RunRequest,
    "tokenize": TokenizeRequest,
    "patch": PatchRequest,
    "attribution": AttributionRequest,
    "dla": DLARequest,
    "lens": LensRequest,
    "generate": GenerateRequest,
    "params": ParamsRequest,
}


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its whole storage exactly (a permutation of a contiguous layout)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _text_size(req: Any) -> int:
    """A bound on a request's tokens before tokenizing: token rows, or characters of prompts."""
    if getattr(req, "tokens", None) is not None:
        return sum(len(t) for t in req.tokens)
    return sum(len(p) for p in req.prompts)


def _job_tokens(kind: str, req: Any) -> int:
    if kind in ("patch", "attribution"):
        return _text_size(req.clean) + _text_size(req.corrupted)
    if kind == "dla":
        return len(req.prompt)
    n = _text_size(req)
    if kind == "generate":
        rows = len(req.tokens) if req.tokens is not None else len(req.prompts)
        n += rows * req.max_new_tokens
    return n


def make_app(server: Server) -> Any:
    """The Starlette application of ``server``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(e: HTTPError) -> JSONResponse:
        content: dict[str, Any] = {"error": e.message}
        if e.limit is not None:
            content["limit"] = e.limit
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(content, status_code=e.status, headers=headers)

    def endpoint(kind: str) -> Callable:
        async def run(request: Request) -> Any:
            try:
                status, content = await server.handle(request, kind)
                return JSONResponse(content, status_code=status)
            except HTTPError as e:
                return error(e)
            except jobs.BadRequest as e:
                return error(HTTPError(400, str(e)))
            except jobs.Cancelled as e:
                return error(HTTPError(499, str(e)))
            except torch.OutOfMemoryError:
                return error(HTTPError(507, "out of memory running this request; ask for less"))
            except Exception as e:  # a bug or a model error: the message, not a traceback
                return error(HTTPError(500, f"{type(e).__name__}: {e}"))

        return run

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(server.health())

    async def info(request: Request) -> JSONResponse:
        try:
            entry = server.auth(request.headers)
        except HTTPError as e:
            return error(e)
        return JSONResponse(server.info(entry))

    routes = [Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"])]
    routes += [Route(f"/v1/{kind}", endpoint(kind), methods=["POST"]) for kind in SCHEMAS]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        server.worker.stop()

    return Starlette(routes=routes, lifespan=lifespan)
