"""Evaluation: datasets and graders, `specguard bench`, `specguard calibrate`, reports."""
