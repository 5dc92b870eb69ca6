"""The tiny world's word-level, lowercased tokenizer, built with the ``tokenizers`` library
and wrapped as a ``transformers`` fast tokenizer so lm-eval, TRL and vLLM load it as usual.

Lowercasing matters: with case kept, words that open questions ("Who", "Which") would occur
only in the SFT data and their embeddings would never be trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from sftknow_eval.prompts import ANSWER_MARKER, QUESTION_MARKER

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, QUESTION_MARKER, ANSWER_MARKER)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(),
                                 normalizers.Lowercase()])


def words_of(texts: Iterable[str]) -> Counter[str]:
    """Count the pre-tokenized, normalised words of ``texts``."""
    normalizer = _normalizer()
    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += 1
    return counts


def build_tokenizer(texts: Iterable[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of ``texts`` (sorted, so ids are deterministic)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words_of(texts)):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = _normalizer()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and drops the space before punctuation.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[QUESTION_MARKER, ANSWER_MARKER],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
