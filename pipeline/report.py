"""The probe report: DIR/report.json (the numbers), DIR/report.png (score per layer against the shuffled-label
control and chance, and the learned layer weights) and DIR/report.html (the picture, embedded, and the tables)."""

from __future__ import annotations

import base64
import html
import json
import os


def plot(report: dict, path: str) -> None:
    """report.png: left, macro-F1 per layer (probe, control, chance, the layer weighting); right, the learned
    layer weights. Matplotlib with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [e["layer"] for e in report["layers"]]
    f1 = [e["scores"]["macro_f1"] for e in report["layers"]]
    ctrl = [e["control"]["macro_f1"] for e in report["layers"]]
    weights = [report["weights"][str(i)] for i in layers]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(layers, f1, "o-", color="tab:blue", label="linear probe")
    ax.plot(layers, ctrl, "s--", color="tab:gray", label="shuffled-label control")
    ax.axhline(report["weighted"]["scores"]["macro_f1"], color="tab:orange", label="learned layer weighting")
    if "macro_f1" in report.get("chance", {}):
        ax.axhline(report["chance"]["macro_f1"], color="black", linestyle=":", linewidth=1, label="chance")
    ax.axvline(report["best_layer"], color="tab:blue", alpha=0.15, linewidth=8)
    ax.set_xlabel("layer (hidden state)")
    ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(layers)
    ax.legend(fontsize=8, loc="center right", framealpha=0.9)
    ax.set_title(f"which layer? best: {report['best_layer']}", fontsize=10)
    bx.bar(layers, weights, color="tab:orange")
    bx.set_xticks(layers)
    bx.set_xlabel("layer (hidden state)")
    bx.set_ylabel("softmax weight")
    bx.set_title("learned layer weights (sum 1)", fontsize=10)
    model = _model_name(report)
    rec = report["recordings"]
    title = f"{model}: {report['task'].replace('_', '-')} probe, {rec['matched']} recordings, {rec['split']}"
    if report.get("note"):
        title += f"\n{report['note']}"
    fig.suptitle(title, fontsize=10, color="darkred" if report.get("note") else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _model_name(report: dict) -> str:
    """The model's registry name, or a local checkpoint's folder name (not its whole path)."""
    name = str((report.get("model") or {}).get("name") or "?")
    return os.path.basename(name.rstrip("/")) if name.startswith(("/", "file://")) else name


def _row(cells: list, tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_html(report: dict, png_path: str, path: str) -> None:
    """report.html: the picture (base64, so the page stands alone) and the scores, weights and what was read."""
    with open(png_path, "rb") as f:
        png = base64.b64encode(f.read()).decode()
    metrics = list(report["layers"][0]["scores"])
    head = _row(["layer", *metrics, *(f"control {m}" for m in metrics), "weight"], "th")
    rows = [
        _row(
            [
                e["layer"],
                *(_fmt(e["scores"][m]) for m in metrics),
                *(_fmt(e["control"][m]) for m in metrics),
                _fmt(report["weights"][str(e["layer"])]),
            ]
        )
        for e in report["layers"]
    ]
    w = report["weighted"]
    rows.append(
        _row(
            [
                "weighted",
                *(_fmt(w["scores"][m]) for m in metrics),
                *(_fmt(w["control"][m]) for m in metrics),
                "1.000",
            ]
        )
    )
    rec = report["recordings"]
    model = report.get("model") or {}
    hub = f" ({model['hub_id']})" if model.get("hub_id") else ""
    facts = [
        ("table", report["table"]),
        (
            "model",
            f"{model.get('name')}{hub}, content {str(model.get('content_hash'))[:16]}",
        ),
        ("granularity", report["granularity"]),
        ("labels", report["labels"]),
        ("task", f"{report['task']}, classes {', '.join(report['classes'])}"),
        (
            "recordings",
            f"{rec['matched']} matched of {rec['label_rows']} label rows ({rec['unmatched']} unmatched)",
        ),
        ("split", f"{rec['split']}: train {rec['train']}, valid {rec['valid']}, test {rec['test']}"),
        ("chance", ", ".join(f"{k} {v:.3f}" for k, v in report["chance"].items())),
        ("control", report["control"]["how"]),
        ("best layer", report["best_layer"]),
    ]
    note = f"<p style='color:darkred'><b>{html.escape(report['note'])}</b></p>" if report.get("note") else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Which layer? {html.escape(_model_name(report))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>
<h1>Which layer?</h1>{note}
<img alt="score per layer with the control, and the learned layer weights" src="data:image/png;base64,{png}">
<h2>Scores on the test recordings</h2><table>{head}{"".join(rows)}</table>
<h2>What was read</h2><table>{"".join(_row([k, v]) for k, v in facts)}</table>
</body></html>
"""
    with open(path, "w") as f:
        f.write(page)


def write_report(report: dict, out_dir: str) -> dict[str, str]:
    """Write report.json, report.png and report.html into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "png", "html")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=str)
    plot(report, paths["png"])
    write_html(report, paths["png"], paths["html"])
    return paths
