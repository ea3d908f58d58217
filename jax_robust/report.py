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


METHOD_COLORS = {"natural": "tab:gray", "gr": "tab:olive", "llr": "tab:brown", "at": "tab:red",
                 "rst": "tab:blue", "trades": "tab:green"}


def plot_lipschitz_vs_robustness(results: list[dict], path: str, title: str = "") -> None:
    """Test lipschitz (official descent | ascent) against adv test acc, one point per run:
    colour = method, circle = official variant, square = paper variant, label = weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, label in ((axes[0], "test_lipschitz", "official estimator (descent)"),
                           (axes[1], "test_lipschitz_ascent", "ascent (maximum search)")):
        for r in results:
            ax.scatter(r[key], r["adv_test_acc"], color=METHOD_COLORS.get(r["method"], "k"),
                       marker="o" if r["variant"] == "official" else "s", s=36, alpha=0.85)
            weight = r.get("objective", {}).get({"rst": "lam", "trades": "beta"}.get(
                r["method"], ""))
            if weight is not None:
                left = r["variant"] != "official"  # paper labels left: near twins stay legible
                ax.annotate(f"{weight:g}", (r[key], r["adv_test_acc"]), fontsize=7,
                            xytext=(-5 if left else 5, -3), textcoords="offset points",
                            ha="right" if left else "left")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"test lipschitz, {label}, log scale")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("adv test acc (%)")
    methods = [m for m in METHOD_COLORS if any(r["method"] == m for r in results)]
    names = {"natural": "Natural", "gr": "GR", "llr": "LLR", "at": "AT", "rst": "RST",
             "trades": "TRADES"}
    handles = [Line2D([], [], color=METHOD_COLORS[m], marker="o", ls="", label=names[m])
               for m in methods]
    handles += [Line2D([], [], color="k", marker="o", ls="", fillstyle="none", label="official"),
                Line2D([], [], color="k", marker="s", ls="", fillstyle="none", label="paper")]
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(title or "Local Lipschitzness vs. robustness")
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
