"""``--vision-args``: keyword arguments for timm's ViT constructor, from the command line.

A backbone's shape is more than its timm name: a hybrid ViT's patch size on its
convolutional stem, the depth, the width (``patch_size=2,depth=6``). Pretraining records
them in the run's vision.json (``model_args``), so a fine-tune from the run rebuilds the
same network. Kept free of torch so the CLI parses it without loading a model.
"""

from __future__ import annotations

import json
from typing import Any

import typer

#: keywords sarkit itself sets from other options; giving them here would be ambiguous
RESERVED = {
    "in_chans": "the backbone is 1-channel",
    "num_classes": "the task's head sets it",
    "img_size": "use --image-size",
    "drop_path_rate": "use --drop-path",
    "pretrained": "use --init / --vision-weights",
}


def parse_vision_args(text: object) -> dict[str, Any]:
    """``key=value[,key=value]`` (values read as JSON: 2, 0.1, true, "avg"; bare words are
    strings) or a JSON object, as a dict; a malformed one is a one-line usage error."""
    if isinstance(text, dict):
        found: dict[str, Any] = dict(text)
    else:
        raw = str(text).strip()
        if raw.startswith("{"):
            try:
                found = json.loads(raw)
            except ValueError as exc:
                raise typer.BadParameter(f"'{raw}' is not a JSON object ({exc})") from None
            if not isinstance(found, dict):
                raise typer.BadParameter(f"'{raw}' is not a JSON object")
        else:
            found = {}
            for part in (p.strip() for p in raw.split(",")):
                if not part:
                    continue
                key, sep, value = part.partition("=")
                key = key.strip()
                if not sep or not key.isidentifier():
                    raise typer.BadParameter(
                        f"'{part}' is not key=value (e.g. patch_size=2,depth=6)"
                    )
                try:
                    found[key] = json.loads(value)
                except ValueError:
                    found[key] = value.strip()
    for key in found:
        if key in RESERVED:
            raise typer.BadParameter(f"'{key}' cannot be given here: {RESERVED[key]}")
    return found


parse_vision_args.__name__ = "KEY=VALUE,..."
