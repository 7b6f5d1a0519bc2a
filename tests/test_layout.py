"""The codebase's shape: small files, and the parameterization's math only in ldm/schedules/."""

from __future__ import annotations

import ast
from pathlib import Path

LDM = Path(__file__).resolve().parents[1] / "ldm"
METHODS = {"RectifiedFlow", "DDPM", "VPrediction", "X0Prediction", "EDM", "TrigFlow"}


def test_no_file_over_400_lines():
    long = {str(p.relative_to(LDM)): n for p in LDM.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_only_schedules_name_the_parameterizations():
    """Outside ldm/schedules/ (and the error table, which lists them all), no code names a method class."""
    offenders = []
    for path in LDM.rglob("*.py"):
        if path.is_relative_to(LDM / "schedules") or path.name == "sampler_table.py":
            continue
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        if names & METHODS:
            offenders.append(f"{path.relative_to(LDM)}: {sorted(names & METHODS)}")
    assert not offenders, offenders
