"""SCIO: self-consistent iterative optimisation of noisy caption segments (paper 3.4, Alg. 1).

The model judges its own texts a segment at a time. ``screen`` drops each segment of a text
and asks whether the image-text contrastive loss falls (dITC < 0) and the matching score
rises (dITM > 0) without it; confirmed segments form the noise pool, kept out of the next
stage's MLM/LM targets (``mlm_exclude``). ``reconstruct`` rewrites each noisy segment with
the decoder from the image and the other segments (its field label as the prompt) and keeps
a rewrite only when it beats the original text on both scores; otherwise the field is
removed. ``driver`` runs the stages through the shared training loop, resumable by stage.

Modules: ``options`` (ScioOptions), ``records`` (which records SCIO can judge), ``infill``
(the decoder's "other segments + field label -> segment" rows), ``screen``, ``reconstruct``,
``stagetrain`` (the training stages), ``driver``, ``report``, ``ablation``, ``plugin``.
"""
