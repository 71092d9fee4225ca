"""A GGUF's tokenizer as Hugging Face files: tokenizer.json (a `tokenizers.Tokenizer`), tokenizer_config.json and
generation_config.json, from llama.cpp's `tokenizer.ggml.*` metadata (byte-level BPE or sentencepiece BPE), so the
result equals what transformers' own GGUF loader builds."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# How text is cut into words before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp's names).
GPT2_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/Qwen2.5/Qwen3 vocabularies: llama3's cut, but every digit alone
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}  # GPT-2 regex after single digits
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def tokenizer_files(meta: dict, config: dict) -> tuple[Tokenizer, dict, dict]:
    """tokenizer.json (as a `tokenizers.Tokenizer`), tokenizer_config.json, generation_config.json."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    token_types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        tokenizer = byte_level_bpe(vocab, meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe(vocab, meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for these
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")

    # Control tokens (<|im_end|>, <s>) and user-defined ones (<think>) are matched whole in text.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t, t_type in zip(tokens, token_types) if t_type in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False)
         for t, t_type in zip(tokens, token_types) if t_type == TOKEN_USER_DEFINED]
    )

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if add_bos and bos is not None:
        bos_id = config["bos_token_id"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]

    # Instruct models often end a turn with a token other than eos (Llama 3's <|eot_id|>).
    stop_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None and meta[f"tokenizer.ggml.{key}"] not in stop_ids:
            stop_ids.append(meta[f"tokenizer.ggml.{key}"])
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids or None,
        "pad_token_id": config["pad_token_id"],
    }
    return tokenizer, tokenizer_config, generation_config


def byte_level_bpe(vocab: dict[str, int], meta: dict) -> Tokenizer:
    """GPT-2 style: every byte spelled as a printable character, BPE merges over those."""
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in LLAMA3_PRE))
    if pre in DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), GPT2_BYTE_LEVEL]
        )
    elif pre in LLAMA3_PRE or pre in QWEN2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT if pre in LLAMA3_PRE else QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = GPT2_BYTE_LEVEL
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(vocab: dict[str, int], meta: dict) -> Tokenizer:
    """Llama-2 style sentencepiece BPE: spaces as '▁', unknown bytes as <0xNN> tokens. Files without
    merges get them rebuilt from the token scores (higher score = merged earlier)."""
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(vocab)
        ranked = [
            (-scores[i], -k, -(len(token) - k), i, vocab[token[:k]], vocab[token[k:]], token[:k], token[k:])
            for token, i in vocab.items()
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = next((t for t, i in vocab.items() if i == unk_id), None)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
