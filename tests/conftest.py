import pytest


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory):
    "The emoji source prepared from the fetched data/ into a fresh folder, once per test session."
    from rankclip.data import prepare
    out = tmp_path_factory.mktemp("prepared")
    prepare(data="data", out=str(out), sources=["emoji"], workers=1)
    return out
