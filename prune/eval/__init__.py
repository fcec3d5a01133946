"""Evaluators: each is ``__call__(model, tokenizer) -> dict[str, float]`` plus ``describe() -> dict``."""
