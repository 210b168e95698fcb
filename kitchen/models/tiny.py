"""A tiny, randomly initialised chat model built from a config, for smoke runs and tests.

Like the Hub's ``tiny-random-*`` checkpoints it is a real ``transformers`` model with a real tokenizer
and chat template, just small enough that a whole workflow runs in seconds on a CPU. Nothing is
downloaded: the byte-level BPE tokenizer is trained here on a fixed corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

from kitchen.atomic import atomic_directory
from kitchen.models.chat_template import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    words = [
        "what",
        "is",
        "the",
        "sum",
        "of",
        "plus",
        "minus",
        "times",
        "answer",
        "question",
        "reverse",
        "word",
        "letters",
        "count",
        "number",
        "you",
        "are",
        "a",
        "helpful",
        "assistant",
        "user",
        "system",
        "please",
        "give",
        "only",
        "result",
        "hello",
        "world",
        "the",
        "cat",
        "sat",
        "on",
        "mat",
    ]
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"{a} + {b} = {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)]
    lines += ["".join(chr(c) for c in range(32, 127))]
    return lines


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama model and tokenizer to ``out_dir`` (atomically) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        fast.save_pretrained(staging)
        (staging / "kitchen.json").write_text(json.dumps({"kind": "tiny-random", "seed": seed}))
    return out_dir
