"""Test-side names for the serving helpers (they live in the package for the demo too)."""

from specguard_vllm.serving import REPO, free_port, stop_process_group, vllm_serve_command, vllm_server, wait_healthy

__all__ = ["REPO", "free_port", "stop_process_group", "vllm_serve_command", "vllm_server", "wait_healthy"]
