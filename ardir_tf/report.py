"""Rendering `evaluate` reports: a text table (with the sanity warnings under
it) and a PNG of accuracy against eps, drawn headless with matplotlib."""

from ardir_tf.workdir import atomic_write


def format_table(reports):
    """{model name: evaluate() report} as a text table, one row per model, then
    the seconds each attack took, then a loud line for every failed sanity check."""
    attack_names = list(dict.fromkeys(n for r in reports.values() for n in r["robust_accuracy"]))
    width = max([8] + [len(n) for n in attack_names])
    header = (f"{'model':10} {'clean':>7}" + "".join(f" {n:>{width}}" for n in attack_names)
              + f" {'worst':>7} {'worst class':>12} {'examples':>9}")
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        cells = "".join(f" {r['robust_accuracy'].get(n, float('nan')):{width}.4f}"
                        for n in attack_names)
        worst = r.get("worst_class") or {}
        wc = f"{worst.get('label', '-')}: {worst.get('robust_accuracy', float('nan')):.3f}"
        lines.append(f"{name:10} {r['clean_accuracy']:7.4f}{cells} "
                     f"{r.get('worst_case_accuracy', float('nan')):7.4f} {wc:>12} "
                     f"{r['n_examples']:9d}")
    if any(r.get("sequential") for r in reports.values()):
        lines.append("(sequential: each attack ran on what the earlier ones left standing; "
                     "its column is the accuracy after it)")
    lines.append("")
    for name, r in reports.items():
        times = ", ".join(f"{n} {s:.1f}" for n, s in r.get("attack_seconds", {}).items())
        lines.append(f"seconds  {name}: {times} (total {r['seconds']:.1f} with sanity checks)")
    for name, r in reports.items():
        for attack, found in r.get("minimal_perturbation", {}).items():
            if found["broken"]:
                lines.append(f"minimal  {name}: {attack} broke {found['broken']} points, "
                             f"median {found['norm']} perturbation {found['median']:.4f}")
    for name, r in reports.items():
        for check, result in r.get("sanity_checks", {}).items():
            if isinstance(result, dict) and result["passed"] is False:
                lines.append(f"WARNING  {name}: sanity check {check} FAILED: {result['message']}")
        verified = r.get("verified")
        if verified:
            steps = ", ".join(f"{a} {v:.4f}" for a, v in verified["robust_accuracy"].items())
            lines.append(f"WARNING  {name}: its gradient attacks' numbers are UNRELIABLE; the "
                         f"sanity checks' attacks within eps and the standard attacks run on "
                         f"the points they left standing took the worst case from "
                         f"{verified['unverified_worst_case_accuracy']:.4f} "
                         f"to {verified['worst_case_accuracy']:.4f}"
                         + (f" (after {steps})" if steps else "")
                         + "; the worst column holds that number")
        elif r.get("reliable") is False:
            lines.append(f"WARNING  {name}: this evaluation is UNRELIABLE; its robust "
                         "accuracy is likely too high")
        elif r.get("reliable") is None:
            lines.append(f"note     {name}: sanity checks not run")
        if r.get("sanity_broke") and not verified:
            lines.append(f"note     {name}: the sanity checks' attacks within eps broke "
                         f"{r['sanity_broke']} of the points the attacks above left standing; "
                         "the worst column counts them")
    return "\n".join(lines)


def verdicts(reports):
    """One line per model whose evaluation failed a sanity check, naming the
    checks and the number to trust: what a run prints last."""
    lines = []
    for name, r in reports.items():
        if r.get("reliable") is not False:
            continue
        failed = [c for c, v in r.get("sanity_checks", {}).items()
                  if isinstance(v, dict) and v.get("passed") is False]
        verified = r.get("verified")
        if verified:
            number = (f"trust {verified['worst_case_accuracy']:.4f}, the worst case over "
                      f"the evaluation's, the sanity checks' and the standard attacks, not "
                      f"the gradient attacks' {verified['unverified_worst_case_accuracy']:.4f}")
        else:
            number = (f"its worst case {r['worst_case_accuracy']:.4f} is an upper bound: "
                      "evaluate it with --attacks=fast,standard")
        lines.append(f"WARNING {name}: sanity check {', '.join(failed)} FAILED (gradients "
                     f"likely masked); {number}")
    return lines


def plot_eps(reports, path):
    """Writes a PNG of PGD-20 accuracy against eps (the sanity sweep) for each
    model of {name: report}, atomically, and returns the path."""
    # A Figure with its own Agg canvas, not pyplot: matplotlib's backend and
    # pyplot's figures (a notebook's) stay as the caller had them.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    threat = None
    for name, r in reports.items():
        sweep = r.get("sanity_checks", {}).get("eps_sweep", {})
        if "eps" not in sweep:
            continue
        ax.plot(sweep["eps"], sweep["accuracy"], marker="o", label=name)
        threat = r["eps"], r["norm"]
    if threat:
        ax.axvline(threat[0], color="grey", linestyle=":", label=f"eps = {threat[0]:.4g}")
        ax.set_xlabel(f"eps ({threat[1]})")
        ax.legend()
    ax.set_ylabel("accuracy under PGD-20")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path
