#!/usr/bin/env python
"""Mutation testing of the refinement and scoring core with mutmut 3 (developer tool, not CI).

A mutant is the library with one small change (``<`` for ``<=``, a constant off by one, an
argument dropped); the fast tests should fail on it ("killed"). Survivors are either equivalent
(no test could tell) or a behaviour no test pins. Groups and their test files are in
``scripts/mutation.toml``; each group runs in its own scratch copy under ``build/mutation/`` (mutmut
reads its settings from the current folder's ``pyproject.toml``), so the groups never mix.

    pip install -e ".[test,mutation]"
    nice -n 10 python scripts/mutation.py policy surgery     # some groups, in this order
    nice -n 10 python scripts/mutation.py                    # every group in the file's order

Prints, per module, mutants killed / total and the survivors' names (``mutmut show NAME`` in the
group's folder prints a survivor's diff), and writes ``build/mutation/<group>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "scripts" / "mutation.toml"
# A timeout is not counted as a kill: a forked child of a process whose OpenMP pool is running can
# hang, so the runs use one thread, and any timeout left is looked at by hand.
KILLED = {"killed", "segfault"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RESULT_LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+__mutmut_\d+): (?P<status>.+)$")


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def prepare(name: str, group: dict) -> Path:
    """A scratch copy of the package and tests with the group's ``[tool.mutmut]``."""
    work = ROOT / "build" / "mutation" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "grefine_hooks", work / "grefine_hooks", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    settings = (
        "\n[tool.mutmut]\n"
        'source_paths = ["grefine_hooks"]\n'
        f"only_mutate = {_toml_list(group['only_mutate'])}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(group['tests'])}\n"
        f'pytest_add_cli_args = {_toml_list(["-q", "-p", "no:cacheprovider", *group.get("pytest_args", [])])}\n'
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + settings)
    return work


def results(work: Path) -> dict[str, str]:
    """``{mutant name: status}`` from ``mutmut results --all true``."""
    output = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                            capture_output=True, text=True, check=True, env={**os.environ, **ONE_THREAD}).stdout
    return {match["name"]: match["status"].strip() for match in map(RESULT_LINE.match, output.splitlines()) if match}


def function_of(mutant: str) -> str:
    """``grefine_hooks.records.xǁQualityLogǁsummary__mutmut_3`` -> ``QualityLog.summary``."""
    local = mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    return local.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")


def name_patterns(group: dict) -> list[str]:
    """mutmut's names of the mutants of ``group["functions"]`` (all mutants when absent)."""
    modules = [path.removesuffix(".py").replace("/", ".") for path in group["only_mutate"]]
    mangled = ["x_" + function if "." not in function else "xǁ" + function.replace(".", "ǁ")
               for function in group.get("functions", [])]
    return [f"{module}.{function}__mutmut_*" for module in modules for function in mangled]


def run_group(name: str, group: dict, children: int = 1) -> dict:
    work = prepare(name, group)
    with open(work / "run.log", "w") as log:  # mutmut's progress line, redrawn for every mutant
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *name_patterns(group)]
        subprocess.run(command, cwd=work, check=False,
                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    statuses = results(work)
    wanted = group.get("functions")
    if wanted:
        statuses = {mutant: status for mutant, status in statuses.items() if function_of(mutant) in wanted}
    per_module: dict[str, Counter] = {}
    survivors: dict[str, list[str]] = {}
    for mutant, status in sorted(statuses.items()):
        module = mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[0]
        per_module.setdefault(module, Counter())[status] += 1
        if status not in KILLED:
            survivors.setdefault(module, []).append(f"{mutant} ({status})")
    summary = {
        module: {"total": sum(counts.values()), "killed": sum(counts[s] for s in KILLED), "statuses": dict(counts),
                 "survivors": survivors.get(module, [])}
        for module, counts in per_module.items()
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    for module, entry in summary.items():
        print(f"{name}: {module}: {entry['killed']}/{entry['total']} killed {entry['statuses']}")
        for survivor in entry["survivors"]:
            print(f"    survived: {survivor}")
    return summary


def main() -> None:
    groups = tomllib.loads(CONFIG.read_text())["groups"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", choices=[*groups, []], help="groups to run (default: all)")
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once (one torch thread each)")
    arguments = parser.parse_args()
    for name in arguments.groups or list(groups):
        run_group(name, groups[name], arguments.children)


if __name__ == "__main__":
    main()
