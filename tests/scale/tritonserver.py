"""Start the `tritonserver` binary bundled in the `nvidia-pytriton` wheel on loopback.

The wheel ships Triton with only the Python backend; `.ci/setup` installs it into its own
venv (`IQE_PYTRITON_VENV`, default /opt/iqe-pytriton: it pins numpy < 2). The Python
backend stub embeds libpython, so LD_LIBRARY_PATH must reach the lib dir of the Python it
was built for (pyenv keeps libpython outside the system path). The stub's interpreter is
isolated (PYTHONPATH is ignored) and finds its prefix through `python3` on PATH: the venv's
bin goes first, so the venv's packages (numpy < 2, the ABI the stub was built for) shadow
the system ones. '' (the working directory) leads sys.path, so the server runs in this
repository's root and the models import this checkout's `iqe`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("IQE_PYTRITON_VENV", "/opt/iqe-pytriton"))
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


def site_packages() -> Path:
    return VENV / "lib" / f"python{PYVER}" / "site-packages"


def triton_root() -> Path:
    return site_packages() / "pytriton" / "tritonserver"


def available() -> bool:
    return (triton_root() / "bin" / "tritonserver").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo) as server:` -> server.grpc_url / server.http_url, stopped on exit."""

    def __init__(self, model_repository: Path, timeout: float = 120.0):
        self.repo = Path(model_repository)
        self.timeout = timeout
        self.http_port, self.grpc_port = free_port(), free_port()
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "TritonServer":
        root = triton_root()
        self.workdir = Path(tempfile.mkdtemp(prefix="iqe-triton-"))
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (backend / name).symlink_to(root / "backends" / "python" / name)
        shutil.copy(root / "python_backend_stubs" / PYVER / "triton_python_backend_stub", backend)
        libs = [str(site_packages() / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env = dict(os.environ,
                   LD_LIBRARY_PATH=":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":"),
                   PATH=f"{VENV / 'bin'}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
        self.log = open(self.workdir / "server.log", "wb")
        cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={self.repo}",
               f"--backend-directory={self.workdir / 'backends'}", "--http-address=127.0.0.1",
               f"--http-port={self.http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--strict-readiness=true", "--exit-on-error=true", "--log-verbose=0", "--exit-timeout-secs=5"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                logs = self.logs()
                self.__exit__()
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}):\n{logs[-20000:]}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # connection refused while starting
                pass
            time.sleep(0.25)
        logs = self.logs()
        self.__exit__()
        raise RuntimeError(f"tritonserver not ready after {self.timeout} s:\n{logs[-20000:]}")

    def logs(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
