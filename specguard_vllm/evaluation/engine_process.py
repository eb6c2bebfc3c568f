"""The bench's handle on one engine worker process (see engine_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from specguard_vllm.evaluation.engine_worker import ANSWER_PREFIX
from specguard_vllm.vllm_env import vllm_process_env

REPO = Path(__file__).resolve().parents[2]


class EngineFailed(RuntimeError):
    """The engine process died or refused to start; carries the end of its log."""


class EngineProcess:
    """Start ``engine_worker`` for one engine spec; send requests one at a time."""

    def __init__(self, name: str, spec: dict, scratch_dir: str | None = None):
        self.name = name
        scratch = scratch_dir or os.path.join(tempfile.gettempdir(), "specguard-bench")
        env = vllm_process_env(scratch)
        env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._log_tail: deque[str] = deque(maxlen=60)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "specguard_vllm.evaluation.engine_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=REPO, start_new_session=True)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        for line in self._proc.stderr:
            self._log_tail.append(line.rstrip())

    def _read_answer(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith(ANSWER_PREFIX):
                return json.loads(line[len(ANSWER_PREFIX):])
            self._log_tail.append(line.rstrip())
        self._proc.wait()
        tail = "\n".join(self._log_tail)
        raise EngineFailed(f"engine {self.name!r} exited with {self._proc.returncode}:\n{tail}")

    def wait_ready(self) -> None:
        answer = self._read_answer()
        if not answer.get("ready"):
            raise EngineFailed(f"engine {self.name!r} sent {answer} instead of ready")

    def generate(self, prompt_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, extra_args: dict | None = None) -> dict:
        request = {"op": "generate", "prompt_ids": list(prompt_ids), "max_tokens": max_tokens,
                   "temperature": temperature, "seed": seed, "extra_args": extra_args}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read_answer()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                pass
        if self._proc.poll() is None:
            import signal

            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
