"""Real components on loopback for the node tests: Orthanc, the node process, dcmtk clients."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[2]
ORTHANC = "/usr/sbin/Orthanc"
PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
# Absolute paths: pynetdicom installs its own storescu/echoscu scripts, which may come first on PATH.
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk reads it: no Nagle / delayed-ACK stalls on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class ChildServer:
    """A server child process: `terminate` signals, `stop` also waits for the PID (its ports are free only then)."""

    proc: subprocess.Popen | None = None

    def terminate(self) -> None:
        """SIGTERM without waiting (several servers then stop in parallel; `stop` waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL and reap (a crash, for durability tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Orthanc(ChildServer):
    """An Orthanc child process with its own storage, on free ports."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None,
                 extra: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.aet = folder, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        cfg = {"Name": aet, "DicomAet": aet, "HttpPort": self.http_port, "DicomPort": self.dicom_port,
               "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
               "DicomModalities": modalities or {}, "HttpServerEnabled": True, "StableAge": 1}
        cfg.update(extra or {})
        self.config.write_text(json.dumps(cfg, indent=1))
        self.proc: subprocess.Popen | None = None
        self.log = folder / "orthanc.log"

    def start(self, timeout: float = 20.0) -> "Orthanc":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Orthanc":
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=DCMTK_ENV)
        return self

    def wait_ready(self, timeout: float = 20.0) -> "Orthanc":
        wait_for(lambda: self._alive(), timeout, f"Orthanc on port {self.http_port} (log {self.log})")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: bytes):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def study_objects(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every instance Orthanc holds in a study, parsed."""
        found = self.post("/tools/lookup", study_uid.encode())
        out = []
        for hit in found:
            if hit["Type"] != "Study":
                continue
            for inst in self.get(f"/studies/{hit['ID']}/instances"):
                out.append(pydicom.dcmread(io.BytesIO(self.get(f"/instances/{inst['ID']}/file"))))
        return out

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def node_config(folder: Path, port: int, http_port: int, dest: Orthanc | None, quiet: float = 1.5,
                allow: list[tuple[str, str]] = (("STORESCU", "127.0.0.1"),), extra: str = "") -> Path:
    """A node.toml for the tests (demo bundle, torch backend, short quiet period and retries)."""
    allow_toml = "".join(f'\n[[node.allow]]\nae_title = "{ae}"\nhost = "{host}"\n' for ae, host in allow)
    dest_toml = (f'\n[destination]\nae_title = "{dest.aet}"\nhost = "127.0.0.1"\nport = {dest.dicom_port}\n'
                 if dest else "")
    text = (f'[node]\nae_title = "IQE_NODE"\nhost = "127.0.0.1"\nport = {port}\nspool = "{folder / "spool"}"\n'
            f'quiet_period_s = {quiet}\nhttp_port = {http_port}\n{allow_toml}\n[model]\nbackend = "torch"\nbatch = 8\n'
            f'\n[outbox]\nretry_initial_s = 0.2\nretry_max_s = 1.0\ntimeout_s = 5\n{dest_toml}{extra}')
    path = folder / "node.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class NodeProcess(ChildServer):
    """`python -m iqe.cli node --config ...` as a child process."""

    def __init__(self, config: Path, http_port: int) -> None:
        self.config, self.http_port = config, http_port
        self.log = config.parent / "node.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "NodeProcess":
        env = {**os.environ, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "iqe.cli", "node", "--config", str(self.config)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def wait_ready(self, timeout: float = 60.0) -> "NodeProcess":
        wait_for(self.healthy, timeout, f"node health (log {self.log})")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return self.http("/healthz")["status"] == "ok"
        except OSError:
            return False

    def http(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (0 when absent)."""
        total = 0.0
        for line in self.http("/metrics").splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head.split("{")[0] == name:
                    total += float(value)
        return total



def storescu(port: int, files: list[Path], aet: str = "STORESCU", called: str = "IQE_NODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send files with dcmtk's storescu (one association); returns the finished process."""
    return subprocess.run([STORESCU, "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def echoscu(port: int, aet: str, called: str = "IQE_NODE") -> subprocess.CompletedProcess:
    return subprocess.run([ECHOSCU, "-aet", aet, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)


def stop_all(*servers) -> None:
    """SIGTERM every server at once, then wait for each (shutdowns overlap)."""
    for s in servers:
        s.terminate()
    for s in servers:
        s.stop()
