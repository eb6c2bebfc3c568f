"""The config file: defaults, every refusal with its field path, safe YAML, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specguard_vllm.config import (
    ConfigError,
    SpecGuardParams,
    apply_request_overrides,
    load_config,
    parse_config_text,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
BASE = "method: specguard\nmodel: some/draft\nnum_speculative_tokens: 8\n"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    return dict(info.value.problems)


def test_defaults_are_the_papers():
    cfg = parse_config_text(BASE)
    p = cfg.specguard
    assert (p.num_candidates, p.draft_temperature, p.step_delimiters, p.tau, p.beta) == (4, 0.7, ["\n"], 0.5, 0.5)
    assert (p.grounding_layers, p.attention_sparsity, p.lpbv_floor, p.selector) == (3, 0.01, -5.0, "rouge_l")
    assert cfg.vllm_passthrough() == {"model": "some/draft", "num_speculative_tokens": 8}


@pytest.mark.parametrize(
    "block, path",
    [
        ("tau: .nan", "specguard.tau"),
        ("tau: -0.1", "specguard.tau"),
        ("tau: .inf", "specguard.tau"),
        ("beta: 1.5", "specguard.beta"),
        ("beta: -0.01", "specguard.beta"),
        ("num_candidates: 0", "specguard.num_candidates"),
        ("grounding_layers: 0", "specguard.grounding_layers"),
        ("step_delimiters: []", "specguard.step_delimiters"),
        ("step_delimiters: ['']", "specguard.step_delimiters"),
        ("lpbv_floor: 0.0", "specguard.lpbv_floor"),
        ("lpbv_floor: 2", "specguard.lpbv_floor"),
        ("attention_sparsity: 1.0", "specguard.attention_sparsity"),
        ("attention_sparsity: -0.5", "specguard.attention_sparsity"),
        ("draft_temperature: -1", "specguard.draft_temperature"),
        ("unknown_knob: 3", "specguard.unknown_knob"),
        ("tau: '0.5'", "specguard.tau"),
        ("num_candidates: 2.5", "specguard.num_candidates"),
        ("seed: true", "specguard.seed"),
        ("selector: cosine", "specguard.selector"),
        ("fallback: regenerate", "specguard.fallback"),
    ],
)
def test_bad_specguard_values_are_refused_with_their_path(block, path):
    found = problems(BASE + "specguard: {" + block + "}\n")
    assert path in found, found


def test_tau_above_one_and_zero_are_valid():
    assert parse_config_text(BASE + "specguard: {tau: 1.5}\n").specguard.tau == 1.5
    assert parse_config_text(BASE + "specguard: {tau: 0}\n").specguard.tau == 0.0


def test_top_level_problems_are_all_reported():
    found = problems("method: draft_model\nnum_speculative_tokens: 0\nextra: 1\n")
    assert set(found) == {"method", "model", "num_speculative_tokens", "extra"}
    assert found["extra"] == "unknown key"
    assert found["model"] == "required key is missing"


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['echo pwned']\n",
        BASE + "specguard: !!python/object/new:dict {}\n",
        "method: [unclosed\n",
        "",
        "- a list\n",
    ],
)
def test_unsafe_or_malformed_yaml_is_refused(text):
    with pytest.raises(ConfigError):
        parse_config_text(text)


def test_json_string_dict_and_path_all_resolve(tmp_path):
    payload = {"method": "specguard", "model": "d", "num_speculative_tokens": 4, "specguard": {"tau": 0.7}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(payload))
    for value in (json.dumps(payload), payload, path, str(path)):
        assert resolve_config(value).specguard.tau == 0.7
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(tmp_path / "missing.yaml")


def test_request_overrides_are_validated():
    base = SpecGuardParams()
    assert apply_request_overrides(base, {"tau": 0.9, "unrelated": 1}).tau == 0.9
    assert apply_request_overrides(base, {"specguard_beta": 0.25}).beta == 0.25
    assert apply_request_overrides(base, {"fallback": "speculative"}).fallback == "speculative"
    with pytest.raises(ConfigError, match="tau"):
        apply_request_overrides(base, {"tau": -1})
    with pytest.raises(ConfigError, match="beta"):
        apply_request_overrides(base, {"beta": "high"})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specguard_vllm.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_validate_accepts_the_bundled_config_and_prints_it_normalised():
    result = run_cli("validate", "configs/specguard.yaml")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["method"] == "specguard"
    assert printed["specguard"]["num_candidates"] == load_config(REPO / "configs/specguard.yaml").specguard.num_candidates


def test_all_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_validate_prints_every_problem_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "specguard:\n  tau: -1\n  beta: 3\n  bogus: 1\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for path in ("specguard.tau", "specguard.beta", "specguard.bogus"):
        assert path in result.stderr
