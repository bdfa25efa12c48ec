"""Hugging Face Hub names: `st_sdk.load("owner/repo")` and `st_sdk.load("owner/repo", file="x.gguf")`.

A name that is not an existing local path and looks like `owner/repo` is resolved with
`huggingface_hub`: first in its local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
~/.cache/huggingface/hub), then by downloading when a network is there (never when `HF_HUB_OFFLINE=1`).
Without `file`, an HF-format repository brings its config, tokenizer and safetensors files; a GGUF
repository holding one .gguf file loads it, one holding several asks for `file=`. Nothing is
downloaded at import or by tests; offline and not cached raises InputError saying so.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError

REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: what an HF-format model needs (no .bin, .pt, .gguf or README files)
HF_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json", "chat_template.jinja"]
INSTALL = 'pip install "st-sdk[hub]"'


def is_repo_name(path) -> bool:
    return (isinstance(path, str) and bool(REPO.match(path)) and not path.endswith((".gguf", ".json", ".safetensors"))
            and not Path(path).exists())


def resolve(path, file: str | None = None, revision: str | None = None) -> Path:
    """A local path for `path` (a local file or directory, or a hub repository name) and `file`."""
    if not is_repo_name(path):
        p = Path(path)
        if file is not None:
            if not p.is_dir():
                raise InputError(f"file={file!r}: only with a directory or a hub repository name, not {p}")
            return p / file
        return p
    if file is not None and (not isinstance(file, str) or not file):
        raise InputError(f"file: expected a file name in the repository, got {file!r}")
    try:
        import huggingface_hub as hf
    except ImportError:
        raise InputError(f"{path}: not a local path; loading it from the Hugging Face Hub needs huggingface_hub "
                         f"(`{INSTALL}`)") from None
    cache = cache_dir()
    try:
        return _fetch(hf, path, file, revision, cache, local_only=True)
    except InputError:
        raise
    except Exception as cached_err:   # not in the cache (or only partly)
        if offline():
            raise InputError(f"{path}{_of(file)}: no such local path, not in the Hugging Face cache "
                             f"({cache or 'default'}), and HF_HUB_OFFLINE is set; download it once with a "
                             "network") from None
        try:
            return _fetch(hf, path, file, revision, cache, local_only=False)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}{_of(file)}: no such local path, not in the Hugging Face cache "
                             f"({cache or 'default'}), and the download failed ({type(e).__name__}: {_first_line(e)}); connect to a network, or "
                             f"check the name (cache: {_first_line(cached_err)})") from None


def _fetch(hf, repo: str, file, revision, cache, local_only: bool) -> Path:
    if file is not None:
        return Path(hf.hf_hub_download(repo, file, revision=revision, cache_dir=cache, local_files_only=local_only))
    if not local_only:
        names = hf.list_repo_files(repo, revision=revision)
        if "config.json" not in names:
            gguf = _pick_gguf(repo, [n for n in names if n.endswith(".gguf")])
            return Path(hf.hf_hub_download(repo, gguf, revision=revision, cache_dir=cache))
    snap = Path(hf.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=local_only,
                                     allow_patterns=None if local_only else HF_FILES))
    if (snap / "config.json").is_file():
        return snap
    return snap / _pick_gguf(repo, sorted(str(p.relative_to(snap)) for p in snap.rglob("*.gguf")))


def _pick_gguf(repo: str, ggufs: list[str]) -> str:
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise InputError(f"{repo}: the repository has neither config.json nor a .gguf file")
    raise InputError(f"{repo}: holds {len(ggufs)} GGUF files; choose one with file=..., e.g. "
                     + ", ".join(repr(g) for g in ggufs[:8]))


def cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _of(file) -> str:
    return f" (file {file!r})" if file else ""


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
