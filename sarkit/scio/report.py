"""The noise report: counts per field and decision (report.md and the stderr table), the
strongest examples before and after, and histograms per field of dITC (dITC.png) and, under
the ``segment`` arm, of aITC z (aITC_z.png), kept and flagged apart, the threshold drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sarkit import log
from sarkit.atomic import atomic_path, write_text

DECISIONS = ("kept", "noise", "rewritten", "removed")


def counts(records: list[dict], fields: Sequence[str]) -> dict[str, dict[str, int]]:
    table = {f: dict.fromkeys(DECISIONS, 0) for f in fields}
    for rec in records:
        for name, seg in (rec.get("scio") or {}).items():
            if name in table and seg.get("decision") in table[name]:
                table[name][seg["decision"]] += 1
    return table


def table_text(table: dict[str, dict[str, int]], decisions: Sequence[str]) -> list[str]:
    width = max([len("field")] + [len(f) for f in table])
    head = f"{'field':<{width}}  " + "  ".join(f"{d:>9}" for d in decisions)
    rows = [head]
    for name, row in table.items():
        rows.append(f"{name:<{width}}  " + "  ".join(f"{row[d]:>9}" for d in decisions))
    total = {d: sum(r[d] for r in table.values()) for d in decisions}
    rows.append(f"{'all':<{width}}  " + "  ".join(f"{total[d]:>9}" for d in decisions))
    return rows


def strongest(records: list[dict], n: int = 10) -> list[tuple[float, dict, str, dict]]:
    """The n most suspect flagged segments: highest aITC z (arm ``segment``), else most
    negative dITC."""
    items = []
    for rec in records:
        for name, seg in (rec.get("scio") or {}).items():
            if seg.get("decision") in ("noise", "rewritten", "removed"):
                key = -float(seg["aitc_z"]) if "aitc_z" in seg else float(seg["ditc"])
                items.append((key, rec, name, seg))
    items.sort(key=lambda t: (t[0], str(t[1].get("id")), t[2]))
    return items[:n]


def rule_text(options: Any) -> str:
    arms = []
    for rule in options.rules:
        if rule == "segment":
            arms.append(f"aITC > its field's median + {options.segment_z:g} MAD")
        elif rule == "paper":
            arms.append(f"dITC < {-options.itc_margin + 0.0:g} and dITM > {options.itm_margin:g}")
        else:
            arms.append(f"dITC < {-options.itc_alone_margin + 0.0:g}")
    return "noise: " + ", or ".join(arms)


def histogram(
    path: Path, records: list[dict], fields: Sequence[str], key: str, line: float, title: str
) -> bool:
    """Per field, the screened segments' `key` (kept and flagged stacked apart) with the
    rule's threshold drawn, so a user sees where the cut falls in each field."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warn(f"matplotlib is not installed: no {path.name}")
        return False
    kept = {f: [] for f in fields}
    flagged = {f: [] for f in fields}
    for rec in records:
        for name, seg in (rec.get("scio") or {}).items():
            if name in kept and key in seg:
                side = kept if seg.get("decision") == "kept" else flagged
                side[name].append(float(seg[key]))
    cols = 4 if len(fields) > 4 else len(fields)
    rows = -(-len(fields) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, fields, strict=False):
        both = kept[name] + flagged[name]
        if both:
            ax.hist([kept[name], flagged[name]], bins=30, range=(min(both), max(both)),
                    stacked=True, color=["#4a7", "#d54"], label=["kept", "flagged"])  # fmt: skip
        ax.axvline(line, color="k", lw=0.8)
        ax.set_title(f"{name} ({len(flagged[name])} of {len(both)} flagged)", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(fields) :]:
        ax.axis("off")
    drawn = [ax for ax, name in zip(axes.flat, fields, strict=False) if kept[name] + flagged[name]]
    if drawn:
        drawn[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def histograms(out: Path, records: list[dict], fields: Sequence[str], options: Any) -> list[str]:
    """dITC.png always (the paper's quantity), aITC_z.png under the ``segment`` arm; the
    Markdown lines that show them."""
    cut = -options.itc_margin if "paper" in options.rules else 0.0
    if "itc" in options.rules and "paper" not in options.rules:
        cut = -options.itc_alone_margin
    shown = []
    title = "dITC = L_ITC(without segment) - L_ITC(full); below the line: candidate noise"
    if histogram(out / "dITC.png", records, fields, "ditc", cut, title):
        shown.append("![dITC per field](dITC.png)")
    if "segment" in options.rules:
        title = (f"aITC z = (L_ITC(segment alone) - field median) / MAD; above "
                 f"{options.segment_z:g}: noise")  # fmt: skip
        if histogram(out / "aITC_z.png", records, fields, "aitc_z", options.segment_z, title):
            shown.append("![aITC z per field](aITC_z.png)")
    return shown


def write(
    out: Path, records: list[dict], fields: Sequence[str], skipped: Any, options: Any
) -> None:
    decisions = ("kept", "noise") if options.screen_only else ("kept", "rewritten", "removed")
    table = counts(records, fields)
    lines = table_text(table, decisions)
    md = ["# SCIO noise report", ""]
    md.append(
        f"{rule_text(options)}; per-field cap {options.field_cap:g}; rounds {options.rounds}"
        + (" (screening only)" if options.screen_only else "")
    )
    md += ["", "## Segments per field and decision", "", "```", *lines, "```", ""]
    if skipped.counts:
        md += [f"Passed through unchanged: {skipped.summary()}.", ""]
    md += ["## The 10 most suspect (highest aITC z, else most negative dITC)", ""]
    for _, rec, name, seg in strongest(records):
        before = (rec.get("texts_original") or {}).get(name, "")
        alone = f", aITC {seg['aitc']:.4f} (z {seg['aitc_z']:.2f})" if "aitc_z" in seg else ""
        md.append(f"- `{rec.get('id')}` **{name}** dITC {seg['ditc']:.4f}, dITM "
                  f"{seg['ditm']:.4f}{alone}: {seg['decision']}")  # fmt: skip
        md.append(f"  - before: {before}")
        new = seg.get("rewrite")
        if new:
            verdict = "accepted" if seg["decision"] == "rewritten" else "rejected"
            md.append(f"  - rewrite ({verdict}; dITC {new['ditc']:.4f}, dITM {new['ditm']:.4f}): "
                      f"{new['text']}")  # fmt: skip
    shown = histograms(out, records, fields, options)
    if shown:
        md += ["", *shown]
    write_text(out / "report.md", "\n".join(md) + "\n")
    log.info("scio: segments per field and decision")
    for line in lines:
        log.info("  " + line)
    if skipped.counts:
        log.info(f"scio: passed through unchanged: {skipped.summary()}")
