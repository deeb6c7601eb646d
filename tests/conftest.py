import pytest


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory):
    "The emoji source prepared from the fetched data/ into a fresh folder, once per test session."
    from rankclip.data import prepare
    out = tmp_path_factory.mktemp("prepared")
    prepare(data="data", out=str(out), sources=["emoji"], workers=1)
    return out


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory):
    "A small CC3M-like corpus (rankclip make-corpus): 256 OpenMoji and Tux Paint drawings at 64 px in 4 shards and a table."
    from rankclip.loading import make_corpus
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, data="data", size=64, limit=256, shard_size=64)
    return out


@pytest.fixture(autouse=True)
def tar_index_cache(tmp_path_factory, monkeypatch):
    "Tar indexes go to a folder of the test session, not the user's cache."
    monkeypatch.setenv("RANKCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
