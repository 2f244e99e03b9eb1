"""Search a SAR archive by a sentence: `sarkit embed` stores tile vectors, `sarkit search` ranks.

``archive``: the index folder (append-only chunks, an atomic manifest, the model's identity);
``embed``: the vision tower over tile records, resumable; ``backends``: exact numpy and
FAISS IVF (plugins of ``sarkit_index_backends``); ``geo``: bounding-box filters;
``query``: ranking, filters, ITM re-ranking and the outputs.
"""
