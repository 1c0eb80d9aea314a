"""A word-level tokenizer over the dataset's closed vocabulary, saved and loaded like any HF one."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from models.dataset import vocabulary

PAD, BOS, EOS, UNK, IMAGE, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<sep>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE, SEP)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word: the questions use a few dozen words, so subwords would only add noise."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE, SEP],
    )
