"""Caption text: tokenizers (word level, trained byte-level BPE, GPT-2) and GloVe embeddings."""
