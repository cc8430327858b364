"""PNG plots of a bench result: speedup vs τ (measured and predicted), acceptance by position, time split;
and of advise's predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = result["categories"]["overall"]
    spec = {name: row for name, row in overall.items() if "acceptance" in row}
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for drafter in result["drafters"]:
        taus = [t for t in result["taus"] if t != "auto" and f"{drafter}/{t}" in spec]
        ax.plot(taus, [spec[f"{drafter}/{t}"]["speedup"] for t in taus], "o-", label=f"{drafter} measured")
        ax.plot(taus, [spec[f"{drafter}/{t}"]["predicted_speedup"] for t in taus], "x--", label=f"{drafter} predicted")
        if f"{drafter}/auto" in spec:
            ax.axhline(spec[f"{drafter}/auto"]["speedup"], ls=":", label=f"{drafter} auto (measured)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="tau (draft tokens per cycle)", ylabel="speedup over plain decoding", title="Speedup vs tau")
    ax.legend()
    paths.append(_save(fig, folder / "speedup_vs_tau.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in spec.items():
        ax.plot(range(len(row["conditional_acceptance"])), row["conditional_acceptance"], "o-", label=name)
    ax.set(xlabel="draft position", ylabel="acceptance given the earlier ones accepted", ylim=(0, 1.05),
           title="Acceptance by position")
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "position_acceptance.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(spec)
    bottom = [0.0] * len(names)
    for part in ("draft", "verify", "other"):
        values = [spec[n]["time_split"][part] for n in names]
        ax.bar(names, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(ylabel="share of decode time", title="Time split")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    paths.append(_save(fig, folder / "time_split.png"))
    return paths


def write_advice_plot(result: dict[str, Any], folder: Path) -> Path:
    """advise's predicted speedup by drafter and τ (auto dashed), plain decoding at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for drafter in result["drafters"]:
        mine = sorted((c["tau"], c["predicted"]) for c in result["configs"] if c["drafter"] == drafter and c["tau"] != "auto")
        line = ax.plot([t for t, _ in mine], [s for _, s in mine], "o-", label=drafter)[0]
        auto = [c["predicted"] for c in result["configs"] if c["drafter"] == drafter and c["tau"] == "auto"]
        if auto:
            ax.axhline(auto[0], ls="--", color=line.get_color(), label=f"{drafter} auto")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="tau (draft tokens per cycle)", ylabel="predicted speedup over plain decoding",
           title=f"advise: {result['prompts']} prompts")
    ax.legend()
    return _save(fig, folder / "advise.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
