"""T5 (PixArt-Sigma) and Gemma (SANA) tokenizers built in code, so the tiny pipelines need no download.

They are the real tokenizer classes (`T5TokenizerFast`, `GemmaTokenizerFast`) over small vocabularies
learned here from the same caption corpus the tiny CLIP tokenizer uses: a Unigram model with
SentencePiece-style metaspace pre-tokenization for T5, a byte-fallback BPE for Gemma, as the real ones.
"""

from __future__ import annotations

from typing import Any

from .clip_tokenizer import CORPUS

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def _corpus() -> list[str]:
    return [line.strip() for line in CORPUS.strip().splitlines() if line.strip()]


def make_t5_tokenizer(vocab_size: int = 600, model_max_length: int = 300) -> Any:
    """A T5TokenizerFast (Unigram + metaspace, `</s>` appended) over a learned vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>",
                                      initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,'-"))
    tok.train_from_iterator(_corpus(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def make_gemma_tokenizer(vocab_size: int = 700, model_max_length: int = 8192) -> Any:
    """A GemmaTokenizerFast (byte-fallback BPE, `<bos>` prepended) over a learned vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GemmaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_previous")  # type: ignore[call-arg]
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS + byte_tokens,
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz0123456789.,'-\n:"))
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                              pad_token="<pad>", model_max_length=model_max_length, padding_side="right")
