"""The report's "Who the model fails" section, from the subgroup audit of `cxrdist evaluate` (metrics.json's
`subgroups`, cxrdist/evaluation/scoring/subgroups.py): the flagged gaps in words, per attribute a forest plot (each
group's macro AUC and interval beside the overall one) and a table, and the underdiagnosis rates per group.

Attribute names and values come from the data: they are escaped in the HTML and never part of a file name (the
figures are numbered). A group under the small-group rule shows "too few patients", no number."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from cxrdist.evaluation import figures as figs
from cxrdist.evaluation.report.html import auc_cell, esc, figure, fmt, note, percent, section, table

FIGURE_NAME = "subgroups-{}.png"


def audit_section(metrics: dict | None, fig_dir: Path) -> str:
    """The section's HTML (a note when there is no evaluation or no attribute to audit)."""
    audit = (metrics or {}).get("subgroups")
    if not audit:
        return section("audit", "Who the model fails", "", note("<code>cxrdist evaluate</code> has not been run (or ran before the "
                                                                 "subgroup audit existed): no subgroup audit."))
    if not audit.get("attributes"):
        return section("audit", "Who the model fails", "", note(esc(" ".join(audit.get("notes", [])))))
    overall = metrics["ensemble"]["macro_auc"]
    attributes = enumerate(audit["attributes"].items())
    body = flagged_html(audit) + "".join(attribute_html(name, info, overall, k, fig_dir) for k, (name, info) in attributes)
    body += underdiagnosis_html(audit) + "".join(note(esc(text)) for text in audit.get("notes", []))
    return section("audit", "Who the model fails", explanation(audit), body)


def explanation(audit: dict) -> str:
    return (f"The test split's images grouped by each attribute prepare kept (and by two crossed, on request). Per group: the macro "
            f"AUC of the ensemble over the labels the group can score, with a patient-bootstrap {100 * audit['level']:.0f}% interval "
            f"({audit['resamples']} resamples, the evaluation's own draws), and its gap to the rest (the group's AUC minus that of every "
            f"other image) with a paired interval: both sides scored on the same resamples. A gap is <b>flagged</b> when its "
            f"interval at the family-wise 5% level excludes zero (Bonferroni over the {audit.get('comparisons', 0)} gaps of this audit: "
            f"the bootstrap standard error times Student's t quantile on the gap's fewest patients of one class), so a model that "
            f"fails nobody is flagged with probability about 5%. A label's gap needs 10 patients with and 10 without the finding on "
            f"each side. A group of fewer than {audit['min_patients']} patients shows \u201ctoo few patients\u201d, no number.")


def flagged_html(audit: dict) -> str:
    flagged = audit.get("flagged", [])
    if not flagged:
        return note(f"No gap is flagged among the {audit.get('comparisons', 0)} compared.")
    items = [f"<li>{flag_sentence(audit, flag)}</li>" for flag in flagged]
    return f"<h3>Flagged gaps</h3><ul>{''.join(items)}</ul>"


def flag_sentence(audit: dict, flag: dict) -> str:
    """One flagged gap in words, e.g. 'AUC Pleural Effusion is 0.226 lower for sex = F than for the other images ...'."""
    direction = "lower" if flag["gap"] < 0 else "higher"
    entry = audit["attributes"][flag["attribute"]]["groups"][flag["group"]]
    value = group_value(entry, flag["metric"])
    values = f" ({fmt(value)} against {fmt(value - flag['gap'])})" if value is not None else ""
    low, high = flag["interval"] or (None, None)
    return (f"<b>{esc(flag['metric'])}</b> is {abs(flag['gap']):.3f} {direction} for <b>{esc(flag['attribute'])} = "
            f"{esc(flag['group'])}</b> than for the other images{values}; {100 * audit['level']:.0f}% interval of the gap "
            f"{fmt(low)} to {fmt(high)}, family-wise {fmt(flag['adjusted_interval'][0])} to {fmt(flag['adjusted_interval'][1])}.")


def group_value(entry: dict, metric: str) -> float | None:
    if metric == "macro AUC":
        return entry.get("macro_auc")
    if metric.startswith("AUC "):
        return entry["per_label"].get(metric[4:])
    if metric.startswith("underdiagnosis at "):
        return entry["underdiagnosis"][metric.removeprefix("underdiagnosis at ")]["rate"]
    return None


def attribute_html(name: str, info: dict, overall: float, k: int, fig_dir: Path) -> str:
    groups = info["groups"]
    path = forest_plot(fig_dir / FIGURE_NAME.format(k), name, groups, overall)
    rows = []
    for group, entry in groups.items():
        if not entry["reported"]:
            rows.append([esc(group), '<td class="na" colspan="4">too few patients</td>'])
            continue
        macro_gap = entry["gap"]["macro_auc"]
        flags = [label for label, g in entry["gap"]["per_label"].items() if g and g.get("flagged")]
        rows.append([esc(group), f"{entry['images']} / {entry['patients']}", auc_cell(entry["macro_auc"], entry["interval"]["macro_auc"]),
                     gap_cell(macro_gap), esc(", ".join(flags)) or "–"])
    header = ["group", "images / patients", "macro AUC (95% CI)", "gap to the rest (95% CI)", "labels whose gap is flagged"]
    caption = (f"Macro AUC per group of {esc(name)} (dots, 95% intervals; red: gap flagged), the AUC of each label whose gap is flagged "
               f"(crosses); the dashed line is the overall macro AUC ({fmt(overall)}).")
    return (f"<h3>{esc(name)} <span class=\"ci\">({esc(info['source'])})</span></h3>"
            + figure(f"{fig_dir.name}/{path.name}", f"forest plot of {name}", caption) + table(header, rows, text_columns=2))


def gap_cell(g: dict | None) -> str:
    if not g:
        return '<td class="na">–</td>'
    ci = f'<br><span class="ci">({g["interval"][0]:+.3f} to {g["interval"][1]:+.3f})</span>' if g.get("interval") else ""
    mark = " ⚑" if g.get("flagged") else ""
    cls = ' class="neg"' if g.get("flagged") and g["value"] < 0 else ' class="pos"' if g.get("flagged") else ""
    return f"<td><span{cls}>{g['value']:+.3f}{mark}</span>{ci}</td>"


def underdiagnosis_html(audit: dict) -> str:
    definition = audit.get("underdiagnosis_definition")
    points = next((list(e["underdiagnosis"]) for info in audit["attributes"].values() for e in info["groups"].values() if e["reported"]), None)
    if not definition or not points:
        return ""
    rows = []
    for name, info in audit["attributes"].items():
        for group, entry in info["groups"].items():
            if not entry["reported"]:
                rows.append([esc(name), esc(group)] + ['<td class="na">too few patients</td>'] * len(points))
                continue
            rows.append([esc(name), esc(group)] + [rate_cell(entry["underdiagnosis"][p]) for p in points])
    return (f"<h3>Underdiagnosis</h3><p class=\"explain\">Underdiagnosis rate: {esc(definition)}; at each operating point of the "
            f"report (thresholds chosen on the out-of-fold predictions), with its 95% interval and the gap to the rest.</p>"
            + table(["attribute", "group", *points], rows, text_columns=2))


def rate_cell(u: dict) -> str:
    if u["rate"] is None:
        return '<td class="na">–</td>'
    ci = f' <span class="ci">({100 * u["interval"][0]:.0f}–{100 * u["interval"][1]:.0f})</span>' if u.get("interval") else ""
    gap = u.get("gap")
    gap_text = f'<br><span class="ci">gap {100 * gap["value"]:+.1f} pp{" ⚑" if gap.get("flagged") else ""}</span>' if gap else ""
    return f"<td>{percent(u['rate'])}{ci}{gap_text}</td>"


def forest_plot(path: Path, name: str, groups: dict, overall: float) -> Path:
    """Each group's macro AUC with its interval (a dot and a bar; red when its gap is flagged), the AUC of each label whose
    gap is flagged (a named cross), the small groups marked "too few patients", and the overall macro AUC (dashed)."""
    names = list(groups)
    fig = Figure(figsize=(7.0, 0.42 * len(names) + 1.1), layout="constrained")
    ax = fig.subplots()
    for y, group in enumerate(names):
        entry = groups[group]
        if not entry["reported"] or entry.get("macro_auc") is None:
            ax.text(0.5, y, "too few patients" if not entry["reported"] else "no label scorable", va="center", ha="center",
                    transform=ax.get_yaxis_transform(), fontsize=8, color="#777")
            continue
        interval = entry["interval"]["macro_auc"]
        flagged = (entry["gap"].get("macro_auc") or {}).get("flagged")
        color = "#b42318" if flagged else "#1f4e79"
        if interval:
            ax.plot(interval, [y, y], color=color, lw=2)
        ax.plot([entry["macro_auc"]], [y], "o", color=color, ms=6)
        for label, g in entry["gap"]["per_label"].items():  # a flagged label: its own AUC, named
            if g and g.get("flagged"):
                ax.plot([entry["per_label"][label]], [y], "x", color="#b42318", ms=7)
                ax.annotate(figs.short(label, 18), (entry["per_label"][label], y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, color="#b42318")
    ax.axvline(overall, color="#555", ls="--", lw=1)
    ax.set_yticks(range(len(names)), [figs.short(g, 24) for g in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("AUC: macro (dots, 95% interval), a flagged label (crosses)")
    ax.set_title(figs.short(name, 60), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return figs.save(fig, path)
