"""`vllm serve <target> --speculative-config <yaml>` with SpecGuard, through the real openai client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from specguard_vllm.serving import REPO, free_port, vllm_serve_command, vllm_server
from specguard_vllm.vllm_env import vllm_process_env

pytestmark = pytest.mark.slow
MODEL = "tiny"
PROMPTS = [f"{name} = {value}\n" for name, value in zip("abcdefgh" * 4, range(1, 33))]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("serve")
    config = scratch / "specguard.yaml"
    config.write_text(
        "method: specguard\n"
        f"model: {tiny_pair['draft']}\n"
        "num_speculative_tokens: 8\n"
        "specguard:\n  num_candidates: 2\n  tau: 0.3\n  seed: 0\n")
    with vllm_server(tiny_pair["target"], "--speculative-config", str(config),
                     "--served-model-name", MODEL, "--max-num-seqs", "16",
                     scratch_dir=scratch) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", timeout=120)


def test_servers_start_through_the_vllm_command_users_type():
    """The README's `vllm serve ...` is the `vllm` script in the venv, not `python -m`: the
    script must survive vLLM spawning its engine core (which re-imports the main module)."""
    from specguard_vllm.serving import vllm_command

    command = vllm_command()
    assert command == [str(Path(sys.executable).parent / "vllm")], (
        f"serve tests would not run the user's `vllm` command: {command} (run `make venv`)")
    text = Path(command[0]).read_text()
    assert 'if __name__ == "__main__":' in text


def metric_values(base_url: str, name: str) -> dict[str, float]:
    text = requests.get(base_url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def test_completion_chat_and_streaming(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert completion.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a = 3"}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.content is not None
    streamed = "".join(
        chunk.choices[0].text for chunk in client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True) if chunk.choices)
    assert streamed == completion.choices[0].text


def test_logprobs_belong_to_committed_tokens(client, tiny_pair):
    """Returned logprobs are the target's log-probs of the committed tokens, drafted or not."""
    import torch
    from transformers import AutoModelForCausalLM

    completion = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20,
                                           temperature=0, logprobs=1,
                                           extra_body={"return_token_ids": True})
    choice = completion.choices[0]
    prompt_ids, token_ids = list(choice.prompt_token_ids), list(choice.token_ids)
    assert len(choice.logprobs.token_logprobs) == len(token_ids) == completion.usage.completion_tokens
    target = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    with torch.no_grad():
        logits = target(torch.tensor([prompt_ids + token_ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt_ids) - 1: -1].gather(
        1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)
    assert choice.logprobs.token_logprobs == pytest.approx(expected.tolist(), abs=1e-3)


def test_n_greater_than_one_stop_strings_and_max_tokens_mid_step(client):
    many = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, n=3,
                                     temperature=1.0, seed=5)
    assert len(many.choices) == 3
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0)
    short = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(short.choices[0].text)
    text = full.choices[0].text
    if "\n" in text.strip("\n"):
        stop_word = text.strip("\n").split("\n")[1][:2]
        stopped = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30,
                                            temperature=0, stop=[stop_word])
        assert stop_word not in stopped.choices[0].text
        assert text.startswith(stopped.choices[0].text)


def test_seeded_sampling_is_reproducible(client):
    a = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0.9, seed=42)
    b = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0.9, seed=42)
    assert a.choices[0].text == b.choices[0].text


def test_32_concurrent_streams_complete_with_the_right_text(client):
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
                for p in PROMPTS}

    def stream(prompt):
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True)
        return prompt, "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = dict(pool.map(stream, PROMPTS))
    assert len(results) == 32
    mismatched = [p for p in PROMPTS if results[p] != expected[p]]
    assert not mismatched, mismatched


def test_bad_request_override_is_400_and_others_unaffected(client, server):
    from openai import BadRequestError

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        good = [pool.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=16,
                            temperature=0) for p in PROMPTS[:3]]
        with pytest.raises(BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                      extra_body={"vllm_xargs": {"tau": -1}})
        assert "tau" in str(info.value)
        assert all(f.result().choices[0].text for f in good)
    # A valid override changes this request's decisions only.
    before = metric_values(server, "specguard_steps_total")
    client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=24, temperature=0,
                              extra_body={"vllm_xargs": {"tau": 1.5}})
    after = metric_values(server, "specguard_steps_total")
    accepted = [k for k in after if 'decision="accepted"' in k]
    assert all(after[k] == before.get(k, 0.0) for k in accepted)


def test_disconnect_mid_stream_leaves_no_state_and_metrics_are_exposed(client, server):
    body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with requests.post(server + "/v1/completions", json=body, stream=True, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break  # the client goes away mid-stream
    client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=8, temperature=0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tracked = metric_values(server, "specguard_tracked_requests")
        if tracked and all(v == 0 for v in tracked.values()):
            break
        time.sleep(0.5)
    assert tracked and all(v == 0 for v in tracked.values()), tracked
    steps = metric_values(server, "specguard_steps_total")
    assert sum(steps.values()) > 0
    assert metric_values(server, "specguard_abgv_count")
    assert metric_values(server, "vllm:spec_decode_num_drafts_total")


def _serve_and_expect_refusal(target: Path, config_arg: str, scratch: Path) -> subprocess.CompletedProcess:
    return subprocess.run(vllm_serve_command(target, "--speculative-config", config_arg, port=free_port()),
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=vllm_process_env(scratch))


def test_bad_config_refused_at_server_start_with_validate_messages(tiny_pair, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"method: specguard\nmodel: {tiny_pair['draft']}\nnum_speculative_tokens: 8\n"
                   "specguard: {tau: -1, beta: 2}\n")
    result = _serve_and_expect_refusal(tiny_pair["target"], str(bad), tmp_path)
    assert result.returncode != 0
    validate = subprocess.run([sys.executable, "-m", "specguard_vllm.cli", "validate", str(bad)],
                              capture_output=True, text=True, cwd=REPO)
    for line in validate.stderr.strip().splitlines()[1:]:
        assert line.strip() in result.stderr + result.stdout


def test_incompatible_draft_refused_at_server_start(tiny_pair, tmp_path):
    config = tmp_path / "bad_vocab.yaml"
    config.write_text(f"method: specguard\nmodel: {tiny_pair['bad_vocab_draft']}\nnum_speculative_tokens: 8\n")
    result = _serve_and_expect_refusal(tiny_pair["target"], str(config), tmp_path)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert re.search(r"vocab", output, re.IGNORECASE), output[-3000:]
