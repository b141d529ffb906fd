"""Judging replies: automatic metrics, the arena's blind pairs and verdicts, people's feedback records."""
