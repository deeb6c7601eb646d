"""The report's statistics against answers worked out by hand: main effects, interaction and F statistics of a
balanced design with seed blocks from plain means and sums of squares, Holm's adjustment, and the within-block
permutation test on a case whose exact p is known; and that the report notebook takes the cells it compares
from params.yaml rather than naming them."""
import ast, itertools, json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rankclip.report import contrasts, f_test, holm, permutation_p
from rankclip.study import load_params

ROOT = Path(__file__).resolve().parents[1]


def balanced(interaction: float = 0.0, seed: int = 0) -> pd.DataFrame:
    "A 3 x 2 design (factors a, b) in 4 seed blocks, one run per cell and seed, with an optional a:b interaction."
    rng = np.random.default_rng(seed)
    rows = [(a, b, s) for a in "xyz" for b in "uv" for s in range(4)]
    f = pd.DataFrame(rows, columns=["a", "b", "seed"])
    f["y"] = (f["a"].map({"x": 0.0, "y": 1.0, "z": -0.5}) + f["b"].map({"u": 0.0, "v": 0.7}) + 0.4 * f["seed"]
              + interaction * ((f["a"] == "z") & (f["b"] == "v")) + rng.normal(0, 0.3, len(f)))
    f["cell"] = f["a"] + f["b"]
    for k in ("a", "b", "seed"):
        f[k] = pd.Categorical(f[k])
    return f


def sums_of_squares(f: pd.DataFrame) -> dict:
    "Sums of squares of a, b, a:b, seed and the residual of the full model, by hand from cell and margin means."
    y, grand = f["y"].to_numpy(), f["y"].mean()
    mean = lambda *k: f.groupby(list(k), observed=True)["y"].transform("mean").to_numpy()
    ss = {k: ((mean(k) - grand) ** 2).sum() for k in ("a", "b", "seed")}
    ss["a:b"] = ((mean("a", "b") - mean("a") - mean("b") + grand) ** 2).sum()
    ss["residual"] = ((y - grand) ** 2).sum() - sum(ss.values())
    return ss


def test_main_effects_are_differences_of_means_in_a_balanced_design():
    f = balanced()
    m = f.groupby("a", observed=True)["y"].mean()
    e = contrasts(f, "y ~ C(a) + C(b) + C(seed)", {"y - x": "C(a)[T.y]", "z - x": "C(a)[T.z]", "zv - xv": ("zv", "xv")})
    np.testing.assert_allclose(e["estimate"], [m["y"] - m["x"], m["z"] - m["x"], m["z"] - m["x"]], atol=1e-10)
    # additive model, 24 runs, 1 + 2 + 1 + 3 parameters: 17 residual df; se of a difference of two level means of 8 runs
    ss = sums_of_squares(f)
    sigma2 = (ss["residual"] + ss["a:b"]) / 17
    np.testing.assert_allclose(e["se"], np.sqrt(sigma2 * 2 / 8), rtol=1e-10)
    assert (e["df"] == 17).all()
    np.testing.assert_allclose(e["p"], holm(e["p_unadjusted"]), atol=1e-12)
    assert (e["low"] < e["estimate"]).all() and (e["estimate"] < e["high"]).all()


def test_f_statistics_match_sums_of_squares_by_hand():
    f = balanced(interaction=1.5)
    ss = sums_of_squares(f)
    main = f_test(f, "y ~ C(b) + C(seed)", "y ~ C(a) + C(b) + C(seed)", n_perm=200)
    assert (main["df_num"], main["df_den"]) == (2, 17)
    np.testing.assert_allclose(main["F"], (ss["a"] / 2) / ((ss["residual"] + ss["a:b"]) / 17), rtol=1e-10)
    inter = f_test(f, "y ~ C(a) + C(b) + C(seed)", "y ~ C(a) * C(b) + C(seed)", n_perm=500)
    assert (inter["df_num"], inter["df_den"]) == (2, 15)
    np.testing.assert_allclose(inter["F"], (ss["a:b"] / 2) / (ss["residual"] / 15), rtol=1e-10)
    assert inter["p"] < 1e-3 and inter["p_permutation"] < 0.01 and 0 <= inter["p_hc3"] <= 1


def test_holm_by_hand():
    # sorted 0.001, 0.01, 0.02, 0.04 times 4, 3, 2, 1 -> 0.004, 0.03, 0.04, 0.04 (kept non-decreasing)
    np.testing.assert_allclose(holm([0.04, 0.01, 0.001, 0.02]), [0.04, 0.03, 0.004, 0.04])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # 0.5 x 2 = 1; 0.9 x 1 raised to the running maximum
    p = holm([0.01, np.nan])
    assert p[0] == pytest.approx(0.01) and np.isnan(p[1])


def test_permutation_p_matches_the_exact_within_block_distribution():
    # two conditions in each of 4 blocks; the within-block differences are all positive, so of the 2^4 equally
    # likely within-block arrangements only this one and its mirror reach the observed F: exact p = 2/16
    d = np.array([0.9, 1.3, 0.7, 1.1])
    f = pd.DataFrame({"g": ["a", "b"] * 4, "seed": np.repeat(range(4), 2),
                      "y": np.ravel([[3.0 * s, 3.0 * s + d[s]] for s in range(4)])})
    f["g"], f["seed"] = pd.Categorical(f["g"]), pd.Categorical(f["seed"])
    exact = np.mean([abs(np.mean(d * np.array(signs))) >= abs(d.mean()) - 1e-12
                     for signs in itertools.product([1, -1], repeat=4)])
    assert exact == 2 / 16
    p = permutation_p(f, "y ~ C(seed)", "y ~ C(g) + C(seed)", n_perm=4000, seed=1)
    assert abs(p - exact) < 0.025
    assert permutation_p(f, "y ~ C(seed)", "y ~ C(g) + C(seed)", n_perm=4000, seed=1) == p  # seeded


def test_the_report_notebook_names_no_cell_by_hand():
    # the cells it compares come from params.yaml (study.reference, report.baseline), their names from study.cells.<cell>.label
    cells = set(load_params(ROOT / "params.yaml")["study"]["cells"])
    nb = json.loads((ROOT / "nbs/experiments/report.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    named = {n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not named & cells, f"nbs/experiments/report.ipynb names cells {sorted(named & cells)}: read them from params.yaml"
