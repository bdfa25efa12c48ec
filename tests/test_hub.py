"""st_sdk.load("owner/repo") and load("owner/repo", file=...) from a local directory laid out as the
Hugging Face hub cache; never the network (HF_HUB_OFFLINE=1)."""
import shutil

import pytest

import st_sdk
from st_sdk.errors import InputError

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo, files: dict):
    """models--owner--repo/{refs/main, snapshots/<commit>/<files>} as huggingface_hub writes it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_dir):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tiny_dir["hf"]
    files = {p.name: p for p in hf.iterdir() if p.is_file() and not p.name.endswith(".gguf")}
    cached_repo(cache, "PowerInfer/SmallThinker-Tiny", files)
    cached_repo(cache, "PowerInfer/SmallThinker-Tiny-GGUF",
                {"tiny-f32.gguf": tiny_dir["gguf"], "tiny-copy.gguf": tiny_dir["gguf"]})
    cached_repo(cache, "someone/one-gguf", {"model.gguf": tiny_dir["gguf"]})
    return cache


def test_hf_repository_name_from_the_cache(hub, tiny_dir):
    m = st_sdk.load("PowerInfer/SmallThinker-Tiny", backend="numpy")
    assert COMMIT in m.path and m.config.num_hidden_layers == 4
    ref = st_sdk.load(tiny_dir["hf"], backend="numpy")
    assert m.generate([1, 2, 3], max_new_tokens=4, seed=0).token_ids == \
        ref.generate([1, 2, 3], max_new_tokens=4, seed=0).token_ids


def test_gguf_repository_with_a_file_name(hub):
    m = st_sdk.load("PowerInfer/SmallThinker-Tiny-GGUF", file="tiny-f32.gguf", backend="numpy")
    assert m.path.endswith("tiny-f32.gguf") and m.tokenizer is not None
    assert st_sdk.load("someone/one-gguf", backend="numpy").path.endswith("model.gguf")   # the only one


def test_several_ggufs_need_a_file_name(hub):
    with pytest.raises(InputError, match=r"2 GGUF files; choose one with file=.*tiny-copy.gguf"):
        st_sdk.load("PowerInfer/SmallThinker-Tiny-GGUF", backend="numpy")


def test_offline_and_not_cached_is_a_clear_error(hub):
    with pytest.raises(InputError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        st_sdk.load("PowerInfer/SmallThinker-4BA0.6B-Instruct", backend="numpy")
    with pytest.raises(InputError, match="file 'missing.gguf'.*not in the Hugging Face cache"):
        st_sdk.load("PowerInfer/SmallThinker-Tiny-GGUF", file="missing.gguf", backend="numpy")


def test_local_paths_win_and_file_joins_a_directory(hub, tiny_dir):
    m = st_sdk.load(tiny_dir["hf"], file="tiny-f32.gguf", backend="numpy")
    assert m.path.endswith("tiny-f32.gguf")
    with pytest.raises(InputError, match="file="):
        st_sdk.load(tiny_dir["gguf"], file="x.gguf")
    from st_sdk.errors import WeightError

    with pytest.raises(WeightError, match="no such file"):
        st_sdk.load("models/missing.gguf")     # a path, not a repository name


def test_hf_home_is_honoured(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached_repo(tmp_path / "home" / "hub", "a/b", {"m.gguf": tiny_dir["gguf"]})
    assert st_sdk.load("a/b", backend="numpy").path.endswith("m.gguf")
