"""The evaluation report as text tables (the JSON is the report dict itself)."""
from __future__ import annotations

from typing import Dict, List, Optional


def _num(value: Optional[float], width: int = 7, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:{'+' if sign else ''}{width}.{digits}f}"


def summary_table(report: Dict) -> str:
    """One row per image set: images, top-1 / top-5 error, RMS calibration error, ECE."""
    rows: List[str] = [f"{'set':<26}{'images':>8}{'top-1 err':>11}{'top-5 err':>11}{'RMS':>8}{'ECE':>8}"]

    def row(name, r, images=None):
        rows.append(f"{name:<26}{images if images is not None else r['images']:>8}"
                    f"{_num(r['top1_err'], 11)}{_num(r['top5_err'], 11)}{_num(r['rms'], 8)}{_num(r['ece'], 8)}")

    if "clean" in report:
        row("clean", report["clean"])
    c = report.get("corruptions")
    if c:
        per = c["per_corruption"].values()
        images = sum(v["images"] for p in per for v in p["by_severity"].values())
        row(f"corrupted ({c['source']})", {"top1_err": c["mean_error"], "top5_err": c["mean_top5_err"],
                                           "rms": c["rms"], "ece": c["ece"]}, images)
    for key, name in (("imagenet_r", "ImageNet-R"), ("imagenet_a", "ImageNet-A")):
        if key in report:
            row(f"{name} ({report[key]['classes']} classes)", report[key])
    lines = rows
    if c:
        extra = [f"mean corruption error {c['mean_error']:.2f}"]
        if c["mce"] is not None:
            extra.append(f"mCE (AlexNet-normalised) {c['mce']:.2f}")
        if c["relative_mean_error"] is not None:
            extra.append(f"relative to clean {c['relative_mean_error']:+.2f}")
        lines.append("corruptions: " + ", ".join(extra))
    p = report.get("pgd")
    if p:
        if p.get("eps_source", "").startswith("default"):
            lines.append(f"adversarial eps {p['eps'] * 255:g}/255 = the IPMix protocol default, NOT the 8/255 "
                         f"of adversarial training (pass --eps 8/255 for that)")
        lines.append(f"PGD-Linf eps {p['eps'] * 255:g}/255, {p['steps']} steps of {p['alpha'] * 255:g}/255"
                     f"{', %d restarts' % p['restarts'] if p['restarts'] > 1 else ''}: error {p['error']:.2f} "
                     f"on {p['images']} images (clean error {p['clean_error']:.2f} on the same images)")
    a = report.get("autoattack")
    if a:
        lines.append(f"AutoAttack eps {a['eps'] * 255:g}/255 ({a['impl']}): error {a['error']:.2f} on "
                     f"{a['images']} images ({a['aa_minus_pgd_error']:+.2f} vs PGD; a large gap means PGD "
                     f"was fooled)")
    return "\n".join(lines)


def corruption_table(report: Dict) -> str:
    """Top-1 error per corruption and severity, the mean, CE (ImageNet-C), the error minus the clean
    error, and the RMS calibration error of the corruption's severities pooled."""
    c = report.get("corruptions")
    if not c:
        return ""
    sevs = c["severities"]
    lines = [f"{'corruption':<19}" + "".join(f"{'s%d' % s:>7}" for s in sevs)
             + f"{'mean':>8}{'CE':>8}{'rel':>8}{'RMS pooled':>11}"]
    for name, p in c["per_corruption"].items():
        cells = "".join(_num(p["by_severity"][s]["top1_err"], 7, 1) for s in sevs)
        lines.append(f"{name:<19}{cells}{_num(p['error'], 8)}{_num(p['ce'], 8, 1)}"
                     f"{_num(p['relative_error'], 8, 1, sign=True)}{_num(p['rms_pooled'], 11, 1)}")
    lines.append(f"{'mean':<19}{' ' * 7 * len(sevs)}{_num(c['mean_error'], 8)}{_num(c['mce'], 8, 1)}"
                 f"{_num(c['relative_mean_error'], 8, 1, sign=True)}")
    return "\n".join(lines)


def format_report(report: Dict) -> str:
    parts = [summary_table(report), corruption_table(report)]
    return "\n\n".join(p for p in parts if p)
