"""SpecGuard: verification-aware step-level speculative decoding for vLLM.

The package is split by job: `config` (the YAML users pass), `core` (the math,
no vLLM import), `reference` (a transformers oracle decoder), `tasks` and
`training` (the bundled tiny model pair), `cli` (the `specguard` command).
"""

__version__ = "0.1.0"
