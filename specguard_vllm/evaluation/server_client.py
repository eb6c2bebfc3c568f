"""Client side of a running `vllm serve`: concurrent streaming completions and `/metrics` scrapes.

`run_requests` sends every prompt as a streaming completion through the `openai` client from a
pool of `concurrency` threads and returns one `RequestResult` per prompt, in prompt order. TTFT
is the time to the first streamed chunk that carries a choice, latency the time to the end of the
stream, `output_tokens` the server's own count from the final usage chunk
(`stream_options={"include_usage": True}`). A failed request (HTTP error, timeout, broken stream)
is recorded in its own result's `error`; the other requests are unaffected.

`scrape_metrics` reads the server's Prometheus text into ``{"name{labels}": value}`` plus, for
every sample name, the sum over all its label sets under the bare name (so
``m["specguard_steps_total"]`` is accepted + rejected steps and ``m["vllm:iteration_tokens_total_count"]``
the number of engine iterations). `metric_delta` is ``after - before`` for one key.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import requests

__all__ = ["RequestResult", "metric_delta", "parse_prometheus", "run_requests", "scrape_metrics"]


@dataclass
class RequestResult:
    index: int                      # position of the prompt in the list given to run_requests
    text: str                       # concatenated streamed text ("" on error)
    output_tokens: int              # usage.completion_tokens of the final chunk (0 if none came)
    latency_s: float                # request sent -> stream finished (or failed)
    ttft_s: float | None            # request sent -> first chunk with a choice (None if none came)
    error: str | None               # "ExceptionType: message" when the request failed, else None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _root_url(base_url: str) -> str:
    """``http://host:port`` from either that or ``http://host:port/v1``."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


def _one_request(client, model: str, index: int, prompt: str | list[int], *, max_tokens: int,
                 temperature: float, extra_body: dict | None, timeout_s: float) -> RequestResult:
    start = time.perf_counter()
    ttft: float | None = None
    pieces: list[str] = []
    output_tokens = 0
    finish_reason = None
    try:
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
            stream=True, stream_options={"include_usage": True},
            extra_body=extra_body or None,
        )
        try:
            for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:
                    if ttft is None:
                        ttft = now - start
                    choice = chunk.choices[0]
                    pieces.append(choice.text or "")
                    if choice.finish_reason is not None:
                        finish_reason = choice.finish_reason
                if chunk.usage is not None:
                    output_tokens = int(chunk.usage.completion_tokens or 0)
                if now - start > timeout_s:
                    raise TimeoutError(f"request ran past its {timeout_s:g}s timeout")
        finally:
            stream.close()
    except Exception as exc:  # noqa: BLE001 - every failure is this request's result
        return RequestResult(index, "".join(pieces), output_tokens, time.perf_counter() - start,
                             ttft, f"{type(exc).__name__}: {exc}", finish_reason)
    return RequestResult(index, "".join(pieces), output_tokens, time.perf_counter() - start,
                         ttft, None, finish_reason)


def run_requests(
    base_url: str,
    model: str,
    prompts: Sequence[str | list[int]],
    *,
    max_tokens: int,
    concurrency: int,
    temperature: float = 0.0,
    extra_body: dict | Sequence[dict | None] | None = None,
    progress: Callable[[], object] | None = None,
    timeout_s: float = 600.0,
) -> list[RequestResult]:
    """Send every prompt as a streaming completion, at most `concurrency` in flight at once.

    `prompts` are text or token ids (the completions API takes a list of ints; use ids when the
    text already holds the special tokens the server's tokenizer would add again).
    `extra_body` is one dict for every request, or one entry (dict or None) per prompt.
    `progress()` is called without arguments once per finished request, from the calling thread
    (``tqdm(...).update`` fits). `timeout_s` bounds each request (HTTP timeout and total stream
    time). Results come back in prompt order.
    """
    from openai import OpenAI

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if extra_body is None or isinstance(extra_body, dict):
        bodies = [extra_body] * len(prompts)
    else:
        bodies = list(extra_body)
        if len(bodies) != len(prompts):
            raise ValueError(f"extra_body has {len(bodies)} entries for {len(prompts)} prompts")
    client = OpenAI(base_url=_root_url(base_url) + "/v1", api_key="unused",
                    timeout=timeout_s, max_retries=0)
    results: list[RequestResult | None] = [None] * len(prompts)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                   thread_name_prefix="specguard-client") as pool:
            futures = {
                pool.submit(_one_request, client, model, i, prompt, max_tokens=max_tokens,
                            temperature=temperature, extra_body=bodies[i], timeout_s=timeout_s): i
                for i, prompt in enumerate(prompts)
            }
            for future in concurrent.futures.as_completed(futures):
                result = future.result()  # _one_request never raises
                results[result.index] = result
                if progress is not None:
                    progress()
    finally:
        client.close()
    return [r for r in results if r is not None]


def _split_sample(line: str) -> tuple[str, str, str] | None:
    """``name{labels} value [timestamp]`` -> (name, "{labels}" or "", value); None if malformed."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i, in_quotes = brace + 1, False
        while i < len(line):
            ch = line[i]
            if in_quotes:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_quotes = False
            elif ch == '"':
                in_quotes = True
            elif ch == "}":
                break
            i += 1
        else:
            return None
        labels, rest = line[brace: i + 1], line[i + 1:]
    else:
        if space == -1:
            return None
        name, labels, rest = line[:space], "", line[space:]
    fields = rest.split()
    if not name or not fields:
        return None
    return name, labels, fields[0]


def _parse_value(text: str) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)  # "NaN" parses too


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{"name{labels}": value}`` plus per-name sums under ``name``.

    Comments (``# HELP``/``# TYPE``) and blank lines are skipped; label text is kept exactly as
    the server wrote it. A sample without labels is stored once under its bare name.
    """
    samples: dict[str, float] = {}
    sums: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = _split_sample(line)
        if parts is None:
            continue
        name, labels, value_text = parts
        try:
            value = _parse_value(value_text)
        except ValueError:
            continue
        if labels and labels != "{}":
            samples[name + labels] = value
        sums[name] = sums.get(name, 0.0) + value
    samples.update(sums)
    return samples


def scrape_metrics(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """GET ``/metrics`` of the server at `base_url` (with or without ``/v1``) and parse it."""
    response = requests.get(_root_url(base_url) + "/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse_prometheus(response.text)


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """``after[name] - before[name]``; a key absent from a scrape counts as 0."""
    return after.get(name, 0.0) - before.get(name, 0.0)
