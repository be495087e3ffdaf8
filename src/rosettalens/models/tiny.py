"""Tiny random models of every adapted architecture, built from configs (no download).

Used by the test-suite and by anyone who wants to try the API in a second. The tokenizer is a real
byte-level BPE (``tokenizers``) trained on a short built-in text, wrapped as a
``PreTrainedTokenizerFast`` with a ChatML chat template, so offsets, special tokens and chat
formatting behave as in real models.
"""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox")

_TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. One two three four five six seven eight nine ten.
January February March April May June July August September October November December.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15.
How do I bake bread at home? I'm sorry, but I can't help with that. Sure, here is how you do it.
Activation spaces of different language models can be mapped onto each other.
Café naïve résumé — 東京 北京 😀 emojis and   runs   of    whitespace.\tTabs\nnewlines.
def main():\n    return 42\n"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384  # tokenizer size; model vocab is padded to 400


@functools.lru_cache(maxsize=4)
def _tokenizer_json(add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(add_bos: bool = True, chat_template: bool = True):
    """A real byte-level BPE fast tokenizer with special tokens and (optionally) a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos)),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, n_layers: int = 3, d_model: int = 48):
    import transformers as T

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=400,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    n_heads = 6
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        extra = {"attention_bias": True} if family == "llama" else {}
        return cls(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=family == "qwen2",
            **extra,
            **common,
        )
    if family == "gemma2":
        return T.Gemma2Config(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=8,
            **common,
        )
    if family == "gemma3":
        return T.Gemma3TextConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=8,
            **common,
        )
    if family == "gpt2":
        return T.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=256, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, n_layers: int = 3, d_model: int = 48):
    """Return ``(hf_model, tokenizer)``: a random tiny model of ``family`` in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, n_layers=n_layers, d_model=d_model)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # random init leaves many weights tiny: make activations non-trivial for tests
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    add_bos = family not in ("gpt2", "gpt_neox", "qwen2")
    return model, tiny_tokenizer(add_bos=add_bos)
