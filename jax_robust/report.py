"""results.json files -> the paper's tables (markdown, CSV) and a lipschitz vs. robustness plot."""

from __future__ import annotations

import csv
import io
import json
import os

from jax_robust.files import write_text_atomic

COLUMNS = ("train_acc", "test_acc", "adv_test_acc", "test_lipschitz", "gap", "adv_gap",
           "test_lipschitz_ascent")
HEADERS = ("train", "test", "adv test", "lipschitz", "gap", "adv gap", "lipschitz (ascent)")


def row_label(r: dict) -> str:
    """'TRADES(b=6)', 'RST(l=2)', 'AT', ... as in the paper's tables, plus dropout if set."""
    t = r["config"]["train"]
    obj = r.get("objective", {})
    name = {"natural": "Natural", "gr": "GR", "llr": "LLR", "at": "AT"}.get(r["method"])
    if r["method"] == "rst":
        name = f"RST(l={obj.get('lam', t.get('lam')):g})"
    elif r["method"] == "trades":
        name = f"TRADES(b={obj.get('beta', t.get('beta')):g})"
    dropout = r["config"]["model"].get("dropout")
    if dropout:
        name += f" +dropout {dropout:g}"
    return name


def load_results(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def markdown_table(results: list[dict]) -> str:
    lines = ["| method | variant | " + " | ".join(HEADERS) + " |",
             "|---|---|" + "---:|" * len(HEADERS)]
    for r in results:
        cells = " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
        lines.append(f"| {row_label(r)} | {r['variant']} | {cells} |")
    return "\n".join(lines) + "\n"


def csv_table(results: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(("method", "variant", "dataset", "arch", *COLUMNS, "adv_train_acc",
                     "train_lipschitz", "train_seconds"))
    for r in results:
        writer.writerow((row_label(r), r["variant"], r["dataset"], r["arch"],
                         *(f"{r[c]:.4f}" for c in COLUMNS), f"{r['adv_train_acc']:.4f}",
                         f"{r['train_lipschitz']:.4f}", f"{r['train_seconds']:.1f}"))
    return buf.getvalue()


def plot_lipschitz_vs_robustness(results: list[dict], path: str, title: str = "") -> None:
    """Scatter of test lipschitz (both directions) against adv test acc, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "test_lipschitz", "official (descent)"),
                           (axes[1], "test_lipschitz_ascent", "ascent (maximum search)")):
        for r in results:
            marker = "o" if r["variant"] == "official" else "s"
            ax.scatter(r[key], r["adv_test_acc"], marker=marker)
            ax.annotate(row_label(r), (r[key], r["adv_test_acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"test lipschitz, {label} (log)")
        ax.set_ylabel("adv test acc (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Local Lipschitzness vs. robustness (o official, s paper variant)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(results: list[dict], outdir: str, title: str = "") -> list[str]:
    """Writes table.md, table.csv and lipschitz_vs_robustness.png to `outdir`; returns paths."""
    md = os.path.join(outdir, "table.md")
    cs = os.path.join(outdir, "table.csv")
    png = os.path.join(outdir, "lipschitz_vs_robustness.png")
    write_text_atomic(md, (f"## {title}\n\n" if title else "") + markdown_table(results))
    write_text_atomic(cs, csv_table(results))
    plot_lipschitz_vs_robustness(results, png, title)
    return [md, cs, png]
