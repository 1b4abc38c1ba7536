"""``infergate drift report``: a drift report as text, from a running gateway or a file of rows.

Both sources give the JSON of ``GET /v2/models/{model}/drift``; :func:`render` turns it
into the current statistics, the most-drifted features and a text histogram of the
profile (reference) beside the window for each. The token is read from ``--token`` or
``INFERGATE_TOKEN`` and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.files import read_regular_file

BAR_WIDTH = 24
MAX_SAMPLE_BYTES = 256 * 1024 * 1024


def render(doc: dict[str, Any], *, histograms: int = 3) -> str:
    """The report as lines of text; ``histograms`` = how many features get a histogram."""
    model, status = doc.get("model", "?"), str(doc.get("status", "?"))
    samples = doc.get("samples") or {}
    lines = [f"model {model}: {status.upper()}"]
    if status in {"disabled", "unavailable"}:
        lines.append("  drift monitoring is off for this model" if status == "disabled"
                     else "  no usable training profile: nothing to compare with")
        return "\n".join(lines) + "\n"
    lines.append(f"  window: {samples.get('inputs', 0)} input rows, {samples.get('outputs', 0)} output rows"
                 + (f", evaluated {doc['evaluated_at']}" if doc.get("evaluated_at") else "")
                 + (f", {doc['dropped']} samples dropped (queue full)" if doc.get("dropped") else ""))
    policy = doc.get("policy") or {}
    if status == "collecting":
        lines.append(f"  collecting: no verdict below {policy.get('min_samples', '?')} rows")
        return "\n".join(lines) + "\n"
    warning, critical = policy.get("warning", {}), policy.get("critical", {})
    lines.append(f"  thresholds: warning PSI {warning.get('psi')} / KS {warning.get('ks')}, "
                 f"critical PSI {critical.get('psi')} / KS {critical.get('ks')}")
    over = doc.get("features_over") or {}
    lines.append(f"  input features: {doc.get('features_monitored', 0)} monitored, "
                 f"{over.get('warning', 0)} at warning or above, {over.get('critical', 0)} critical")
    shown = ([doc["output"]] if doc.get("output") else []) + list(doc.get("top_features") or [])
    lines.append("")
    lines.append(f"  {'feature':<18} {'PSI':>9} {'KS':>7}  state")
    for feature in shown:
        ks = "-" if feature.get("ks") is None else f"{feature['ks']:.3f}"
        lines.append(f"  {feature['feature']:<18} {feature['psi']:>9.3f} {ks:>7}  {feature['state']}")
    for feature in shown[: histograms + (1 if doc.get("output") else 0)]:
        lines.append("")
        lines.extend(_histogram(feature))
    return "\n".join(lines) + "\n"


def _histogram(feature: dict[str, Any]) -> list[str]:
    hist = feature.get("histogram") or {}
    edges = [float(e) for e in hist.get("edges", [])]
    reference = [float(v) for v in hist.get("reference", [])]
    window = [float(v) for v in hist.get("window", [])]
    if len(edges) < 2 or len(reference) != len(edges) + 1 or len(window) != len(reference):
        return [f"  {feature.get('feature')}: no histogram"]
    last = len(edges) - 2  # numpy.histogram's last bin is closed
    labels = [f"< {edges[0]:g}"] + [
        f"[{lo:g}, {hi:g}{']' if i == last else ')'}" for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False))
    ] + [f"> {edges[-1]:g}"]
    lines = [f"  {feature['feature']} (share of rows per bin)",
             f"    {'bin':<16} {'profile':<{BAR_WIDTH + 7}} window"]
    for label, ref, win in zip(labels, reference, window, strict=True):
        if ref == 0 and win == 0:
            continue
        lines.append(f"    {label:<16} {_bar(ref)} {ref:5.3f}  {_bar(win)} {win:5.3f}")
    return lines


def _bar(share: float) -> str:
    filled = round(max(0.0, min(1.0, share)) * BAR_WIDTH)
    return ("#" * filled).ljust(BAR_WIDTH)


# --------------------------------------------------------------------------- sources


async def fetch(url: str, model: str, token: str, *, ca_file: str | None = None,
                timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    """GET the model's drift endpoint; (status, decoded body)."""
    import aiohttp

    ssl_ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    endpoint = f"{url.rstrip('/')}/v2/models/{model}/drift"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
            session.get(endpoint, headers={"Authorization": f"Bearer {token}"}, ssl=ssl_ctx,
                        # SECURITY: never follow a redirect: it would take the bearer token elsewhere.
                        allow_redirects=False) as resp:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = {"error": "the answer was not JSON"}
        return resp.status, body if isinstance(body, dict) else {"error": "unexpected answer"}


def load_samples(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Rows from ``.npy`` (rows x features), or JSON: a list of rows, ``{"inputs": rows,
    "outputs": [...]}`` (outputs: class index or score per row), or a KServe V2 request body."""
    # SECURITY: a bounded read of a regular file (a FIFO hung the command, /dev/zero filled memory).
    data = read_regular_file(path, MAX_SAMPLE_BYTES)
    if path.suffix == ".npy":
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.float32), None
    doc = json.loads(data.decode("utf-8"))
    outputs = None
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), list) and doc["inputs"] and isinstance(
            doc["inputs"][0], dict):
        tensor = doc["inputs"][0]  # a KServe V2 infer request body
        rows = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    elif isinstance(doc, dict):
        rows = np.asarray(doc["inputs"], dtype=np.float32)
        if doc.get("outputs") is not None:
            outputs = np.asarray(doc["outputs"], dtype=np.float32).reshape(-1)
    else:
        rows = np.asarray(doc, dtype=np.float32)
    return rows, outputs


def report_from_samples(path: Path, model: str, profiles: Path, policies: Path | None) -> dict[str, Any]:
    """Judge a file of rows against the model's profile, with its policy's thresholds (or defaults)."""
    from gateway.drift.evaluate import compute_report
    from gateway.drift.policy import DriftPolicy
    from gateway.drift.reference import load_reference

    policy = DriftPolicy()
    if policies is not None:
        from gateway.policy.loader import load_policy_dir

        entry = load_policy_dir(policies).gateway.models.get(model)
        policy = (entry.drift if entry is not None else None) or policy
    reference = load_reference(profiles, model)
    rows, outputs = load_samples(path)
    rows = rows.reshape(-1, reference.n_features)
    # A file is judged as a whole: the window and min_samples are the file's own size.
    size = max(1, rows.shape[0])
    policy = policy.model_copy(update={"window": max(size, policy.window),
                                       "min_samples": min(size, policy.min_samples)})
    report = compute_report(reference, policy, rows, outputs if outputs is not None else np.zeros(0, np.float32),
                            float(path.stat().st_mtime))
    return report.to_json()


def run(args: argparse.Namespace) -> int:
    if not args.url and not args.samples:
        print("infergate drift report: give --url (a running gateway) and/or --samples FILE", file=sys.stderr)
        return 2
    if args.url:
        token = args.token or os.environ.get("INFERGATE_TOKEN", "")
        if not token:
            print("infergate drift report: --url needs --token or INFERGATE_TOKEN", file=sys.stderr)
            return 2
        try:
            code, body = asyncio.run(fetch(args.url, args.model, token, ca_file=args.ca))
        except (OSError, TimeoutError) as exc:
            print(f"infergate drift report: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
        if code != 200:
            print(f"infergate drift report: HTTP {code}: {body.get('error', '')}", file=sys.stderr)
            return 1
        print(json.dumps(body, indent=2) if args.json else render(body, histograms=args.histograms), end="")
    if args.samples:
        try:
            body = report_from_samples(Path(args.samples), args.model, Path(args.profiles),
                                       Path(args.policies) if args.policies else None)
        except (OSError, ValueError, KeyError) as exc:
            print(f"infergate drift report: {args.samples}: {exc}", file=sys.stderr)
            return 1
        if args.url and not args.json:
            print(f"\nfrom {args.samples}:")
        print(json.dumps(body, indent=2) if args.json else render(body, histograms=args.histograms), end="")
    return 0


def add_drift_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drift = subparsers.add_parser("drift", help="model drift monitoring")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    report = drift_sub.add_parser("report", help="current drift statistics, most-drifted features, histograms")
    report.add_argument("--model", required=True)
    report.add_argument("--url", default=None, help="a running gateway, e.g. http://127.0.0.1:8080")
    report.add_argument("--token", default=None, help="bearer token with drift:read (default: $INFERGATE_TOKEN)")
    report.add_argument("--ca", default=None, help="CA bundle for an https gateway")
    report.add_argument("--samples", default=None,
                        help="judge a file of rows instead/as well (.npy, or JSON rows / {inputs, outputs} / "
                             "a KServe request body)")
    report.add_argument("--profiles", default="triton_repo", help="model profiles for --samples")
    report.add_argument("--policies", default=None, help="policy directory whose drift thresholds --samples uses")
    report.add_argument("--histograms", type=int, default=3, help="features shown as histograms (default 3)")
    report.add_argument("--json", action="store_true", help="print the JSON report")
    report.set_defaults(func=run)
