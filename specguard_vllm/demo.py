"""`make demo`: show SpecGuard answering a request with its step decisions.

Uses the bundled tiny pair (models/tiny-target, models/tiny-draft) when it is
present; otherwise it builds a tiny random-weight pair on the fly and says so.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from specguard_vllm.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TARGET = REPO / "models" / "tiny-target"
BUNDLED_CONFIG = REPO / "configs" / "specguard.yaml"
DEMO_QUESTION = (
    "Mia has 12 red pencils and 7 blue pencils. She buys 5 more pencils. "
    "How many pencils does Mia have now?"
)


def main() -> int:
    if (BUNDLED_TARGET / "config.json").exists() and (REPO / "models/tiny-draft/config.json").exists():
        print(f"SpecGuard (reference engine) on the bundled pair: {BUNDLED_TARGET}", flush=True)
        return cli_main(["trace", "--target", str(BUNDLED_TARGET), "--config", str(BUNDLED_CONFIG),
                         "--prompt", DEMO_QUESTION, "--chat", "--max-tokens", "96"])
    print("The bundled pair is not in models/ yet: building a tiny random-weight pair "
          "on the fly (its text is not meaningful; the step decisions are real).", flush=True)
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_tiny_pair(Path(tmp))
        config = Path(tmp) / "specguard.yaml"
        config.write_text(f"method: specguard\nmodel: {paths['draft']}\nnum_speculative_tokens: 8\n"
                          "specguard: {seed: 0}\n")
        return cli_main(["trace", "--target", str(paths["target"]), "--config", str(config),
                         "--prompt", "a = 3\nb = ", "--max-tokens", "48"])


if __name__ == "__main__":
    sys.exit(main())
