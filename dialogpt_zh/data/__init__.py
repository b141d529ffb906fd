"""Corpus side: readers (files -> raw sessions), cleaning (sessions -> clean sessions), the token store.

Never imports `dialogpt_zh.engine`, `dialogpt_zh.training` or a command module (tests/test_layout.py).
"""
