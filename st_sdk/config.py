"""ModelConfig: the SmallThinker hyper-parameters, read from an HF config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .kv import STORAGE, storage

ARCHITECTURE = "SmallThinkerForCausalLM"
GGUF_ARCH = "smallthinker"
#: tokens a session's KV cache starts with, and a memory plan provides for, when nobody says
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_num_primary_experts: int
    moe_num_active_primary_experts: int
    moe_ffn_hidden_size: int
    rope_layout: tuple[int, ...]
    sliding_window_layout: tuple[int, ...]
    sliding_window_size: int = 4096
    moe_primary_router_apply_softmax: bool = False
    rope_theta: float = 1.5e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        for name in ("rope_layout", "sliding_window_layout", "eos_token_id"):   # hashable, whatever was passed
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def default_context(self) -> int:
        """The context a memory plan provides for when none is given: min(max_position_embeddings,
        DEFAULT_CONTEXT)."""
        return min(self.max_position_embeddings, DEFAULT_CONTEXT)

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer i, or None for global attention (also when the window is at least the
        context length: it then never hides a key, and a ring of that size would be wasted memory)."""
        if not self.sliding_window_layout[i] or self.sliding_window_size >= self.max_position_embeddings:
            return None
        return self.sliding_window_size

    def layer_uses_rope(self, i: int) -> bool:
        return bool(self.rope_layout[i])

    def kv_cache_bytes(self, tokens: int, dtype: str = "f16") -> int:
        """KV cache for `tokens` tokens stored as `dtype` (st_sdk.kv.STORAGE): keys and values of every kv
        head; sliding-window layers keep at most their window."""
        per_token = 2 * self.kv_dim * STORAGE[storage(dtype)]
        return int(sum(per_token * (min(tokens, w) if (w := self.layer_window(i)) else tokens)
                       for i in range(self.num_hidden_layers)))

    def parameter_count(self) -> int:
        H, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        E, F = self.moe_num_primary_experts, self.moe_ffn_hidden_size
        attn = H * self.q_dim * 2 + H * self.kv_dim * 2
        per_layer = attn + 2 * H + E * H + E * 3 * F * H
        return V * H * (1 if self.tie_word_embeddings else 2) + L * per_layer + H

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        import math

        from .weights.validate import BOUNDS

        src = self.source
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "moe_num_primary_experts",
                     "moe_num_active_primary_experts", "moe_ffn_hidden_size",
                     "sliding_window_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{src}: field '{name}' must be a positive integer, got {v!r}")
            if v > BOUNDS[name]:
                raise ConfigError(f"{src}: field '{name}' = {v} is beyond any model st-sdk can run "
                                  f"(at most {BOUNDS[name]})")
        for name in ("tie_word_embeddings", "moe_primary_router_apply_softmax"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{src}: field '{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{src}: field '{name}' must be a finite number, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{src}: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{src}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.moe_num_active_primary_experts > self.moe_num_primary_experts:
            raise ConfigError(
                f"{src}: moe_num_active_primary_experts ({self.moe_num_active_primary_experts}) "
                f"exceeds moe_num_primary_experts ({self.moe_num_primary_experts})")
        for name in ("rope_layout", "sliding_window_layout"):
            layout = getattr(self, name)
            if len(layout) != self.num_hidden_layers:
                raise ConfigError(
                    f"{src}: field '{name}' has {len(layout)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}")
            if any(x not in (0, 1) for x in layout):
                raise ConfigError(f"{src}: field '{name}' must hold only 0 and 1, got {list(layout)}")
        if not self.rope_theta > 0:
            raise ConfigError(f"{src}: field 'rope_theta' must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{src}: field 'rms_norm_eps' must be positive, got {self.rms_norm_eps!r}")
        for t in self.eos_token_id:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ConfigError(f"{src}: eos_token_id {t!r} is outside the vocabulary ({self.vocab_size})")
        b = self.bos_token_id
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.vocab_size):
            raise ConfigError(f"{src}: bos_token_id {b!r} is outside the vocabulary ({self.vocab_size})")

    # ---- readers -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Build from an HF config.json dictionary (unknown fields are ignored)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        from .weights.validate import hf_config

        hf_config(d, source)
        archs = d.get("architectures") or []
        if not archs or archs[0] != ARCHITECTURE:
            found = archs[0] if archs else (d.get("model_type") or "nothing")
            raise ConfigError(
                f"{source}: unsupported architecture {found!r}; st-sdk runs {ARCHITECTURE} "
                f"(field 'architectures[0]')")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "moe_num_primary_experts", "moe_num_active_primary_experts",
                    "moe_ffn_hidden_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        L = d["num_hidden_layers"]
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or (d["hidden_size"] // n_heads if isinstance(n_heads, int) and n_heads else 0)
        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                num_hidden_layers=L,
                num_attention_heads=n_heads,
                num_key_value_heads=d.get("num_key_value_heads", n_heads),
                head_dim=head_dim,
                moe_num_primary_experts=d["moe_num_primary_experts"],
                moe_num_active_primary_experts=d["moe_num_active_primary_experts"],
                moe_ffn_hidden_size=d["moe_ffn_hidden_size"],
                rope_layout=tuple(_or(d.get("rope_layout"), [1] * L)),
                sliding_window_layout=tuple(_or(d.get("sliding_window_layout"), [0] * L)),
                sliding_window_size=d.get("sliding_window_size") or 4096,
                moe_primary_router_apply_softmax=_or(d.get("moe_primary_router_apply_softmax"), False),
                rope_theta=float(_or(d.get("rope_theta"), 1.5e6)),
                rms_norm_eps=float(_or(d.get("rms_norm_eps"), 1e-6)),
                tie_word_embeddings=_or(d.get("tie_word_embeddings"), False),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_t,
                source=source,
            )
        except TypeError as e:
            raise ConfigError(f"{source}: malformed field: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise ConfigError(f"{path}: malformed JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json form."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d["rope_layout"] = list(self.rope_layout)
        d["sliding_window_layout"] = list(self.sliding_window_layout)
        d["eos_token_id"] = list(self.eos_token_id)
        if d["bos_token_id"] is None:
            d.pop("bos_token_id")
        return {"architectures": [ARCHITECTURE], "model_type": "smallthinker", **d}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _or(value: Any, default: Any) -> Any:
    """A config.json value, or the default when it is absent or null."""
    return default if value is None else value
