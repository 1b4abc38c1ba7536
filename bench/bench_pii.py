"""PII recognizers: ours vs Microsoft Presidio on one labelled corpus, plus throughput.

Runs :mod:`privacy.pii` in this process and Presidio (analyzer with its predefined
recognizers that need no NLP model, under ``NoOpNlpEngine``: no spaCy model) in its own
venv ``.venv-presidio``, created here on first use because it is heavy (spaCy,
tldextract, ...). Presidio runs as a subprocess and sends its spans and timings back as
JSON. Matching is lenient: a prediction counts when it overlaps a gold span of the same
type. Presidio's ``DATE_TIME`` is compared with our ``DOB`` (it has no birth-date type).

Reports precision/recall per type (Presidio at score >= 0, its default, and >= 0.5),
recall on the evasion subset, throughput in MB/s of CPU time (detection, and detection +
masking) for both, CPU microseconds to mask a 1 KB text, and CPU milliseconds to mask
64 KiB of each pathological input (:mod:`bench.pii_pathological`; catalogue PII-08 budget
50 ms). Writes ``bench/results/pii.json`` (with Presidio; ``--skip-presidio`` writes only
to ``--out`` when given, so the side-by-side is not overwritten) and prints markdown tables.

    .venv/bin/python bench/bench_pii.py [--repeat 3] [--skip-presidio] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from faker import Faker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pii_corpus import ADJACENT, SEED, generate  # noqa: E402
from bench.pii_corpus import DEFAULT_OUT as CORPUS  # noqa: E402
from bench.pii_pathological import PATHOLOGICAL  # noqa: E402
from privacy.pii import ENTITIES, PiiEngine, Replace  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pii.json"
PRESIDIO_VENV = ROOT / ".venv-presidio"
PRESIDIO_PINS = ("presidio-analyzer==2.2.366", "presidio-anonymizer==2.2.366")
TYPE_MAP = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "US_SSN": "SSN",
            "IBAN_CODE": "IBAN", "IP_ADDRESS": "IP", "DATE_TIME": "DOB"}
TYPES = ("EMAIL", "PHONE", "CARD", "SSN", "IBAN", "IP", "SECRET", "DOB", "ADDRESS")

PRESIDIO_RUNNER = r'''
import json, sys, time
import tldextract
# No network: the public-suffix list bundled with tldextract, never a download.
tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
import presidio_analyzer
from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer import predefined_recognizers as pr
from presidio_anonymizer import AnonymizerEngine

corpus, out, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
registry = RecognizerRegistry(supported_languages=["en"])
for cls in (pr.EmailRecognizer, pr.PhoneRecognizer, pr.CreditCardRecognizer, pr.UsSsnRecognizer,
            pr.IbanRecognizer, pr.IpRecognizer, pr.DateRecognizer):
    registry.add_recognizer(cls())
engine = AnalyzerEngine(registry=registry, supported_languages=["en"],
                        nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "noop"}]))
anonymizer = AnonymizerEngine()
for text in texts[:50]:
    engine.analyze(text=text, language="en")

def timed(entities=None, anonymize=False):
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for text in texts:
            found = engine.analyze(text=text, language="en", entities=entities)
            if anonymize:
                anonymizer.anonymize(text=text, analyzer_results=found)
        runs.append(time.process_time() - start)
    return sorted(runs)[len(runs) // 2]

spans = [[[r.entity_type, r.start, r.end, r.score] for r in engine.analyze(text=t, language="en")] for t in texts]
no_phone = ["EMAIL_ADDRESS", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS", "DATE_TIME"]
json.dump({
    "version": getattr(presidio_analyzer, "__version__", "2.2.366"),
    "recognizers": [r.name for r in registry.recognizers],
    "spans": spans,
    "analyze_cpu_s": timed(),
    "analyze_anonymize_cpu_s": timed(anonymize=True),
    "analyze_no_phone_cpu_s": timed(entities=no_phone),
}, open(out, "w"))
'''


def ensure_presidio() -> Path:
    """Create ``.venv-presidio`` with the pinned Presidio on first use."""
    python = PRESIDIO_VENV / "bin" / "python"
    if not python.exists():
        print("creating .venv-presidio (first run only)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PRESIDIO_VENV)], check=True)
    probe = subprocess.run([str(python), "-m", "pip", "show", "presidio-analyzer", "presidio-anonymizer"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0 or "Version: 2.2.366" not in probe.stdout:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PRESIDIO_PINS], check=True)
    return python


def load_corpus() -> list[dict[str, Any]]:
    if not CORPUS.exists():
        CORPUS.parent.mkdir(parents=True, exist_ok=True)
        with CORPUS.open("w", encoding="utf-8") as handle:
            for row in generate(2400, SEED, ADJACENT):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with CORPUS.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def score(rows: list[dict[str, Any]], predictions: list[list[tuple[str, int, int]]],
          variants: tuple[str, ...] = ("plain", "negative", "evasion", "adjacent"),
          ) -> dict[str, dict[str, float | int]]:
    """Lenient overlap matching per type: precision over predictions, recall over gold."""
    gold_total: Counter[str] = Counter()
    gold_hit: Counter[str] = Counter()
    pred_total: Counter[str] = Counter()
    pred_hit: Counter[str] = Counter()
    for row, predicted in zip(rows, predictions, strict=True):
        if row["variant"] not in variants:
            continue
        gold = [(g["type"], g["start"], g["end"]) for g in row["entities"]]
        for kind, start, end in gold:
            gold_total[kind] += 1
            if any(p[0] == kind and p[1] < end and start < p[2] for p in predicted):
                gold_hit[kind] += 1
        for kind, start, end in predicted:
            pred_total[kind] += 1
            if any(g[0] == kind and g[1] < end and start < g[2] for g in gold):
                pred_hit[kind] += 1
    table: dict[str, dict[str, float | int]] = {}
    for kind in TYPES:
        precision = pred_hit[kind] / pred_total[kind] if pred_total[kind] else float("nan")
        recall = gold_hit[kind] / gold_total[kind] if gold_total[kind] else float("nan")
        table[kind] = {"gold": gold_total[kind], "predicted": pred_total[kind], "precision": round(precision, 4),
                       "recall": round(recall, 4)}
    return table


def median_cpu(work: Any, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        work()
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def one_kb_texts(rows: list[dict[str, Any]]) -> dict[str, str]:
    def take(variant_rows: list[dict[str, Any]]) -> str:
        text = ""
        for row in variant_rows:
            if len(text) >= 1024:
                break
            text += row["text"] + "\n"
        return text[:1024]

    fake = Faker("en_US")
    fake.seed_instance(SEED)
    prose = ""
    while len(prose) < 1100:
        prose += fake.paragraph(nb_sentences=4) + "\n"
    prose = prose[:400] + " Contact john.doe@example.com or 415-555-0132. " + prose[400:]
    return {
        "1 KB prose with 2 PII": prose[:1024],
        "1 KB dense corpus slice (~10 PII)": take([r for r in rows if r["variant"] == "plain"]),
        "1 KB hard negatives, no PII": take([r for r in rows if r["variant"] == "negative"]),
    }


def one_kb_cost(engine: PiiEngine, operators: dict[str, Replace], text: str, samples: int) -> dict[str, float]:
    """CPU µs of one ``mask`` call: each call timed alone, so p99 shows the slow calls
    (machine noise included) next to the median."""
    for _ in range(200):
        engine.mask(text, operators)
    clock = time.process_time_ns
    costs = []
    for _ in range(samples):
        start = clock()
        engine.mask(text, operators)
        costs.append(clock() - start)
    costs.sort()
    return {"median": round(costs[len(costs) // 2] / 1e3, 1), "p99": round(costs[int(len(costs) * 0.99)] / 1e3, 1),
            "bytes": len(text.encode("utf-8"))}


def pathological_cost(engine: PiiEngine, operators: dict[str, Replace], repeat: int) -> dict[str, float]:
    """CPU ms to mask 64 KiB of each pathological input (best of ``repeat``: the input is
    the same each time, so the minimum is the cost without machine noise)."""
    costs: dict[str, float] = {}
    for name, make in PATHOLOGICAL:
        text = make(65_536)
        runs = []
        for _ in range(max(repeat, 3)):
            start = time.process_time()
            engine.mask(text, operators)
            runs.append(time.process_time() - start)
        costs[name] = round(min(runs) * 1e3, 1)
    return costs


def run(repeat: int, skip_presidio: bool) -> dict[str, Any]:
    rows = load_corpus()
    texts = [row["text"] for row in rows]
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    engine = PiiEngine()
    operators = {entity: Replace() for entity in ENTITIES}
    ours = [[(d.entity, d.start, d.end) for d in engine.scan(t)] for t in texts]
    scan_s = median_cpu(lambda: [engine.scan(t) for t in texts], repeat)
    mask_s = median_cpu(lambda: [engine.mask(t, operators) for t in texts], repeat)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
        "corpus": {"path": str(CORPUS.relative_to(ROOT)), "texts": len(rows), "bytes": total_bytes,
                   "variants": dict(Counter(r["variant"] for r in rows)),
                   "gold": dict(Counter(g["type"] for r in rows for g in r["entities"]))},
        "ours": {
            "quality": score(rows, ours),
            "evasion_recall": {k: v["recall"] for k, v in score(rows, ours, ("evasion",)).items()},
            "adjacent_recall": {k: v["recall"] for k, v in score(rows, ours, ("adjacent",)).items()},
            "scan_mb_s": round(total_bytes / scan_s / 1e6, 2),
            "mask_mb_s": round(total_bytes / mask_s / 1e6, 2),
        },
    }
    per_kb: dict[str, dict[str, float]] = {}
    for label, text in one_kb_texts(rows).items():
        per_kb[label] = one_kb_cost(engine, operators, text, samples=2000 * max(repeat, 3))
    result["ours"]["mask_1kb_cpu_us"] = per_kb
    result["ours"]["pathological_64k_cpu_ms"] = pathological_cost(engine, operators, repeat)
    if not skip_presidio:
        python = ensure_presidio()
        with tempfile.TemporaryDirectory() as tmp:
            runner, out = Path(tmp) / "runner.py", Path(tmp) / "out.json"
            runner.write_text(PRESIDIO_RUNNER)
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            subprocess.run([str(python), str(runner), str(CORPUS), str(out), str(repeat)], check=True, env=env)
            presidio = json.loads(out.read_text())

        def mapped(threshold: float) -> list[list[tuple[str, int, int]]]:
            return [[(TYPE_MAP[k], s, e) for k, s, e, sc in spans if k in TYPE_MAP and sc >= threshold]
                    for spans in presidio["spans"]]

        result["presidio"] = {
            "version": presidio["version"],
            "recognizers": presidio["recognizers"],
            "quality": score(rows, mapped(0.0)),
            "quality_score_0.5": score(rows, mapped(0.5)),
            "evasion_recall": {k: v["recall"] for k, v in score(rows, mapped(0.0), ("evasion",)).items()},
            "adjacent_recall": {k: v["recall"] for k, v in score(rows, mapped(0.0), ("adjacent",)).items()},
            "scan_mb_s": round(total_bytes / presidio["analyze_cpu_s"] / 1e6, 3),
            "mask_mb_s": round(total_bytes / presidio["analyze_anonymize_cpu_s"] / 1e6, 3),
            "scan_no_phone_mb_s": round(total_bytes / presidio["analyze_no_phone_cpu_s"] / 1e6, 3),
        }
        result["speedup_scan"] = round(result["ours"]["scan_mb_s"] / result["presidio"]["scan_mb_s"], 1)
        result["speedup_mask"] = round(result["ours"]["mask_mb_s"] / result["presidio"]["mask_mb_s"], 1)
        # Presidio's PhoneRecognizer (phonenumbers) is most of its cost; without it, it finds
        # no phone at all, while ours still does: the conservative comparison.
        result["speedup_scan_vs_no_phone"] = round(
            result["ours"]["scan_mb_s"] / result["presidio"]["scan_no_phone_mb_s"], 1)
    return result


def markdown(result: dict[str, Any]) -> str:
    ours = result["ours"]
    presidio = result.get("presidio")
    lines = ["| type | gold | ours P | ours R | Presidio P | Presidio R | Presidio P (>=0.5) | Presidio R (>=0.5) |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.3f}"

    for kind in TYPES:
        q = ours["quality"][kind]
        p = presidio["quality"][kind] if presidio else {}
        p5 = presidio["quality_score_0.5"][kind] if presidio else {}
        lines.append(f"| {kind} | {q['gold']} | {fmt(q['precision'])} | {fmt(q['recall'])} | "
                     f"{fmt(p.get('precision'))} | {fmt(p.get('recall'))} | "
                     f"{fmt(p5.get('precision'))} | {fmt(p5.get('recall'))} |")
    lines += ["", "| throughput (CPU) | ours | Presidio |", "|---|---|---|",
              f"| detect, MB/s | {ours['scan_mb_s']} | {presidio['scan_mb_s'] if presidio else '-'} |",
              f"| detect + mask, MB/s | {ours['mask_mb_s']} | {presidio['mask_mb_s'] if presidio else '-'} |"]
    if presidio:
        lines.append(f"| detect without phone recognizer, MB/s | - | {presidio['scan_no_phone_mb_s']} |")
        lines.append(f"| speed-up (detect / detect + mask) | {result['speedup_scan']}x / {result['speedup_mask']}x | |")
        lines.append(f"| speed-up, detect, vs Presidio without its phone recognizer | "
                     f"{result['speedup_scan_vs_no_phone']}x | |")
    lines += ["", "| 1 KB text | CPU µs to mask, median | p99 (target < 50) |", "|---|---|---|"]
    lines += [f"| {label} | {value['median']} | {value['p99']} |" for label, value in ours["mask_1kb_cpu_us"].items()]
    if "pathological_64k_cpu_ms" in ours:
        lines += ["", "| pathological input, 64 KiB | CPU ms to mask (budget 50) |", "|---|---|"]
        lines += [f"| {name} | {ms} |" for name, ms in ours["pathological_64k_cpu_ms"].items()]
    evasion = ", ".join(f"{k} {v:.2f}" for k, v in ours["evasion_recall"].items() if v == v)
    lines += ["", f"Recall on the evasion subset, ours: {evasion}"]
    if presidio:
        evasion_p = ", ".join(f"{k} {v:.2f}" for k, v in presidio["evasion_recall"].items() if v == v)
        lines.append(f"Recall on the evasion subset, Presidio: {evasion_p}")
    adjacent = ", ".join(f"{k} {v:.2f}" for k, v in ours["adjacent_recall"].items() if v == v)
    lines.append(f"Recall on the adjacent subset (entities in a row), ours: {adjacent}")
    if presidio:
        adjacent_p = ", ".join(f"{k} {v:.2f}" for k, v in presidio["adjacent_recall"].items() if v == v)
        lines.append(f"Recall on the adjacent subset, Presidio: {adjacent_p}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-presidio", action="store_true", help="only our side (no venv, no subprocess)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)}, not written with "
                             "--skip-presidio unless given)")
    args = parser.parse_args()
    result = run(args.repeat, args.skip_presidio)
    print(markdown(result))
    out = args.out if args.out is not None else None if args.skip_presidio else RESULTS
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
