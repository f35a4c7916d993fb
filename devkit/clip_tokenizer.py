"""A small but genuine CLIP byte-level BPE vocabulary, learned by code from an embedded corpus.

The tiny test pipelines need tokenizers that behave like the real CLIP ones (byte-level BPE with the
`</w>` end-of-word suffix, `<|startoftext|>`/`<|endoftext|>`, lower-casing, the same pre-tokenizer
regex) without downloading the 49k-entry vocabulary. A vocabulary made only of single bytes would also
"work", but every word would then be spelled letter by letter, which hides bugs around sequence length
and truncation; a few hundred learned merges give realistic multi-byte tokens for caption-like text.

The layout mirrors OpenAI's CLIP vocabulary: the 256 byte symbols, the same 256 with `</w>`, one entry per
merge in merge order, then the two special tokens. Because every byte is in the vocabulary, any input
(unicode, digits, punctuation) tokenizes without falling back to the unknown token.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from itertools import pairwise
from pathlib import Path

import regex

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_NUM_MERGES = 400

# CLIP's own pre-tokenizer pattern, so learned merges only ever span pieces the tokenizer will see.
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

# Photo-caption-like text: the merges it yields cover the words tests and the demo actually use.
CORPUS = """
a photo of a cat sitting on a red chair.
a close-up photo of a dog lying on the grass in the sun.
a painting of a mountain landscape at sunset with a lake in the foreground.
an oil painting of a woman wearing a blue dress and a straw hat.
a black and white photograph of a city street at night with cars and people.
a bowl of fresh fruit on a wooden table next to a window.
a red sports car parked in front of a modern house.
a little girl playing with a ball in the park on a sunny day.
a cup of coffee and a croissant on a white plate, morning light.
a portrait of an old man with a grey beard, studio lighting, high detail.
a watercolor illustration of a small village by the sea.
a bird sitting on a branch of a tree covered in snow.
two horses running across a field under a cloudy sky.
a bicycle leaning against a brick wall in an old town.
a plate of pasta with tomato sauce and basil, food photography.
a green forest with a river and tall trees, digital art.
a cozy living room with a sofa, a lamp and many plants.
the skyline of a big city seen from the water at dusk.
a yellow flower in a garden with a bee on it, macro photo.
a person walking a dog on the beach during the golden hour.
a boat floating on a calm lake surrounded by mountains.
a kitchen with white cabinets and a wooden floor, interior design.
a group of friends smiling and laughing at a party.
a white cat sleeping on a soft pillow next to the window.
a dramatic sky over the ocean with waves crashing on the rocks.
a cartoon drawing of a happy robot holding a flower.
a vintage photo of a train station with people waiting.
a bright orange sunset behind palm trees on a tropical island.
a stack of books on a desk with a pair of glasses and a pen.
an aerial view of a winding road through green hills.
a young woman reading a book in a cafe, soft focus.
a dog wearing a red scarf standing in the snow.
a street market with colorful fruits and vegetables.
a castle on top of a hill at sunrise, fantasy art, highly detailed.
a close-up of a child's face with freckles and bright eyes.
a glass of red wine on a table in a restaurant.
a man riding a horse along the beach at sunset.
a minimalist photo of a chair in an empty white room.
a butterfly resting on a purple flower in the spring.
a night sky full of stars above a small house in the desert.
"""


@cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table (bytes that would be whitespace or
    control characters are shifted above U+0100 so the BPE never sees them)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _word_symbols(piece: str) -> tuple[str, ...]:
    table = bytes_to_unicode()
    chars = [table[b] for b in piece.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


@cache
def learn_merges(corpus: str = CORPUS, num_merges: int = DEFAULT_NUM_MERGES) -> tuple[tuple[str, str], ...]:
    """Learn up to `num_merges` BPE merges from `corpus`, the same way CLIP's vocabulary was made.

    Ties between equally frequent pairs are broken by the pair itself, so the result (and therefore
    every weight shape downstream) is a pure function of the corpus.
    """
    words = Counter(_word_symbols(p) for p in _PRETOKENIZE.findall(corpus.lower()))
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break  # every word is a single symbol already: the corpus has nothing more to teach
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return tuple(merges)


def build_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """CLIP-layout vocabulary: bytes, bytes+`</w>`, merge results in merge order, then specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab: dict[str, int] = {}
    for tok in tokens:
        # Two merge paths can produce the same string ("ab"+"c", "a"+"bc"); the first id wins, as in
        # the tokenizers trainer, so ids stay dense.
        vocab.setdefault(tok, len(vocab))
    return vocab


def write_vocab_files(out_dir: str | Path, num_merges: int = DEFAULT_NUM_MERGES) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (the classic CLIP files) into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(num_merges=num_merges)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(build_vocab(merges), ensure_ascii=False, indent=None), encoding="utf-8")
    # The "#version" header is what CLIP's merges.txt starts with; loaders skip it.
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def make_clip_tokenizer(
    pad_token: str = EOS_TOKEN, model_max_length: int = 77, num_merges: int = DEFAULT_NUM_MERGES
):
    """Return a `transformers.CLIPTokenizer` over the learned vocabulary, built entirely in memory.

    `pad_token` follows the real checkpoints: SDXL's first tokenizer pads with `<|endoftext|>`, the
    second (OpenCLIP bigG) with `!`.
    """
    from transformers import CLIPTokenizer

    merges = learn_merges(num_merges=num_merges)
    # Passing the dict/list directly: in transformers 5 the `vocab_file=`/`merges_file=` keywords are
    # silently ignored and leave a 3-entry placeholder vocabulary.
    tok = CLIPTokenizer(
        vocab=build_vocab(merges),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    ids = tok("a photo of a cat sitting on a red chair").input_ids
    if len(ids) <= 5 or tok.unk_token_id in ids[1:-1]:
        raise RuntimeError(f"tiny CLIP tokenizer is broken: {ids}")
    return tok
