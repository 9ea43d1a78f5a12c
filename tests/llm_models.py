"""Tiny random-weight decoders built from a config, for the tests of dlopt.llm and the passes that serve it.

Imports torch and transformers when called, so a test module can skip first (``pytest.importorskip``)."""

from __future__ import annotations

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256


def tiny_llama(seed: int, *, tied: bool = False, init_range: float = 0.02):
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads, vocabulary 256) in eval mode, its weights drawn with
    ``seed`` at standard deviation ``init_range`` (transformers' default 0.02 gives near-uniform next-token
    distributions; larger ones give peaked ones, closer to what a trained model predicts).  ``tied``: the head
    reads the embedding table, as in SmolLM2."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
                                      tie_word_embeddings=tied, initializer_range=init_range)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()


def save_byte_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer without merges (one token per byte: ids 0-255, the tiny models' vocabulary),
    saved as transformers saves one (tokenizer.json, tokenizer_config.json) into ``folder``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(folder))
