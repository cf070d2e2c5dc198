"""Tiny Hugging Face tokenizers built offline in code (no downloads), saved to a folder
that ``AutoTokenizer.from_pretrained`` reads: a WordLevel model over a fixed word list,
lower-cased, split on whitespace and punctuation, with BERT-style ([CLS] ... [SEP]) or
RoBERTa-style (<s> ... </s>) special tokens."""

from __future__ import annotations

from pathlib import Path

#: frequent English words (and some of the movie snippets'); anything else is unknown
WORDS = ("the a an and or but of to in on at for with is was are were be been it this that these those not no very so too "
         "film movie story plot actor actors acting good bad great best worst funny boring dull fun love hate well "
         "i you he she they we his her their its one two all more most much some any just like than then there here "
         "what who how why when only also even ever never still too into out up down over off about by from as if "
         ". , ! ? ' \" - ( ) :").split()

STYLES = {"bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "roberta": ("<pad>", "<unk>", "<s>", "</s>")}


def write_tokenizer(folder: Path, style: str = "bert", words: tuple[str, ...] = WORDS, extra: int = 0, specials: bool = True) -> Path:
    """A WordLevel tokenizer of ``len(words) + 4 + extra`` tokens (``extra`` filler tokens
    make it larger, e.g. larger than a model's embedding) saved in ``folder``;
    ``specials=False``: it adds no classification/separator tokens around the text."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    pad, unk, cls, sep = STYLES[style]
    vocab = {tok: i for i, tok in enumerate((pad, unk, cls, sep, *words, *(f"filler{i}" for i in range(extra))))}
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pair = f"{cls} $A:0 {sep} $B:1 {sep}:1" if style == "bert" else f"{cls} $A:0 {sep} {sep} $B:0 {sep}"
    if specials:
        tok.post_processor = TemplateProcessing(single=f"{cls} $A:0 {sep}", pair=pair, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"] if style == "bert"
                                   else ["input_ids", "attention_mask"])
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder
