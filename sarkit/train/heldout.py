"""Held-out retrieval during pretraining: is the model learning what it will be used for?

The training losses fall whether or not the model generalises; image-text retrieval on
records it never trains on says whether it does. A hit at K is any of the top K items of
the same ``group`` (records of one group describe the same thing; a record without one is
its own group), so the figure stays meaningful when many records share a text.
"""

from __future__ import annotations

from typing import Any

import torch

from sarkit.errors import SarkitError

KS = (1, 5, 10)


def recall_at_k(sim: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
                ks: tuple[int, ...] = KS) -> dict[int, float]:  # fmt: skip
    """Share of queries (rows of `sim`) with an item of their own group in the top K."""
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices
    same = item_groups[top] == query_groups[:, None]
    return {k: float(same[:, :k].any(dim=1).float().mean()) for k in ks}


class HeldOut:
    """The held-out records, decoded once; ``evaluate`` scores a model on them."""

    def __init__(self, dataset: Any, codec: Any, batch_size: int):
        self.codec = codec
        self.batch_size = batch_size
        images, records = [], []
        for i, rec in enumerate(dataset.records):
            image, got = dataset[i]
            if got == i:  # an unreadable tile (named on stderr) leaves the set, not its text
                images.append(image)
                records.append(rec)
        if not records:
            raise SarkitError("--val: none of the held-out tiles can be read")
        names = {str(r["group"]): i for i, r in enumerate(records) if r.get("group") is not None}
        self.groups = torch.tensor(
            [
                names[str(r["group"])] if r.get("group") is not None else -1 - i
                for i, r in enumerate(records)
            ]  # fmt: skip
        )
        self.images = torch.stack(images)
        self.enc = codec.encode([r["texts"] for r in records])

    def __len__(self) -> int:
        return len(self.groups)

    @torch.no_grad()
    def features(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features of every held-out image and text (every rank runs every batch:
        ZeRO-3 gathers parameters collectively)."""
        from sarkit.model.text import EncodedText

        param = next(model.parameters())
        images, texts = [], []
        for s in range(0, len(self), self.batch_size):
            batch = self.images[s : s + self.batch_size].to(param.device, param.dtype)
            images.append(model.encode_images(batch)[1].float())
            part = slice(s, s + self.batch_size)
            enc = EncodedText(self.enc.input_ids[part], self.enc.attention_mask[part],
                              self.enc.segment_ids[part]).to(param.device)  # fmt: skip
            texts.append(model.encode_texts(enc).float())
        return torch.cat(images).cpu(), torch.cat(texts).cpu()

    def evaluate(self, model: Any) -> dict[str, float]:
        img, txt = self.features(model)
        sim = img @ txt.T
        i2t = recall_at_k(sim, self.groups, self.groups)
        t2i = recall_at_k(sim.T, self.groups, self.groups)
        out = {f"val_i2t_r{k}": v for k, v in i2t.items()}
        out.update({f"val_t2i_r{k}": v for k, v in t2i.items()})
        out["val_r_mean"] = sum(out.values()) / len(out)
        return out
