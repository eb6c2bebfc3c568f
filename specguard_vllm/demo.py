"""`make demo`: serve the bundled tiny pair with SpecGuard and answer one request.

Starts ``vllm serve models/tiny-target --speculative-config configs/specguard.yaml``
(the plugin loads through vLLM's entry point), sends a chat request with the
official ``openai`` client, prints the answer and the step decisions the
server's worker logged for it, then stops the server. If the bundled pair is
missing it builds a tiny random-weight pair on the fly and says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TARGET = REPO / "models" / "tiny-target"
BUNDLED_DRAFT = REPO / "models" / "tiny-draft"
BUNDLED_CONFIG = REPO / "configs" / "specguard.yaml"
DEMO_QUESTION = (
    "Mia has 12 red pencils and 7 blue pencils. She buys 5 more pencils. "
    "Then she gives away 6 pencils. How many pencils does Mia have now?"
)


def _pick_models(workdir: Path) -> tuple[Path, Path, bool]:
    if (BUNDLED_TARGET / "config.json").exists() and (BUNDLED_DRAFT / "config.json").exists():
        return BUNDLED_TARGET, BUNDLED_CONFIG, True
    print("The bundled pair is not in models/: building a tiny random-weight pair on the fly "
          "(its text is not meaningful; the step decisions are real).", flush=True)
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build_tiny_pair

    paths = build_tiny_pair(workdir / "pair")
    config = workdir / "specguard.yaml"
    config.write_text(f"method: specguard\nmodel: {paths['draft']}\nnum_speculative_tokens: 8\n"
                      "specguard: {seed: 0}\n")
    return paths["target"], config, False


def main() -> int:
    from openai import OpenAI
    from transformers import AutoTokenizer

    from specguard_vllm.cli import format_step_table
    from specguard_vllm.config import load_config
    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.trace_records import step_records
    from specguard_vllm.vllm_env import vllm_process_env
    from specguard_vllm.serving import free_port, vllm_serve_command, wait_healthy

    run_dir = REPO / ".run"
    run_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        workdir = Path(tmp)
        target, config_path, bundled = _pick_models(workdir)
        log_path = workdir / "decisions.jsonl"
        port = free_port()
        env = vllm_process_env(run_dir / "scratch")
        env["SPECGUARD_DECISION_LOG"] = str(log_path)
        command = vllm_serve_command(target, "--speculative-config", str(config_path),
                                     "--served-model-name", "specguard-demo", port=port)
        print("$ vllm serve", target.relative_to(REPO) if bundled else target,
              "--speculative-config", config_path.relative_to(REPO) if bundled else config_path,
              flush=True)
        server_log = open(workdir / "server.log", "wb")
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO, start_new_session=True)
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_healthy(server, base_url, workdir / "server.log", 600)
            client = OpenAI(base_url=base_url + "/v1", api_key="unused")
            question = DEMO_QUESTION if bundled else "a = 3\nb = "
            started = time.perf_counter()
            response = client.chat.completions.create(
                model="specguard-demo", messages=[{"role": "user", "content": question}],
                max_tokens=128, temperature=0, extra_body={"return_token_ids": True})
            elapsed = time.perf_counter() - started
            choice = response.choices[0]
            print(f"\nuser: {question}\nassistant ({elapsed:.2f} s):\n{choice.message.content}\n")
            tokenizer = AutoTokenizer.from_pretrained(str(target))
            config = load_config(config_path)
            segmenter = StepSegmenter.from_tokenizer(tokenizer, config.specguard.step_delimiters)
            decisions = [json.loads(line) for line in log_path.read_text().splitlines()] \
                if log_path.exists() else []
            prompt_ids = list(getattr(response, "prompt_token_ids", None) or [])
            token_ids = list(getattr(choice, "token_ids", None) or [])
            steps = step_records(len(prompt_ids), token_ids, decisions, segmenter,
                                 lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))
            print("step decisions (from the server's worker):")
            print(format_step_table(steps))
            accepted = sum(1 for s in steps if s["accepted"])
            verified = sum(1 for s in steps if s["accepted"] is not None)
            print(f"\n{accepted}/{verified} drafted steps accepted; "
                  f"{response.usage.completion_tokens} tokens")
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
            server_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
