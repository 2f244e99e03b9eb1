"""The causal LM objective and generation of the KnowLIP decoder (sarkit.model.decoder).

Real MiniLM weights cut to 2 layers; random tensors stand in for projected image tokens. A
decoder overfit on a few (image, caption) and (image, prefix, continuation) rows must write
them back by greedy and beam search: that exercises the image conditioning, the prefix
conditioning and the whole generation path against the training layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sarkit.model import decoder as D
from sarkit.model.text import bert_hidden, build_bert, resolve_text_path

EOS, PAD = 102, 0
HIDDEN = 384
STEPS = 25  # AdamW steps of the overfit fixture (loss 11.4 -> about 0.1)

CAPTIONS = ["a village beside a river", "dense forest on hills", "an airport with two runways"]
# (image, prefix, continuation): one image, two prefixes of different length -> two answers
PREFIXED = [
    (0, "terrain :", "flat farmland"),
    (0, "the main target in the scene :", "a parked tank"),
    (1, "terrain :", "steep mountains"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These batches are a few dozen tokens: every op is latency-bound, and a second
    OpenMP thread only waits at barriers (3-8x slower here when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_path(None))


@pytest.fixture(scope="module")
def base():
    """Pretrained MiniLM (2 layers) with random cross-attention; never trained here."""
    torch.manual_seed(0)
    return build_bert(None, 2, True, True).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 6, HIDDEN, generator=torch.Generator().manual_seed(1))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _prefix_batch(tok, prefixes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prefix ids and mask (generate must left-align them itself)."""
    rows = [_ids(tok, p) for p in prefixes]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def trained(base, images, tok):
    """The base decoder overfit on captions and prefix -> continuation rows (~5 s)."""
    bos = D.dec_token_id(tok)
    model = copy.deepcopy(base).train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # tied; saves time
    rows = [(i, "", c) for i, c in enumerate(CAPTIONS)] + PREFIXED
    ids, mask, starts = D.lm_inputs(
        [_ids(tok, p) for _, p, _ in rows], [_ids(tok, c) for _, _, c in rows], bos, EOS, PAD
    )
    img = images[[i for i, _, _ in rows]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(STEPS):
        loss = D.lm_loss(model, ids, mask, img, prefix_lengths=starts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses
    return model.eval()


# ---------------------------------------------------------------- masks


def test_lm_pass_is_causal_and_mlm_pass_is_bidirectional(base, images):
    ids = torch.tensor([[1, 2023, 2003, 1037, 2235, 3231, EOS]] * 2)
    other = ids.clone()
    other[:, 4] = 4937  # change the token at position 4
    img = images[:2]
    for mask in (torch.ones_like(ids), torch.tensor([[1] * 7, [1] * 6 + [0]])):  # unpadded too
        with torch.no_grad():
            a, b = D.lm_hidden(base, ids, mask, img), D.lm_hidden(base, other, mask, img)
            ma, mb = (
                bert_hidden(base.bert, ids, mask, img),
                bert_hidden(base.bert, other, mask, img),
            )
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5), "LM: an earlier position saw t=4"
        assert (a[:, 4:6] - b[:, 4:6]).abs().amax() > 1e-2
        assert (ma[:, :4] - mb[:, :4]).abs().amax() > 1e-2, "MLM pass must be bidirectional"


def test_generation_path_is_causal_and_cross_attention_is_not(base, images):
    """transformers' own forward (what generate runs) under causal_self_attention."""
    ids = torch.tensor([[1, 2023, 2003, 1037, 2235, 3231]] * 2)
    other = ids.clone()
    other[:, 4] = 4937
    ones = torch.ones_like(ids)
    img = images[:2]
    flags = [c.is_causal for c in D._self_attentions(base)]
    with torch.no_grad(), D.causal_self_attention(base):
        a = base(ids, attention_mask=ones, encoder_hidden_states=img, use_cache=False).logits
        b = base(other, attention_mask=ones, encoder_hidden_states=img, use_cache=False).logits
        img2 = img.clone()
        img2[:, -1] += 1.0  # the last image token: a causal cross-attention would hide it
        c = base(ids, attention_mask=ones, encoder_hidden_states=img2, use_cache=False).logits
    assert [c.is_causal for c in D._self_attentions(base)] == flags  # restored
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-4)
    assert (a[:, 0] - c[:, 0]).abs().amax() > 1e-3
    with torch.no_grad():  # and the same numbers as the training pass
        ref = base.cls(D.lm_hidden(base, ids, ones, img))
    assert torch.allclose(a, ref, atol=1e-4)


# ---------------------------------------------------------------- loss


def test_lm_loss_targets_skip_padding_and_prefix(base, images):
    ids = torch.tensor(
        [
            [1, 2023, 2003, 1037, EOS, PAD, PAD],  # prefix 2: targets are 2003, 1037, EOS
            [1, 2235, 3231, 2006, 1996, 2314, EOS],  # prefix 1: all six following tokens
        ]
    )
    mask = (torch.arange(7)[None] < torch.tensor([[5], [7]])).long()
    img = images[:2]
    with torch.no_grad():
        logits = base.cls(D.lm_hidden(base, ids, mask, img)).float()
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        smooth = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none", label_smoothing=0.1
        )
        kw = {"prefix_lengths": torch.tensor([2, 1])}
        loss = D.lm_loss(base, ids, mask, img, **kw)
        hand = torch.cat([ce[0, 1:4], ce[1, 0:6]])
        assert torch.allclose(loss, hand.mean(), atol=1e-5)
        sums = D.lm_loss(base, ids, mask, img, reduction="sum", **kw)
        assert torch.allclose(sums, torch.stack([ce[0, 1:4].sum(), ce[1].sum()]), atol=1e-4)
        per = D.lm_loss(base, ids, mask, img, reduction="sample", **kw)
        assert torch.allclose(per, torch.stack([ce[0, 1:4].mean(), ce[1].mean()]), atol=1e-5)
        ls = D.lm_loss(base, ids, mask, img, label_smoothing=0.1, **kw)
        assert torch.allclose(ls, torch.cat([smooth[0, 1:4], smooth[1]]).mean(), atol=1e-5)
        # padding is neither target nor context: other pad ids, more pad columns change nothing
        junk = ids.clone()
        junk[0, 5:] = 999
        wide = F.pad(ids, (0, 3), value=PAD)
        assert torch.allclose(D.lm_loss(base, junk, mask, img, **kw), loss, atol=1e-5)
        assert torch.allclose(D.lm_loss(base, wide, F.pad(mask, (0, 3)), img, **kw), loss)
        # a target mask excludes more; [CLS] rows become LM rows through bos_id
        tm = torch.ones_like(ids, dtype=torch.bool)
        tm[1, 6] = False
        masked = D.lm_loss(base, ids, mask, img, target_mask=tm, **kw)
        assert torch.allclose(masked, torch.cat([ce[0, 1:4], ce[1, 0:5]]).mean(), atol=1e-5)
        cls_rows = ids.clone()
        cls_rows[:, 0] = 101
        assert torch.allclose(D.lm_loss(base, cls_rows, mask, img, bos_id=1, **kw), loss)


def test_lm_inputs_layout():
    ids, mask, starts = D.lm_inputs([[7, 8, 9], []], [[5], [4, 4]], 1, EOS, PAD)
    assert ids.tolist() == [[1, 7, 8, 9, 5, EOS], [1, 4, 4, EOS, PAD, PAD]]
    assert mask.tolist() == [[1] * 6, [1] * 4 + [0, 0]]
    assert starts.tolist() == [4, 1]
    ids, _, starts = D.lm_inputs([[7, 8, 9]], [[5, 6]], 1, EOS, PAD, max_tokens=5)
    assert ids.tolist() == [[1, 9, 5, 6, EOS]] and starts.tolist() == [2]  # prefix end kept
    ids, _, starts = D.lm_inputs([[7]], [[5, 6, 7, 8]], 1, EOS, PAD, max_tokens=4)
    assert ids.tolist() == [[1, 5, 6, EOS]] and starts.tolist() == [1]


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("beams", [1, 3])
def test_overfit_decoder_writes_each_images_caption(trained, images, tok, beams):
    bos = D.dec_token_id(tok)
    out = D.generate(trained, images, bos, EOS, PAD, num_beams=beams, max_new_tokens=12)
    assert D.ids_to_text(tok, out) == CAPTIONS
    for row in out.tolist():  # stopped by the end token, padded after it (beams too)
        assert EOS in row and set(row[row.index(EOS) + 1 :]) <= {PAD}


@pytest.mark.parametrize("beams", [1, 3])
def test_prefix_conditioning(trained, images, tok, beams):
    bos = D.dec_token_id(tok)
    pids, pmask = _prefix_batch(tok, [p for _, p, _ in PREFIXED])
    img = images[[i for i, _, _ in PREFIXED]]
    out = D.generate(trained, img, bos, EOS, PAD, pids, pmask, num_beams=beams)
    assert D.ids_to_text(tok, out) == [c for _, _, c in PREFIXED]


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "length_penalty": 0.6}])
def test_batched_prefixes_equal_one_by_one(base, images, tok, options):
    """Left padding, position ids and beam expansion must not change any row's result.

    On the untrained decoder: its near-random choices expose any numerical leak that an
    overfit model's wide margins would hide.
    """
    bos = D.dec_token_id(tok)
    prefixes = ["terrain :", "", "the main target in the scene :"]
    pids, pmask = _prefix_batch(tok, prefixes)
    for model in (base,):
        batched = D.generate(model, images, bos, EOS, PAD, pids, pmask, max_new_tokens=8, **options)
        for i, p in enumerate(prefixes):
            one_ids, one_mask = _prefix_batch(tok, [p]) if p else (None, None)
            one = D.generate(
                model,
                images[i : i + 1],
                bos,
                EOS,
                PAD,
                one_ids,
                one_mask,
                max_new_tokens=8,
                **options,
            )
            row = batched[i][: one.shape[1]]
            assert row.tolist() == one[0].tolist(), (i, p)
            assert (batched[i][one.shape[1] :] == PAD).all()


def test_greedy_is_the_teacher_forced_argmax(base, images, tok):
    """Generation (left-padded, cached) and training (right-padded, one pass) agree."""
    bos = D.dec_token_id(tok)
    prefixes = ["terrain :", "the main target in the scene :", ""]
    pids, pmask = _prefix_batch(tok, prefixes)
    out = D.generate(base, images, bos, EOS, PAD, pids, pmask, max_new_tokens=6, min_new_tokens=6)
    assert out.shape[1] == 6
    ids, mask, starts = D.lm_inputs([_ids(tok, p) for p in prefixes], out.tolist(), bos, EOS, PAD)
    with torch.no_grad():
        logits = base.cls(D.lm_hidden(base, ids, mask, images))
    logits[..., [bos, PAD]] = float("-inf")  # generate suppresses these by default
    for i, s in enumerate(starts.tolist()):
        assert logits[i, s - 1 : s + 5].argmax(-1).tolist() == out[i].tolist()


def test_nucleus_sampling_is_seeded_and_bounded(base, images, tok):
    bos = D.dec_token_id(tok)
    kw = {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "max_new_tokens": 7}
    state = torch.get_rng_state()
    a = D.generate(base, images, bos, EOS, PAD, seed=5, **kw)
    b = D.generate(base, images, bos, EOS, PAD, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a, b) and a.shape[1] <= 7
    other = D.generate(base, images, bos, EOS, PAD, seed=6, **kw)
    assert other.shape != a.shape or not torch.equal(other, a)
    greedy = D.generate(base, images, bos, EOS, PAD, max_new_tokens=7)
    tiny = D.generate(base, images, bos, EOS, PAD, seed=5, **{**kw, "top_p": 1e-6})
    assert torch.equal(tiny, greedy)  # a nucleus of one token is greedy decoding


def test_min_max_length_and_repetition_penalty(trained, images, tok):
    bos = D.dec_token_id(tok)
    out = D.generate(trained, images, bos, EOS, PAD, min_new_tokens=9, max_new_tokens=11)
    assert out.shape[1] >= 9 and not (out[:, :9] == EOS).any()  # captions end at 6 otherwise
    for beams in (1, 3):
        cut = D.generate(trained, images, bos, EOS, PAD, num_beams=beams, max_new_tokens=3)
        assert cut.shape[1] == 3
        assert D.ids_to_text(tok, cut) == [" ".join(c.split()[:3]) for c in CAPTIONS]
    # "a village beside a river" repeats "a": a strong penalty forbids that
    rep = D.generate(trained, images[:1], bos, EOS, PAD, repetition_penalty=1e4, max_new_tokens=8)
    words = [t for t in rep[0].tolist() if t not in (EOS, PAD)]
    assert len(words) == len(set(words)) and D.ids_to_text(tok, rep) != CAPTIONS[:1]


def test_generate_restores_training_mode(trained, images, tok):
    trained.train()
    try:
        D.generate(trained, images[:1], D.dec_token_id(tok), EOS, PAD, max_new_tokens=2)
        assert trained.training
    finally:
        trained.eval()


def test_ids_to_text(tok):
    ids = [[1, 1037, 2314, EOS, 2003], [2314, PAD, PAD]]
    assert D.ids_to_text(tok, ids) == ["a river", "river"]
    assert D.dec_token_id(tok) == 1
