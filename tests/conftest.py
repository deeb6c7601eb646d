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


# The test command runs two xdist workers, a test file per work unit (`make test`: -n 2 --dist loadfile
# --no-loadscope-reorder; pytest 9 ignores xdist_group marks, so files are the units: the docs tests share one build).
# The two longest files start first, one on each worker: the docs (every library notebook executed) and the study
# (the smoke pipeline). The other files fill in behind them, in name order.
FIRST = ("tests/test_docs.py::", "tests/test_study.py::")


def pytest_collection_modifyitems(config, items):
    rank = lambda item: next((i for i, p in enumerate(FIRST) if item.nodeid.startswith(p)), len(FIRST))
    items.sort(key=rank)  # stable: collection order within each rank


def pytest_collection_finish(session):
    """Collection imported PyTorch, transformers, pandas and the rest (some 800,000 objects): out of the cyclic garbage
    collector's reach from here (`gc.freeze`), so that a test's full collections do not walk them all again."""
    import gc
    gc.collect()
    gc.freeze()
