"""Vision-language tasks: retrieval, captioning, VQA, their data builders, text analysis."""
