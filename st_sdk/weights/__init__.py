"""Model files: `open_model(path)` for an HF directory or a `.gguf` file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import ModelConfig
from ..errors import ConfigError, WeightError
from . import validate
from .tensor import WeightTensor
from .watch import FileWatch


@dataclass
class ModelFile:
    """An opened model: its config, a tensor getter (memory-mapped, no copy), its kind ('hf' or
    'gguf': which tensor names `get` takes), its tokenizer (or None) and where it came from."""

    path: Path
    kind: str
    config: ModelConfig
    get: Callable[[str], WeightTensor]
    names: list[str]
    tokenizer: Any
    file_size: int
    file_type: str | None = None   # GGUF general.file_type as llama.cpp names it ("q4_k_m"), if any
    watch: Any = None   # FileWatch over the mapped files: `check()` raises if one changed on disk

    def params(self):
        """ModelParams over the file's tensors (shapes checked)."""
        from .layout import assemble

        return assemble(self.config, self.get, self.kind)


def open_model(path: str | Path) -> ModelFile:
    """Open an HF directory (config.json + safetensors) or a GGUF file; raises ConfigError/WeightError
    naming the file for anything else."""
    p = Path(path)
    if p.is_dir():
        from ..tokenizer import Tokenizer
        from .hf import HFCheckpoint

        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f"; to load a GGUF pass the file, e.g. {ggufs[0]}" if ggufs else ""
            raise ConfigError(f"{p / 'config.json'}: config.json not found{hint}")
        cfg = ModelConfig.from_json_file(p / "config.json")
        ckpt = HFCheckpoint(p)
        validate.config_against_file(cfg, len(ckpt.names()), ckpt.file_size(), "hf", str(p))
        tok = Tokenizer.from_hf_dir(p)
        return ModelFile(p, "hf", cfg, ckpt.get, ckpt.names(), tok, ckpt.file_size(),
                         watch=FileWatch([f.watched for f in ckpt.files.values()]))
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from ..tokenizer import Tokenizer
            from .gguf_file import GGUFModelFile
            from .layout import gguf_extra_tensors

            g = GGUFModelFile(p)
            cfg = g.config()
            validate.config_against_file(cfg, len(g.tensors), g.file_size(), "gguf", str(p))
            gguf_extra_tensors(cfg, g.tensors, str(p))
            tok = Tokenizer.from_gguf_metadata(g.metadata("tokenizer."), source=str(p))
            return ModelFile(p, "gguf", cfg, g.get, g.names(), tok, g.file_size(), file_type=g.file_type(),
                             watch=FileWatch([g.watched]))
        if p.suffix == ".gguf":
            raise WeightError(f"{p}: not a GGUF file (bad magic {magic!r})")
        if p.name == "config.json":
            return open_model(p.parent)
        raise WeightError(f"{p}: not a model: expected an HF directory (config.json + safetensors) "
                          "or a .gguf file")
    raise WeightError(f"{p}: no such file or directory")
