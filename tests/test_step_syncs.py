"""The KnowLIP step without avoidable host syncs, and with the losses it had before.

On a GPU every ``.item()``, ``if tensor.any()`` and boolean-index assignment stops the host
until the device catches up. The step read the queue's pointer and fill level, branched on
``empty.any()`` for ITM negatives, assigned MLM masks by boolean index and the loop read
every loss with ``.item()`` per micro-batch. Counted here with the torch profiler on the
CPU (the same ops a GPU would sync on), and the losses checked against the values the
step gave before the change (recorded at commit 9c24b70 with this test's setup).
"""

from __future__ import annotations

import collections
import contextlib
import random

import pytest
import torch
from conftest import tiny_bert

from sarkit.model import TERRAIN_FIELDS

# loss, itc, itm, mlm, lm of the first three steps before the change (same seeds)
BEFORE = [
    (24.0851059, 2.4129863, 1.0357851, 10.3564653, 10.27987),
    (24.2797813, 3.0917413, 0.8294427, 10.1943426, 10.1642542),
    (24.4883118, 3.719245, 0.6950892, 10.0282793, 10.0456972),
]


def _setup():
    from sarkit.model.decoder import dec_token_id
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.train.engine import adamw, param_groups

    torch.manual_seed(0)
    config = KnowLIPConfig(vision="vit_tiny_patch16_224", image_size=32, text=str(tiny_bert()),
                           text_layers=1, embed_dim=32, queue_size=20, max_tokens=40,
                           fields=TERRAIN_FIELDS, itm_pool="cls")  # fmt: skip
    model = KnowLIP(config)  # itm_pool: BEFORE was recorded when the ITM head read [CLS]
    momentum = Momentum(model, config.queue_size, config.momentum)
    momentum.copy_from(model)
    optimizer = adamw(param_groups(model, 0.05), 1e-3)
    codec = TextCodec.from_pretrained(config.text, TERRAIN_FIELDS, 40)
    tok = codec.tokenizer
    rng = random.Random(0)
    words = "bright ships moor along the quay beside dark calm water".split()

    def step(k: int, prof: list | None = None) -> dict:
        texts = [{f: " ".join(rng.choices(words, k=4)) for f in TERRAIN_FIELDS} for _ in range(8)]
        enc = codec.encode(texts)
        images = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(k))
        momentum.update(model)
        with (
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            if prof is not None
            else contextlib.nullcontext()
        ) as profiler:
            out = model(images, enc.input_ids, enc.attention_mask, momentum, 0.4,
                        torch.ones_like(enc.input_ids, dtype=torch.bool),
                        [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id],
                        tok.mask_token_id, torch.tensor([0, 1, 2, 3] * 2),
                        dec_token_id(tok))  # fmt: skip
            out["loss"].backward()
        if prof is not None:
            prof.append(profiler)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step, momentum


@pytest.fixture(scope="module")
def knowlip():
    return _setup()


def test_same_losses_and_fewer_syncs(knowlip):
    step, _ = knowlip
    for k, want in enumerate(BEFORE):
        out = step(k)
        got = [float(out[key].detach()) for key in ("loss", "itc", "itm", "mlm", "lm")]
        assert got == pytest.approx(want, rel=1e-5), k
    profiled: list = []
    step(3, profiled)
    inside = collections.Counter(e.name for e in profiled[0].events())  # forward, backward
    # at first: 11 scalar reads, 6 nonzero and 2 is_nonzero (`if empty.any()`) per forward
    # and 2 nonzero in the backward; then 4 scalar reads (multinomial's checks of its
    # weights) and 4 + 2 nonzero (MLM and LM targets indexed by boolean masks, labels and
    # hidden states apart, and again in the backward). Left: one nonzero for the MLM
    # targets and one for the LM's, whose counts are data-dependent.
    assert inside["aten::is_nonzero"] == 0
    assert inside["aten::nonzero"] == 2
    assert inside["aten::_local_scalar_dense"] == 0


def test_draw_one_draws_what_multinomial_draws():
    """The same index as torch.multinomial(weights, 1) from the same random state, zero
    weights never drawn, without multinomial's two reads of the weights."""
    from sarkit.model.knowlip import draw_one

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        weights = torch.rand(7, 33, generator=g) ** 3
        weights[:, :5] = 0.0
        weights[3] = 0.0
        weights[3, 9] = 1e-12  # a row left with one tiny weight
        torch.manual_seed(seed)
        want = torch.multinomial(weights, 1).squeeze(1)
        torch.manual_seed(seed)
        got = draw_one(weights)
        assert torch.equal(got, want), seed
        assert (got >= 5).all() and got[3] == 9


def test_queue_counters_follow_the_buffers(knowlip):
    """The host copies of the queue's pointer and fill level track the buffers through
    wrap-around, and a loaded state (a resume) is read again."""
    _, momentum = knowlip
    momentum.load_state_dict({**momentum.state_dict(), "queue_ptr": torch.tensor(0),
                              "queue_filled": torch.tensor(0)})  # fmt: skip
    d = momentum.image_queue.shape[1]
    for n, group in ((7, 1), (9, 2), (8, 3)):  # 24 > queue of 20: wraps
        momentum.enqueue(torch.randn(n, d), torch.randn(n, d), torch.full((n,), group))
    assert (int(momentum.queue_ptr), int(momentum.queue_filled)) == (4, 20)
    assert momentum._counters() == (4, 20)
    assert momentum.group_queue[:4].tolist() == [3] * 4
    state = {k: v.clone() for k, v in momentum.state_dict().items()}
    state["queue_ptr"].fill_(11)
    state["queue_filled"].fill_(13)
    momentum.load_state_dict(state)
    assert momentum.queued()[0].shape[0] == 13 and momentum._counters() == (11, 13)


def test_mask_tokens_matches_boolean_assignment():
    """masked_fill/where give the values boolean-index assignment gave, draw for draw."""
    from sarkit.model.knowlip import mask_tokens

    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 1000, (6, 30), generator=g)
        attention = (torch.rand(6, 30, generator=g) < 0.9).long()
        eligible = torch.rand(6, 30, generator=g) < 0.8
        torch.manual_seed(seed)
        got_ids, got_labels = mask_tokens(ids, attention, 0.3, 1000, 4, [101, 102], eligible)
        torch.manual_seed(seed)  # the old formulation
        want_ids, labels = ids.clone(), ids.clone()
        can = attention.bool() & (ids != 101) & (ids != 102) & eligible
        chosen = (torch.rand(ids.shape) < 0.3) & can
        labels[~chosen] = -100
        to_mask = (torch.rand(ids.shape) < 0.8) & chosen
        want_ids[to_mask] = 4
        to_random = (torch.rand(ids.shape) < 0.5) & chosen & ~to_mask
        words = torch.randint(1000, ids.shape)
        want_ids[to_random] = words[to_random]
        assert torch.equal(got_ids, want_ids) and torch.equal(got_labels, labels)
