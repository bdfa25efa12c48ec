"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special ids and chat template."""
from __future__ import annotations

from typing import Any, Sequence

from .errors import TokenizerError


class Tokenizer:
    def __init__(self, tk, eos_ids: Sequence[int] = (), bos_id: int | None = None,
                 chat_template: str | None = None, source: str = "", special_tokens: dict[str, str] | None = None):
        self.tk = tk                      # tokenizers.Tokenizer
        self.eos_ids = [int(i) for i in eos_ids]
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.source = source
        self.special_tokens = special_tokens or {}   # e.g. {"eos_token": "<|im_end|>"} for templates

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        from .arguments import text as check_text

        check_text(text, "text")
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages with the model's jinja2 chat template (as transformers does)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source or 'tokenizer'}: the model has no chat template "
                                 "(tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template')")
        from .chat_template import render

        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      **self.special_tokens, **extra)

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory) -> "Tokenizer | None":
        """From tokenizer.json (+ tokenizer_config.json, generation_config.json, config.json).
        None when the directory has no tokenizer.json."""
        from pathlib import Path

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer as _Tk

        try:
            tk = _Tk.from_file(str(path))
        except Exception as e:   # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from None
        tcfg = _read_json(d / "tokenizer_config.json")
        template = tcfg.get("chat_template")
        if isinstance(template, list):   # named templates: take the default one
            named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{d / 'tokenizer_config.json'}: 'chat_template' must be a string or a list of "
                                 f"{{'name', 'template'}} objects, got {type(template).__name__}")
        if not template and (d / "chat_template.jinja").is_file():
            try:
                template = (d / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{d / 'chat_template.jinja'}: cannot read: {e}") from None
        specials = {k: _token_text(tcfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        specials = {k: v for k, v in specials.items() if v}
        eos: list[int] = []
        for src in (_read_json(d / "generation_config.json"), _read_json(d / "config.json")):
            v = src.get("eos_token_id")
            eos += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int) and not isinstance(x, bool)]
        if "eos_token" in specials and tk.token_to_id(specials["eos_token"]) is not None:
            eos.append(tk.token_to_id(specials["eos_token"]))
        bos = tk.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
        return cls(tk, eos_ids=list(dict.fromkeys(eos)), bos_id=bos, chat_template=template or None,
                   source=str(d), special_tokens=specials)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "") -> "Tokenizer | None":
        """From GGUF `tokenizer.*` metadata (a dict key -> value). Only the BPE ('gpt2') model is
        supported; None when the file carries no tokenizer."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            return None
        if model != "gpt2":
            raise TokenizerError(f"{source}: tokenizer model {model!r} is not supported (supported: gpt2 BPE)")
        from .weights.validate import gguf_tokenizer

        gguf_tokenizer(meta, source)
        try:
            return cls._from_gguf(meta, source)
        except TokenizerError:
            raise
        except Exception as e:   # the tokenizers library raises bare Exceptions on inconsistent vocabularies
            raise TokenizerError(f"{source}: cannot build the tokenizer from the GGUF vocabulary "
                                 f"({type(e).__name__}: {e})") from None

    @classmethod
    def _from_gguf(cls, meta: dict[str, Any], source: str) -> "Tokenizer":
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tk = qwen2_tokenizer(vocab, merges)
        from tokenizers import AddedToken

        control = [tokens[i] for i, t in enumerate(types) if t == TOKEN_CONTROL]
        user = [tokens[i] for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom", "padding")}
        eos = [ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None]
        # ChatML models end a turn with <|im_end|> and a document with <|endoftext|>: stop on both
        eos += [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab and t in control]
        specials = {}
        for key, k in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
            if ids[k] is not None and 0 <= ids[k] < len(tokens):
                specials[key] = tokens[ids[k]]
        # a bos id the file says never to add (Qwen2: add_bos_token false) is not a bos for us
        bos = None if meta.get("tokenizer.ggml.add_bos_token") is False else ids["bos"]
        return cls(tk, eos_ids=list(dict.fromkeys(int(i) for i in eos)), bos_id=bos,
                   chat_template=meta.get("tokenizer.chat_template"), source=source, special_tokens=specials)

    @classmethod
    def synthetic(cls, vocab_size: int) -> "Tokenizer":
        """A byte-level BPE for synthetic models: 256 byte tokens, merges trained deterministically on
        a built-in text, then the ChatML specials; ids above them are padding (model rows no text maps to)."""
        if vocab_size < 256 + len(CHATML_SPECIALS):
            raise TokenizerError(f"a byte-level tokenizer needs vocab_size >= {256 + len(CHATML_SPECIALS)}, "
                                 f"got {vocab_size}")
        from tokenizers import AddedToken, pre_tokenizers, trainers

        tk = qwen2_tokenizer({}, [])
        trainer = trainers.BpeTrainer(vocab_size=min(vocab_size - len(CHATML_SPECIALS), 256 + SYNTH_MERGES),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIALS])
        from .chat_template import CHATML_TEMPLATE

        return cls(tk, eos_ids=[tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")], bos_id=None,
                   chat_template=CHATML_TEMPLATE, source="<synthetic>",
                   special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})

    # ---- writers -----------------------------------------------------------------------------
    def save_hf(self, directory) -> None:
        """tokenizer.json, tokenizer_config.json (with chat_template) and generation_config.json."""
        import json
        from pathlib import Path

        d = Path(directory)
        self.tk.save(str(d / "tokenizer.json"))
        tcfg = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                "bos_token": None, "errors": "replace", "split_special_tokens": False,
                **self.special_tokens, "chat_template": self.chat_template}
        (d / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False), encoding="utf-8")
        gen = {"eos_token_id": self.eos_ids, "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
        if self.bos_id is not None:
            gen["bos_token_id"] = self.bos_id
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")

    def gguf_metadata(self, vocab_size: int) -> dict[str, Any]:
        """The `tokenizer.*` GGUF keys llama.cpp reads (gpt2 BPE, qwen2 pre-tokenizer), the token list
        padded with unused [PAD i] tokens to the model's vocabulary size as llama.cpp's converter does."""
        vocab = self.tk.get_vocab(with_added_tokens=True)
        n = max(vocab_size, len(vocab))
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [TOKEN_UNUSED] * n
        for t, i in vocab.items():
            tokens[i], types[i] = t, TOKEN_NORMAL
        for i, added in self.tk.get_added_tokens_decoder().items():
            types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
        import json

        merges = json.loads(self.tk.to_str())["model"]["merges"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": False}
        eos_tok = self.special_tokens.get("eos_token")
        eos = self.tk.token_to_id(eos_tok) if eos_tok else (self.eos_ids[0] if self.eos_ids else None)
        if eos is not None:
            meta["tokenizer.ggml.eos_token_id"] = int(eos)
        others = [i for i in self.eos_ids if i != eos]
        if others:
            meta["tokenizer.ggml.eot_token_id"] = int(others[0])
        # llama.cpp's converter sets bos to <|endoftext|> for Qwen2 (never added: add_bos_token is false)
        bos = self.bos_id if self.bos_id is not None else self.tk.token_to_id("<|endoftext|>")
        if bos is not None:
            meta["tokenizer.ggml.bos_token_id"] = int(bos)
        pad = self.special_tokens.get("pad_token")
        if pad and self.tk.token_to_id(pad) is not None:
            meta["tokenizer.ggml.padding_token_id"] = int(self.tk.token_to_id(pad))
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta


# ---- helpers ---------------------------------------------------------------------------------------
#: GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
#: Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / SmallThinker; llama.cpp pre type "qwen2")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SYNTH_MERGES = 200
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model thinks locally, on the hardware you have.
SmallThinker is a family of sparse mixture-of-experts language models built for phones and laptops.
Each token picks a few experts; the router reads the layer input before attention runs.
Hello, world! How are you today? I am fine, thank you. What time is it? It is twelve o'clock.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42.
def main():\n    print("hello world")\n    return 0
你好，世界。今天天气很好。我们一起学习语言模型。
こんにちは世界。 Bonjour le monde. Hallo Welt. Hola mundo. Привет, мир.
Emoji: 😀 🚀 ✨ 👍 ❤️
"""


def qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers` BPE with Qwen2's normaliser, pre-tokenizer and byte-level decoder."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Tk

    tk = _Tk(models.BPE(vocab=vocab, merges=merges, byte_fallback=False) if vocab else models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _read_json(path) -> dict:
    import json

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise TokenizerError(f"{path}: malformed JSON: {e}") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    return d if isinstance(d, dict) else {}


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None
