"""Generative decoders: a causal LM exported with its KV cache (``export``), run token by token on ONNX
Runtime (``session``) and judged by perplexity and greedy agreement (``evaluate``).

Nothing here is imported by ``dlopt`` itself; torch and transformers load only inside ``export`` and
``source``, behind ``dlopt.core.optional.require`` (the ``llm`` extra).
"""
