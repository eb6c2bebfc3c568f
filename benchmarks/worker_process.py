"""A benchmark's engine in its own process, alive for the whole run (shared by the benchmarks
that interleave several engines, so drift on a noisy box hits every engine alike).

The child is the benchmark script itself, run as ``SCRIPT --worker SPEC_JSON``: it prints
``READY ...`` once warm, then answers each request line on stdin with one JSON line; anything
else it prints (vLLM's logs) goes to ``LOG_DIR/<script>.<name>.log``, whose tail is shown if
the child dies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class WorkerProcess:
    def __init__(self, script: str, name: str, spec: dict, log_dir: Path, cwd: Path | str,
                 env: dict | None = None):
        self.name = name
        self.log = open(log_dir / f"{Path(script).stem}.{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=cwd, env=env)

    def line(self) -> str:
        """The child's next ``READY`` or JSON line (other output is skipped)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = Path(self.log.name).read_text(errors="replace")[-4000:]
                raise SystemExit(f"{self.name} worker exited with {self.proc.returncode}:\n{tail}")
            if line.startswith(("READY", "{")):
                return line

    def request(self, text: str) -> dict:
        """Send one request line; its JSON answer."""
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return json.loads(self.line())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
