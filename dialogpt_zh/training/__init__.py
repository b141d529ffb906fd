"""Training side: model presets, batch planning over a token store, the training loop.

Never imports `dialogpt_zh.engine` or a command module (tests/test_layout.py).
"""
