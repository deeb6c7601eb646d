"""What a run is: refactors of the training code are proved bit-identical against digests stored before them."""
import json
from pathlib import Path

import pytest

from rankclip.study import DIGEST_CELLS, load_params, machine_key, short_run_digests

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = ROOT / "tests" / "short_run_digests.json"


def test_short_runs_are_bit_identical_to_the_stored_digests(tmp_path, monkeypatch):
    stored = json.loads(DIGESTS.read_text())
    if machine_key() not in stored:
        pytest.skip(f"no digests stored for this machine ({machine_key()}; stored: {sorted(stored)}): "
                    f"bit-identity holds only on alike CPUs; record them with `rankclip study digest --record {DIGESTS.relative_to(ROOT)}`")
    monkeypatch.chdir(ROOT)  # the cpu profile reads prepared/ relative to the project
    assert short_run_digests(load_params(ROOT / "params.yaml"), tmp_path, DIGEST_CELLS) == stored[machine_key()]
