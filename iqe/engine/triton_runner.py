"""A runner that infers on a Triton Inference Server (`iqe score --server URL`).

The client side of `iqe export-triton`: files are read and preprocessed here exactly as
for a local engine, batches go to the repository's `iqe_scorer` model, and the outputs
come back in the runner's usual form, so results rows equal local scoring.

- URL: ``grpc://HOST:PORT`` (default scheme, port 8001) or ``http://HOST:PORT`` (8000).
- Each batch is cut into requests of at most the model's `max_batch_size`, sent with
  `async_infer` so the server's dynamic batcher sees them together.
- One tritonclient client per thread (the HTTP client is not thread-safe), created lazily.
- A failed request is retried with exponential backoff; when it still fails, its rows
  fail with the server's message (`iqe.errors.InferenceFailed`), the other rows keep
  their results.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from urllib.parse import urlparse

import numpy as np

from iqe.engine.runners import Runner
from iqe.errors import InferenceFailed, InputError

MODEL = "iqe_scorer"  # iqe.export.triton.SCORER (not imported: that module needs protobuf)
OUTPUTS = ("score", "score_query", "score_text", "score_few", "map_max", "map", "map_smooth")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


def parse_server_url(url: str) -> tuple[str, str]:
    """(protocol, "host:port") of a server URL; gRPC when no scheme is given."""
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    protocol = {"grpc": "grpc", "http": "http", "https": "http"}.get(parsed.scheme)
    if protocol is None or not parsed.hostname:
        raise InputError(f"--server {url}: expected grpc://HOST:PORT or http://HOST:PORT")
    return protocol, f"{parsed.hostname}:{parsed.port or DEFAULT_PORTS[protocol]}"


class TritonRunner(Runner):
    """Inference on a Triton server's `iqe_scorer` model (see the module docstring)."""

    name = "triton"

    def __init__(self, url: str, model: str = MODEL, retries: int = 3, backoff: float = 0.2,
                 timeout: float = 60.0, outputs: tuple[str, ...] = OUTPUTS):
        super().__init__(image_size=0)  # learned from the server's model config on activation
        self.url = url
        self.protocol, self.address = parse_server_url(url)
        self.model = model
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.outputs = outputs
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list = []
        self.device = f"triton {self.protocol}://{self.address}"

    # -- clients --------------------------------------------------------------------------------
    def _module(self):
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as exc:
            raise InputError(f"--server needs tritonclient: pip install 'iqe-engine[scale]' ({exc})") from None
        return module

    def _client(self):
        """This thread's client (tritonclient's HTTP client must not be shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            kwargs = {"concurrency": 8, "network_timeout": self.timeout} if self.protocol == "http" else {}
            client = self._local.client = module.InferenceServerClient(self.address, **kwargs)
            with self._lock:
                self._clients.append(client)
        return client

    # -- Runner hooks -------------------------------------------------------------------------
    def _activate(self) -> None:
        client = self._client()
        try:
            ready = client.is_model_ready(self.model)
        except Exception as exc:  # connection refused, DNS, TLS: the server is not there
            raise InputError(f"--server {self.url}: cannot reach the server ({_first_line(exc)})") from None
        if not ready:
            raise InputError(f"--server {self.url}: model '{self.model}' is not ready on the server "
                             "(serve a repository written by `iqe export-triton`)")
        config = client.get_model_config(self.model, as_json=True) if self.protocol == "grpc" else \
            client.get_model_config(self.model)
        config = config.get("config", config)
        dims = [int(d) for d in config["input"][0]["dims"]]
        self.image_size = dims[-1]
        self.request_batch = max(1, int(config.get("max_batch_size", 1)))

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [(i, images[i:i + self.request_batch]) for i in range(0, len(images), self.request_batch)]
        results: dict[int, dict[str, np.ndarray]] = {}
        failures: dict[int, str] = {}
        pending = chunks
        for attempt in range(self.retries + 1):
            futures = [(start, chunk, self._submit(chunk)) for start, chunk in pending]
            pending = []
            for start, chunk, future in futures:
                try:
                    results[start] = future.result(timeout=self.timeout)
                    failures.pop(start, None)
                except Exception as exc:  # server or transport error: retried, then reported per row
                    failures[start] = _first_line(exc)
                    pending.append((start, chunk))
            if not pending:
                break
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        if not failures:
            return {k: np.concatenate([results[s][k] for s, _ in chunks]) for k in self.outputs}
        errors: list[str | None] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for start, chunk in chunks:
            failed = start in failures
            errors += [f"server {self.url} failed after {self.retries + 1} attempts: {failures[start]}"
                       if failed else None] * len(chunk)
            for k in self.outputs:
                parts[k].append(_nan_like(k, len(chunk), self.image_size) if failed else results[start][k])
        raise InferenceFailed(f"{sum(e is not None for e in errors)} of {len(images)} rows failed on {self.url}",
                              errors, {k: np.concatenate(v) for k, v in parts.items()})

    def _submit(self, chunk: np.ndarray) -> "Future | _HttpPending":
        """Send one request with async_infer; the future resolves to {output: [b] or [b,S,S] float32}."""
        module = self._module()
        inp = module.InferInput("images", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        wanted = [module.InferRequestedOutput(k) for k in self.outputs]
        future: Future = Future()
        client = self._client()

        def unpack(result) -> dict[str, np.ndarray]:
            # scores arrive as [b, 1] (config dims [1]); the runner contract is [b]
            return {k: np.asarray(result.as_numpy(k), dtype=np.float32).reshape(len(chunk), *(
                (self.image_size, self.image_size) if k.startswith("map") and k != "map_max" else ()))
                for k in self.outputs}

        try:
            if self.protocol == "grpc":
                def done(result, error) -> None:
                    if error is not None:
                        future.set_exception(error)
                        return
                    try:
                        future.set_result(unpack(result))
                    except Exception as exc:  # malformed response
                        future.set_exception(exc)

                client.async_infer(self.model, [inp], done, outputs=wanted, client_timeout=self.timeout)
            else:
                return _HttpPending(client.async_infer(self.model, [inp], outputs=wanted), unpack)
        except Exception as exc:  # connection refused before sending
            future.set_exception(exc)
        return future

    def _deactivate(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()


class _HttpPending:
    """The HTTP client's async request behind the `result()` of a future (its pool does the waiting)."""

    def __init__(self, request, unpack):
        self.request, self.unpack = request, unpack

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.unpack(self.request.get_result(timeout=timeout))


def _nan_like(key: str, rows: int, size: int) -> np.ndarray:
    shape = (rows,) if key in ("score", "score_query", "score_text", "score_few", "map_max") else (rows, size, size)
    return np.full(shape, np.nan, np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
