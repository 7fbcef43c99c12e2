"""Benchmark: math grading accuracy, false positives and speed, ours vs Math-Verify on the same labelled sets.

Two suites, each graded by both in the same run:
- pairs: labelled pairs built here from the public eval sets (below);
- math_verify_suite: Math-Verify's own public regression tests (tests/data/math_verify_cases.jsonl, 264
  (gold, prediction, expected) rows, vendored by benchmarks/extract_math_verify_cases.py: a suite this grader
  was not built from). Ours: `grade(prediction, gold)`. Math-Verify twice: as its README calls it,
  `verify(parse(gold), parse(prediction))`, and as its own tests call it (each test's extraction
  targets, precision and options), which is the best it can do on its own suite.
Then, when benchmarks/grading_latency.py is there, its latency figures (8 threads, 5% pathological inputs).

The pairs are built from the public eval sets in ../shared/data (MATH-500, GSM8K, AIME 24/25, OlympiadBench, Minerva):
- label True: each gold answer boxed in a response; the datasets' own worked solutions (MATH-500, GSM8K,
  Minerva); value-preserving rewrites of the gold (thousands separators, `a/b` for `\\frac{a}{b}`, exact
  decimals, `k\\sqrt{m}` as `\\sqrt{k^2 m}`, reordered sets and lists, swapped summands, `x = ...`,
  `\\left( \\right)`, units, dropped degree signs) in a response ending in `\\boxed{}`, "The final answer is $...$" or `####`;
- label False: value-changing perturbations of the gold (a digit changed, the sign flipped, x10, fraction
  inverted, a bracket flipped, an element dropped, a tuple's items swapped, `\\pm` as `+`, another choice
  letter, off by one), and worked solutions whose boxed answer was perturbed.

Stages: burn-in (imports, worker start), then each grader over the whole set in the main thread
(Math-Verify's timeouts use signal.alarm), then two pathological inputs timed separately.
On the pairs Math-Verify is called as its README does: verify(parse(gold), parse(response)), gold given as
`\\boxed{gold}`. The last line is one JSON object with the figures and the ratios.

    .venv/bin/python benchmarks/grading.py [--per-kind 80] [--seed 0] [--skip-latency]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from alp_agents.envs.grading import grade

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
SUITE = Path(__file__).resolve().parents[1] / "tests" / "data" / "math_verify_cases.jsonl"


@dataclass(frozen=True)
class Case:
    response: str
    gold: str
    label: bool
    kind: str


# ---------------------------------------------------------------------------------------------
# Building the labelled set
# ---------------------------------------------------------------------------------------------

_TEMPLATES = [
    "Combining the steps above, the answer is $\\boxed{{{}}}$.",
    "Final Answer: The final answer is ${}$. I hope it is correct.",
    "So we conclude:\n\\[\n\\boxed{{{}}}\n\\]",
]
_INTEGER = re.compile(r"^-?\d+$")
_FRACTION = re.compile(r"^(-?)\\d?frac\{(\d+)\}\{(\d+)\}$")
_DECIMAL = re.compile(r"^-?\d*\.\d+$")
_ROOT = re.compile(r"^(\d+)\s*\\sqrt\{(\d+)\}$")
_CHOICE = re.compile(r"^\\text\{\(([A-E])\)\}$")
_SCIENTIFIC = re.compile(r"^(\d+(?:\.\d+)?)e(-?\d+)$")
_SEPARATED = re.compile(r"\d,(\\!)?\s*\d{3}(?!\d)")  # 58,500 or 10,\!080: one number, not a list


def _top_level_commas(text: str) -> list[int]:
    depth, positions = 0, []
    for pos, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            positions.append(pos)
    return positions


def _items(text: str) -> list[str]:
    cuts = [-1, *_top_level_commas(text), len(text)]
    return [text[a + 1 : b].strip() for a, b in zip(cuts, cuts[1:])]


def _is_tuple(gold: str) -> bool:
    """A single bracketed group with commas: a tuple or interval, where order and brackets matter."""
    return gold[:1] in "([" and gold[-1:] in ")]" and not _top_level_commas(gold) and "," in gold and "\\cup" not in gold


def _summands(gold: str) -> list[str] | None:
    """The top-level terms of a symbolic sum, each with its sign (`x^2 - 2x` -> [`x^2`, `-2x`]), or None."""
    if not re.search(r"[a-zA-Z]", gold) or re.search(r"[=,]|\\pm|\\text|\\begin|\\cup|\de[-+]", gold):
        return None
    depth, cuts = 0, [0]
    for pos, char in enumerate(gold):
        depth += char in "([{"
        depth -= char in ")]}"
        before = gold[:pos].rstrip()
        if depth == 0 and char in "+-" and before and before[-1] not in "^_({[" and not before.endswith(("\\cdot", "\\times")):
            cuts.append(pos)
    terms = [gold[a:b].strip() for a, b in zip(cuts, cuts[1:] + [len(gold)])]
    return terms if len(terms) >= 2 else None


def _join(terms: list[str]) -> str:
    text = " ".join(term if term[0] in "+-" else f"+ {term}" for term in terms)
    return text.lstrip("+ ")


def rewrites(gold: str, problem: str) -> list[tuple[str, str]]:
    """Value-preserving rewrites of a gold answer: (kind, text), all labelled True."""
    out = []
    if _INTEGER.match(gold) and abs(int(gold)) >= 1000:
        out.append(("thousands", f"{int(gold):,}"))
    if _INTEGER.match(gold) and gold.lstrip("-").startswith("0") and len(gold) > 1:
        out.append(("leading_zeros", str(int(gold))))
    if _INTEGER.match(gold):
        out.append(("units", f"{gold} \\text{{ units}}"))
        if "degree" in problem:
            out.append(("degree_sign_added", f"{gold}^\\circ"))
    if ",\\!" in gold or "{,}" in gold:
        out.append(("separators_removed", re.sub(r",\\!\s*|\{,\}", "", gold)))
    if (fraction := _FRACTION.match(gold)) is not None:
        sign, a, b = fraction.groups()
        out.append(("slash_fraction", f"{sign}{a}/{b}"))
        out.append(("dfrac", f"{sign}\\dfrac{{{a}}}{{{b}}}" if "dfrac" not in gold else f"{sign}\\frac{{{a}}}{{{b}}}"))
        value = Fraction(int(a), int(b))
        if _terminates(value):
            out.append(("exact_decimal", sign + _decimal(value)))
        if value.denominator > 1 and value > 1:
            whole = value.numerator // value.denominator
            out.append(("mixed_number", f"{sign}{whole}\\frac{{{value.numerator - whole * value.denominator}}}{{{value.denominator}}}"))
    if _DECIMAL.match(gold):
        value = Fraction(gold)
        out.append(("decimal_as_fraction", f"{'-' if value < 0 else ''}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"))
    if (scientific := _SCIENTIFIC.match(gold)) is not None:
        out.append(("scientific_notation", f"{scientific[1]} \\times 10^{{{scientific[2]}}}"))
    if (root := _ROOT.match(gold)) is not None:
        k, m = map(int, root.groups())
        out.append(("sqrt_absorbed", f"\\sqrt{{{k * k * m}}}"))
    if _top_level_commas(gold) and not _is_tuple(gold) and "=" not in gold and not _SEPARATED.search(gold):
        out.append(("reordered_list", ", ".join(reversed(_items(gold)))))
    if gold.startswith("\\{") and gold.endswith("\\}"):
        out.append(("reordered_set", "\\{" + ", ".join(reversed(_items(gold[2:-2]))) + "\\}"))
    if _is_tuple(gold):
        out.append(("left_right", f"\\left{gold[0]} {gold[1:-1]} \\right{gold[-1]}"))
        if gold[0] in "([" and gold[-1] in ")]" and gold[0] + gold[-1] != "()":
            out.append(("interval_membership", f"x \\in {gold}"))
    if (terms := _summands(gold)) is not None:
        out.append(("summands_reordered", _join(terms[::-1])))
    if not _top_level_commas(gold) and "=" not in gold and not _is_tuple(gold) and "\\text" not in gold:
        name = next(letter for letter in "xyzkw" if letter not in gold)  # `x = x + 1` would be an equation
        out.append(("assignment", f"{name} = {gold}"))
    if "^\\circ" in gold:
        out.append(("no_degree_sign", gold.replace("^\\circ", "")))
    if (choice := _CHOICE.match(gold)) is not None:
        out.append(("choice_letter", choice[1]))
    elif gold.startswith("\\text{") and gold.endswith("}"):
        out.append(("text_unwrapped", gold[6:-1]))
    return out


def perturbations(gold: str) -> list[tuple[str, str]]:
    """Value-changing edits of a gold answer: (kind, text), all labelled False."""
    out = []
    digits = list(re.finditer(r"\d+", gold))
    if digits:
        last = digits[-1]
        out.append(("digit_changed", gold[: last.start()] + str(int(last.group()) + 1) + gold[last.end() :]))
    if gold.startswith("-"):
        out.append(("sign_flipped", gold[1:]))
    elif not _top_level_commas(gold) and not _is_tuple(gold) and gold not in ("0", "0.0") and "=" not in gold:
        out.append(("sign_flipped", "-" + gold))
    if _INTEGER.match(gold) and int(gold) != 0:
        out.append(("times_ten", gold + "0"))
        out.append(("off_by_one", str(int(gold) + 1)))
    if _DECIMAL.match(gold) and Fraction(gold) != Fraction(gold.replace(".", ".0", 1)):
        out.append(("decimal_shifted", gold.replace(".", ".0", 1)))
    if (fraction := _FRACTION.match(gold)) is not None and fraction[2] != fraction[3]:
        out.append(("fraction_inverted", f"{fraction[1]}\\frac{{{fraction[3]}}}{{{fraction[2]}}}"))
    if _is_tuple(gold):
        out.append(("closer_flipped", gold[:-1] + {")": "]", "]": ")"}[gold[-1]]))
        out.append(("opener_flipped", {"(": "[", "[": "("}[gold[0]] + gold[1:]))
        items = _items(gold[1:-1])
        if len(items) >= 2 and items[0] != items[1]:
            out.append(("tuple_swapped", gold[0] + ", ".join([items[1], items[0], *items[2:]]) + gold[-1]))
            out.append(("element_dropped", gold[0] + ", ".join(items[:-1]) + gold[-1]))
    elif _top_level_commas(gold) and "=" not in gold and not _SEPARATED.search(gold):
        out.append(("element_dropped", ", ".join(_items(gold)[:-1])))
    if (terms := _summands(gold)) is not None:
        flipped = ("+" if terms[-1][0] == "-" else "- ") + terms[-1].lstrip("+-")
        out.append(("inner_sign_flipped", _join([*terms[:-1], flipped])))
        out.append(("summand_dropped", _join(terms[:-1])))
    if "\\pm" in gold:
        out.append(("pm_as_plus", gold.replace("\\pm", "+")))
    if (choice := _CHOICE.match(gold)) is not None:
        out.append(("other_choice", f"\\text{{({'ABCDE'[('ABCDE'.index(choice[1]) + 1) % 5]})}}"))
    return out


def _terminates(value: Fraction) -> bool:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _decimal(value: Fraction) -> str:
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = str(int(value * 10**digits)).rjust(digits + 1, "0")
    return f"{scaled[:-digits]}.{scaled[-digits:]}" if digits else scaled


def _replace_last_box(solution: str, content: str) -> str | None:
    start = solution.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for pos in range(start + 6, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[pos], 0)
        if depth == 0:
            return solution[: start + 7] + content + solution[pos:]
    return None


def build_cases(data_dir: Path, per_kind: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    rows = {name: [json.loads(line) for line in open(data_dir / f"{name}.jsonl", encoding="utf-8")]
            for name in ("math500_test", "gsm8k_test", "aime24", "aime25", "olympiadbench", "minerva_math")}  # fmt: skip
    by_kind: dict[str, list[Case]] = {}

    def add(kind: str, response: str, gold: str, label: bool) -> None:
        by_kind.setdefault(kind, []).append(Case(response, gold, label, kind))

    for name, dataset in rows.items():
        for row in dataset:
            gold = row["answer"]
            add("boxed_gold", rng.choice(_TEMPLATES).format(gold), gold, True)
            for kind, text in rewrites(gold, row["problem"]):
                add(kind, rng.choice(_TEMPLATES).format(text), gold, True)
            for kind, text in perturbations(gold):
                add(kind, rng.choice(_TEMPLATES).format(text), gold, False)
            if name in ("math500_test", "gsm8k_test", "minerva_math"):
                add("worked_solution", row["solution"], gold, True)
                wrong = perturbations(gold)
                if name != "gsm8k_test" and wrong:
                    edited = _replace_last_box(row["solution"], rng.choice(wrong)[1])
                    if edited is not None:
                        add("worked_solution_wrong", edited, gold, False)
                elif name == "gsm8k_test":
                    add("worked_solution_wrong", row["solution"].rsplit("####", 1)[0] + f"#### {int(gold) + 1}", gold, False)
    cases = [case for kind in sorted(by_kind) for case in rng.sample(by_kind[kind], min(per_kind, len(by_kind[kind])))]
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def math_verify_grader() -> Callable[[str, str], bool]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every timeout and parse failure
    return lambda response, gold: bool(verify(parse(f"\\boxed{{{gold}}}"), parse(response)))


def load_suite(path: Path) -> tuple[list[Case], list[dict]]:
    """Math-Verify's public suite as cases (the test name as the kind), and its rows (for calling Math-Verify as its tests do)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [Case(row["prediction"], row["gold"], row["expected"], row["test"]) for row in rows], rows


def _in_order(rows: list[dict]) -> Callable[[str, str], dict]:
    """The suite row of each call, for graders called once per row in the suite's order (a pair may appear
    twice with different options: `test_set_rel_assymetry`)."""
    pending = iter(rows)

    def row_of(prediction: str, gold: str) -> dict:
        row = next(pending)
        assert (row["prediction"], row["gold"]) == (prediction, gold), "call the grader on the suite's rows, in order"
        return row

    return row_of


def math_verify_as_its_tests(rows: list[dict]) -> Callable[[str, str], bool]:
    """Math-Verify on its own suite exactly as each test calls it (its `compare_strings` helper or plain parse/verify)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    row_of = _in_order(rows)

    def grade_row(prediction: str, gold: str) -> bool:
        row = row_of(prediction, gold)
        how = row["mv_options"]
        if how["call"] == "parse_verify":
            return bool(verify(parse(row["mv_gold"]), parse(prediction)))
        targets = [LatexExtractionConfig(boxed_match_priority=0) if kind == "latex" else ExprExtractionConfig()
                   for kind in how["match_types"]]  # fmt: skip
        return bool(verify(parse(row["mv_gold"], targets), parse(prediction, targets), float_rounding=how.get("precision", 6),
                           strict=True, allow_set_relation_comp=how.get("allow_set_relation_comp", False)))  # fmt: skip

    return grade_row


def math_verify_as_readme(rows: list[dict]) -> Callable[[str, str], bool]:
    """Math-Verify on its suite as a new user calls it: verify(parse(gold), parse(prediction)), the gold as the test writes it."""
    from math_verify import parse, verify

    row_of = _in_order(rows)
    return lambda prediction, gold: bool(verify(parse(row_of(prediction, gold)["mv_gold"]), parse(prediction)))


def run(grader: Callable[[str, str], bool], cases: list[Case]) -> tuple[list[bool], float]:
    start = time.perf_counter()
    verdicts = []
    for case in cases:
        try:
            verdicts.append(grader(case.response, case.gold))
        except Exception:  # a reference grader that raises counts as "not equal"
            verdicts.append(False)
    return verdicts, time.perf_counter() - start


def summarise(verdicts: list[bool], cases: list[Case], seconds: float) -> dict[str, float | int]:
    return {
        "accuracy": round(sum(v == c.label for v, c in zip(verdicts, cases)) / len(cases), 4),
        "false_positives": sum(v and not c.label for v, c in zip(verdicts, cases)),
        "false_negatives": sum(c.label and not v for v, c in zip(verdicts, cases)),
        "checks_per_s": round(len(cases) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=80, help="cases sampled per kind of pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the eval-set JSONL files")
    parser.add_argument("--show", type=int, default=0, help="print this many cases where the graders or the label disagree")
    parser.add_argument("--suite", type=Path, default=SUITE, help="Math-Verify's public suite as JSON Lines")
    parser.add_argument("--skip-latency", action="store_true", help="skip benchmarks/grading_latency.py's figures")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    cases = build_cases(args.data, args.per_kind, args.seed)
    mv_grade = math_verify_grader()
    for case in cases[:20]:  # burn-in: imports, caches, our worker processes
        grade(case.response, case.gold)
        mv_grade(case.response, case.gold)

    ours, ours_s = run(grade, cases)
    theirs, theirs_s = run(mv_grade, cases)

    print(f"Labelled pairs: {len(cases)} cases ({sum(c.label for c in cases)} equivalent), {len(set(c.kind for c in cases))} kinds")
    print(f"{'kind':<24}{'n':>5}{'label':>7}{'ours':>7}{'m-v':>7}")
    totals: Counter[tuple[str, str]] = Counter()
    for case, a, b in zip(cases, ours, theirs):
        totals[case.kind, "n"] += 1
        totals[case.kind, "ours"] += a == case.label
        totals[case.kind, "mv"] += b == case.label
    for kind in sorted({c.kind for c in cases}):
        label = next(c.label for c in cases if c.kind == kind)
        n = totals[kind, "n"]
        print(f"{kind:<24}{n:>5}{str(label):>7}{totals[kind, 'ours'] / n:>7.3f}{totals[kind, 'mv'] / n:>7.3f}")
    shown = [(c, a, b) for c, a, b in zip(cases, ours, theirs) if c.label not in (a, b) or a != b][: args.show]
    for case, a, b in shown:
        print(f"  ours={a} m-v={b} label={case.label} [{case.kind}] gold={case.gold!r} response=...{case.response[-80:]!r}")

    pathological = [("\\boxed{9^{9^{9^9}}}", "1"), ("\\boxed{(x+1)^{100000} - x}", "x^2 + 1")]
    slowest = {"ours": 0.0, "math_verify": 0.0}
    for response, gold in pathological:
        for name, grader in (("ours", grade), ("math_verify", mv_grade)):
            start = time.perf_counter()
            assert not grader(response, gold)
            slowest[name] = max(slowest[name], round(time.perf_counter() - start, 2))

    ours_summary, theirs_summary = summarise(ours, cases, ours_s), summarise(theirs, cases, theirs_s)
    table = f"{'grader':<24}{'accuracy':>10}{'false +':>9}{'false -':>9}{'checks/s':>10}"
    print(f"\nLabelled pairs, all kinds\n{table}")
    for name, figures in (("ours", ours_summary), ("math_verify_readme", theirs_summary)):
        print(f"{name:<24}{figures['accuracy']:>10.3f}{figures['false_positives']:>9}{figures['false_negatives']:>9}"
              f"{figures['checks_per_s']:>10}")  # fmt: skip

    suite_cases, suite_rows = load_suite(args.suite)
    suite = {}
    for name, grader in (("ours", grade), ("math_verify_readme", math_verify_as_readme(suite_rows)),
                         ("math_verify_its_tests", math_verify_as_its_tests(suite_rows))):  # fmt: skip
        verdicts, seconds = run(grader, suite_cases)
        suite[name] = summarise(verdicts, suite_cases, seconds)
    print(f"\nMath-Verify's public suite: {len(suite_cases)} rows ({sum(c.label for c in suite_cases)} equivalent)")
    print(table)
    for name, figures in suite.items():
        print(f"{name:<24}{figures['accuracy']:>10.3f}{figures['false_positives']:>9}{figures['false_negatives']:>9}"
              f"{figures['checks_per_s']:>10}")  # fmt: skip

    latency = None
    if not args.skip_latency and (Path(__file__).parent / "grading_latency.py").exists():
        from grading_latency import latency_figures  # the sibling script (benchmarks/ is on sys.path when run as a script)

        latency = latency_figures()
        for name, value in latency.items():
            if isinstance(value, dict):
                print(f"latency {name:<16} ordinary {value['ordinary']}  pathological {value['pathological']}  "
                      f"{value['checks_per_s']} checks/s")  # fmt: skip

    print(json.dumps({
        "cases": len(cases),
        "equivalent": sum(c.label for c in cases),
        "ours": ours_summary,
        "math_verify": theirs_summary,
        "agreement": round(sum(a == b for a, b in zip(ours, theirs)) / len(cases), 4),
        "throughput_ratio": round(ours_summary["checks_per_s"] / theirs_summary["checks_per_s"], 2),
        "accuracy_delta": round(ours_summary["accuracy"] - theirs_summary["accuracy"], 4),
        "pathological_max_s": slowest,
        "math_verify_suite": {"rows": len(suite_cases), **suite},
        "latency": latency,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
