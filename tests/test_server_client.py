"""specguard_vllm.evaluation.server_client: Prometheus parsing (fast) and the client against a real server (slow)."""

from __future__ import annotations

import math

import pytest

from specguard_vllm.evaluation.server_client import metric_delta, parse_prometheus

# Captured from `vllm serve models/tiny-target --speculative-config configs/specguard.yaml`
# (trimmed), plus synthetic lines for the corners of the text format.
SAMPLE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="tiny"} 28.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="tiny"} 120.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 286.0
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_sum{engine="0",model_name="tiny"} 672.0
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="tiny"} 39.0
vllm:iteration_tokens_total_bucket{engine="0",le="8.0",model_name="tiny"} 92.0
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="tiny"} 104.0
vllm:iteration_tokens_total_count{engine="0",model_name="tiny"} 104.0
# HELP specguard_steps_total SpecGuard verified steps by decision
# TYPE specguard_steps_total counter
specguard_steps_total{decision="accepted",model_name="tiny"} 13.0
specguard_steps_total{decision="rejected",model_name="tiny"} 15.0
# HELP specguard_tracked_requests Requests with SpecGuard step state in the worker (0 when idle: nothing leaks)
# TYPE specguard_tracked_requests gauge
specguard_tracked_requests{model_name="tiny"} 0.0

# TYPE process_open_fds gauge
process_open_fds 42.0
odd_metric{path="a b}c",quote="say \\"hi\\"",empty=""} 1.5 1712345678000
nan_metric NaN
neg_inf_metric{x="1"} -Inf
"""


def test_parse_prometheus_labels_histograms_comments():
    m = parse_prometheus(SAMPLE)
    assert not any(key.startswith("#") for key in m)
    assert m['specguard_steps_total{decision="accepted",model_name="tiny"}'] == 13.0
    assert m['specguard_steps_total{decision="rejected",model_name="tiny"}'] == 15.0
    assert m["specguard_steps_total"] == 28.0  # per-name sum over label sets
    assert m["vllm:iteration_tokens_total_count"] == 104.0
    assert m["vllm:iteration_tokens_total_sum"] == 672.0
    assert m['vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="tiny"}'] == 104.0
    assert m["vllm:generation_tokens_total"] == 286.0
    assert m["specguard_tracked_requests"] == 0.0
    assert m["process_open_fds"] == 42.0  # no labels: stored once under the bare name
    assert m['odd_metric{path="a b}c",quote="say \\"hi\\"",empty=""}'] == 1.5  # timestamp ignored
    assert m["odd_metric"] == 1.5
    assert math.isnan(m["nan_metric"])
    assert m["neg_inf_metric"] == -math.inf
    assert "vllm:iteration_tokens_total" not in m  # a histogram has only its _sum/_bucket/_count


def test_metric_delta():
    before = parse_prometheus(SAMPLE)
    after = parse_prometheus(
        SAMPLE.replace('"rejected",model_name="tiny"} 15.0', '"rejected",model_name="tiny"} 20.0')
        + 'specguard_steps_total{decision="fallback",model_name="tiny"} 2.0\n')
    assert metric_delta(before, after, "specguard_steps_total") == 7.0
    assert metric_delta(before, after, 'specguard_steps_total{decision="rejected",model_name="tiny"}') == 5.0
    assert metric_delta(before, after, 'specguard_steps_total{decision="fallback",model_name="tiny"}') == 2.0
    assert metric_delta(before, after, "never_seen") == 0.0
    assert metric_delta(before, after, "vllm:generation_tokens_total") == 0.0


@pytest.mark.slow
def test_run_requests_against_a_specguard_server(tmp_path):
    from transformers import AutoTokenizer

    from specguard_vllm.evaluation.server_client import run_requests, scrape_metrics
    from specguard_vllm.serving import REPO, vllm_server
    from specguard_vllm.tasks import generate, grade_solution
    from specguard_vllm.training.tokenizer import prompt_text

    target = REPO / "models" / "tiny-target"
    problems = generate("test", 6, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(target)
    # prompt_text already starts with <bos>; the server would add a second one to a text prompt.
    prompts = [tokenizer(prompt_text(p.question), add_special_tokens=False)["input_ids"]
               for p in problems]
    assert all(ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
               for ids in prompts)

    with vllm_server(target, "--speculative-config", str(REPO / "configs" / "specguard.yaml"),
                     "--served-model-name", "tiny", "--max-num-seqs", "8",
                     scratch_dir=tmp_path) as url:
        before = scrape_metrics(url)
        done = []
        serial = run_requests(url, "tiny", prompts, max_tokens=96, concurrency=1,
                              progress=lambda: done.append(1))
        parallel = run_requests(url + "/v1", "tiny", prompts, max_tokens=96, concurrency=3)
        after = scrape_metrics(url)

        bodies = [None] * len(prompts)
        bodies[2] = {"vllm_xargs": {"tau": -1}}
        mixed = run_requests(url, "tiny", prompts, max_tokens=96, concurrency=3, extra_body=bodies)

    assert len(done) == len(prompts)
    for results in (serial, parallel):
        assert [r.index for r in results] == list(range(len(prompts)))
        for r in results:
            assert r.error is None, r.error
            assert r.output_tokens > 0 and r.text
            assert r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
    assert [r.text for r in parallel] == [r.text for r in serial]
    assert sum(grade_solution(p, r.text).correct for p, r in zip(problems, serial)) >= 3

    assert metric_delta(before, after, "specguard_steps_total") > 0
    assert metric_delta(before, after, "vllm:generation_tokens_total") == sum(
        r.output_tokens for r in serial + parallel)

    bad = mixed[2]
    assert bad.error is not None and "400" in bad.error and "tau" in bad.error
    assert bad.text == "" and bad.output_tokens == 0 and bad.ttft_s is None
    for i, r in enumerate(mixed):
        if i != 2:
            assert r.error is None, r.error
            assert r.text == serial[i].text
