"""Train and evaluate the bundled tiny target/draft pair (no vLLM import here).

`tokenizer` builds the HF tokenizer, `model_config` holds the pair's shapes and step
budgets, `data` and `trainer` train one member, `evaluate` scores the pair, and
`commands` exposes `specguard train-pair` / `eval-pair`.
"""
