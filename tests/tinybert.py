"""A tiny BERT (hidden 32, 2 layers, 2 heads) with a WordPiece tokenizer, made locally for tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by",
         "this", "be", "are", "or", "an", "at", "from", "which", "can", "not", "if"]
VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
                            *"abcdefghijklmnopqrstuvwxyz.,'\"()-:;!?0123456789",
                            *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]))
SENTENCES = ["The cat sat on the mat.", "A much longer sentence, with a comma, is here for the test.", "Hi.",
             "It is not that which can be, or is it?"]


def make_tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    """A randomly initialised BERT (hidden 32, 2 layers, 2 heads) with a WordPiece tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    tokenizer = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
