"""Text conditioning for latent diffusion, without a model hub.

Three pieces, each usable on its own:

- **Captions** (:class:`CaptionSet`): a list of captions per training example, keyed by the example's
  stable index. Built from class names (``"a photo of a {class}"``, several templates give several
  captions per example) or read from a user's JSON/CSV file.
- **A text model** (:class:`TextConditioner`): a tokenizer plus a text encoder, called the way
  diffusers' Stable Diffusion pipeline calls them::

      ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
      encoder_hidden_states = text_encoder(ids)[0]            # (B, L, D)

  so a user's own ``transformers.CLIPTokenizer`` + ``CLIPTextModel`` work unchanged. The built-in
  default (:func:`default_text_model`) downloads nothing: a word-level :class:`WordTokenizer` built from
  the captions and a small :class:`TinyTextEncoder` (token + position embeddings, a few pre-norm
  transformer layers) **randomly initialised from a fixed seed and frozen** — the latent UNet learns
  to read it through cross-attention, exactly as Stable Diffusion's UNet reads a frozen CLIP. Being
  frozen, one encoder serves every checkpoint of an ensemble, and the conditioning of a training
  example is the same for all of them.
- **Per-example conditioning** (:func:`caption_conditioning`): the ``encoder_hidden_states`` that
  featurization uses for a batch of training examples. With several captions per example:

  - ``"random"`` (**default**, journey-TRAK's issue setting): one caption drawn at random for each of
    the example's T (timestep, noise) pairs, a function of ``(seed, index)`` only; the tensors are
    ``(B, T, L, D)`` and featurization runs with ``cond_per_timestep=True``;
  - ``"mean"``: the mean of the encoder outputs over the example's captions, ``(B, L, D)``;
  - ``"first"``: always the first caption, ``(B, L, D)``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .errors import UserError

__all__ = ["CaptionSet", "CaptionError", "WordTokenizer", "TinyTextEncoder", "TextConditioner",
           "default_text_model", "caption_conditioning", "CAPTION_MODES", "DEFAULT_TEMPLATES"]

CAPTION_MODES = ("random", "mean", "first")
DEFAULT_TEMPLATES = ("a photo of a {}",)


class CaptionError(UserError, ValueError):
    """A user-fixable problem with captions (one line naming the fix)."""


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


class CaptionSet:
    """Captions of training examples: ``captions[stable index] -> [caption, ...]``."""

    def __init__(self, captions: Dict[int, Sequence[str]]):
        self.captions = {int(k): [str(c) for c in v] for k, v in captions.items()}
        empty = [k for k, v in self.captions.items() if not v]
        if empty:
            raise CaptionError(f"examples {empty[:5]} have no caption; give at least one caption per example")

    def __len__(self) -> int:
        return len(self.captions)

    def of(self, index: int) -> List[str]:
        """The captions of the example with stable index ``index``."""
        try:
            return self.captions[int(index)]
        except KeyError:
            raise CaptionError(f"no caption for example {int(index)}; add it to the captions file") from None

    def check_covers(self, indices: Iterable[int]) -> None:
        missing = [int(i) for i in indices if int(i) not in self.captions]
        if missing:
            raise CaptionError(f"{len(missing)} training examples have no caption (e.g. index {missing[0]}); "
                               "add them to the captions file")

    def all_texts(self) -> List[str]:
        return [c for v in self.captions.values() for c in v]

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(sorted(self.captions.items())).encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_class_names(cls, dataset, templates: Sequence[str] = DEFAULT_TEMPLATES) -> "CaptionSet":
        """One caption per template from each example's class name (``template.format(class name)``).

        With the default template this is ``dataset.caption(i)``."""
        if dataset.labels is None:
            raise CaptionError("the dataset has no labels to build captions from; pass a captions file")
        out = {}
        for pos in range(len(dataset)):
            name = dataset.class_name(pos)
            out[int(dataset.indices[pos])] = [t.format(name) for t in templates]
        return cls(out)

    @classmethod
    def from_file(cls, path: str) -> "CaptionSet":
        """Read captions from JSON or CSV.

        - JSON: ``{"<index>": ["caption", ...] or "caption", ...}``, or a list whose position is the
          index (each entry a caption or a list of captions).
        - CSV: rows ``index,caption`` (a header row ``index,caption`` is allowed); an index may appear
          on several rows, one per caption.
        """
        if not os.path.isfile(path):
            raise CaptionError(f"captions file {path} does not exist; check --captions")
        if path.lower().endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except ValueError as e:
                raise CaptionError(f"{path} is not valid JSON ({e}); fix the captions file") from None
            items = data.items() if isinstance(data, dict) else enumerate(data)
            out = {}
            for k, v in items:
                try:
                    idx = int(k)
                except (TypeError, ValueError):
                    raise CaptionError(f"{path}: key {k!r} is not an integer example index") from None
                out[idx] = [v] if isinstance(v, str) else list(v)
            return cls(out)
        if path.lower().endswith(".csv"):
            out: Dict[int, List[str]] = {}
            with open(path, newline="", encoding="utf-8") as f:
                for n, row in enumerate(csv.reader(f)):
                    if not row or (n == 0 and row[0].strip().lower() == "index"):
                        continue
                    if len(row) < 2:
                        raise CaptionError(f"{path} line {n + 1}: expected 'index,caption'")
                    try:
                        idx = int(row[0])
                    except ValueError:
                        raise CaptionError(f"{path} line {n + 1}: {row[0]!r} is not an integer example index") from None
                    out.setdefault(idx, []).append(",".join(row[1:]).strip())
            return cls(out)
        raise CaptionError(f"captions file {path} must end in .json or .csv")


# --------------------------------------------------------------------------------------------
# Built-in tokenizer and text encoder
# --------------------------------------------------------------------------------------------


class _Encoding(dict):
    """What a ``transformers`` tokenizer returns: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """A word-level tokenizer with the calling convention of ``transformers`` tokenizers.

    Lower-cases, splits into words and punctuation, and maps each to an id of a vocabulary built from
    the captions (unknown words map to ``<unk>``). Sequences are ``<bos> words... <eos> <pad>...``.
    """

    special = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, vocab: Sequence[str], model_max_length: int = 16):
        words = list(self.special) + [w for w in vocab if w not in self.special]
        self.vocab = {w: i for i, w in enumerate(words)}
        self.model_max_length = int(model_max_length)
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    @classmethod
    def from_texts(cls, texts: Iterable[str], model_max_length: Optional[int] = None) -> "WordTokenizer":
        words, longest = [], 0
        for t in texts:
            toks = cls.split(t)
            longest = max(longest, len(toks))
            words.extend(toks)
        vocab = sorted(set(words))
        return cls(vocab, model_max_length or longest + 2)

    @staticmethod
    def split(text: str) -> List[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        return [self.bos_token_id] + [self.vocab.get(w, self.unk_token_id) for w in self.split(text)] + [self.eos_token_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The words of ``ids`` joined by spaces (special tokens left out with ``skip_special_tokens``)."""
        words = sorted(self.vocab, key=self.vocab.get)
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id}
        return " ".join(words[int(i)] for i in ids if not (skip_special_tokens and int(i) in special)
                        and 0 <= int(i) < len(words))

    def __call__(self, text: Union[str, Sequence[str]], padding: Union[bool, str] = "max_length",
                 max_length: Optional[int] = None, truncation: bool = True, return_tensors: Optional[str] = "pt"):
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [self.encode(t) for t in texts]
        L = int(max_length or self.model_max_length)
        if truncation:
            seqs = [s[:L - 1] + [self.eos_token_id] if len(s) > L else s for s in seqs]
        width = L if padding == "max_length" else max(len(s) for s in seqs)
        ids = [s + [self.pad_token_id] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        if return_tensors == "pt":
            ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        return _Encoding(input_ids=ids, attention_mask=mask)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        words = sorted(self.vocab, key=self.vocab.get)
        with open(os.path.join(path, "word_tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump({"vocab": words, "model_max_length": self.model_max_length}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "WordTokenizer":
        with open(os.path.join(path, "word_tokenizer.json"), encoding="utf-8") as f:
            d = json.load(f)
        return cls(d["vocab"], d["model_max_length"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([sorted(self.vocab.items()), self.model_max_length]).encode()).hexdigest()[:16]


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """A small transformer text encoder: ``text_encoder(input_ids)[0]`` is ``(B, L, hidden_size)``.

    Token and position embeddings, ``num_layers`` pre-norm transformer layers and a final LayerNorm
    (the shape of CLIP's text model). ``save_pretrained``/``from_pretrained`` come from diffusers'
    ``ModelMixin``."""

    @register_to_config
    def __init__(self, vocab_size: int, max_length: int = 16, hidden_size: int = 32, num_layers: int = 1,
                 num_heads: int = 4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, 2 * hidden_size, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding.weight, std=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, return_dict: bool = False):
        L = input_ids.shape[1]
        if L > self.config.max_length:
            raise ValueError(f"got {L} tokens; this text encoder takes at most {self.config.max_length}")
        pos = torch.arange(L, device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(pos)[None]
        # Attend to every position (padding included), as CLIP's text model does by default: the output
        # depends only on the ids, and the empty prompt has a non-degenerate embedding.
        h = self.final_layer_norm(self.layers(h))
        return (h,)


def default_text_model(texts: Iterable[str], hidden_size: int = 32, num_layers: int = 1, num_heads: int = 4,
                       seed: int = 0, max_length: Optional[int] = None):
    """``(tokenizer, text_encoder)``: a :class:`WordTokenizer` over ``texts`` (plus the empty prompt) and a
    frozen :class:`TinyTextEncoder` initialised from ``seed``. Nothing is downloaded."""
    tok = WordTokenizer.from_texts(list(texts) + [""], model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = TinyTextEncoder(len(tok), tok.model_max_length, hidden_size, num_layers, num_heads)
    enc.requires_grad_(False).eval()
    return tok, enc


# --------------------------------------------------------------------------------------------
# Conditioner
# --------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer) -> str:
    if hasattr(tokenizer, "fingerprint"):
        return tokenizer.fingerprint()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return hashlib.sha256(json.dumps([sorted(vocab.items()), int(tokenizer.model_max_length),
                                      type(tokenizer).__name__]).encode()).hexdigest()[:16]


def seen_prompts(tokenizer, prompts: Sequence[str], max_length: Optional[int] = None, what: str = "prompt",
                 note: str = ""):
    """``(seen, cut)``: ``prompts`` as a text encoder sees them through ``tokenizer`` cut at ``max_length`` tokens
    (default its ``model_max_length``): a longer one is replaced by the text of the tokens kept (decoded), and
    ``cut`` counts them. The first one cut is reported in one warning line (``what``: what the texts are; ``note``:
    a clause after what the model sees)."""
    import logging

    limit, seen, cut = int(max_length or tokenizer.model_max_length), [], 0
    for p in prompts:
        n = len(tokenizer([p], padding=False, truncation=False, return_tensors=None).input_ids[0])
        if n <= limit:
            seen.append(p)
            continue
        kept = tokenizer([p], padding=False, truncation=True, max_length=limit, return_tensors=None).input_ids[0]
        text = tokenizer.decode(list(kept), skip_special_tokens=True).strip()
        if not cut:
            logging.getLogger("diffusion_trak").warning(
                f"warning: the {what} is {n} tokens, the text encoder takes {limit}: the model sees only "
                f"{text[:60]!r}{'...' if len(text) > 60 else ''}{note}; shorten it to use all of it")
        seen.append(text)
        cut += 1
    return seen, cut


class TextConditioner:
    """Prompts → ``encoder_hidden_states`` with any tokenizer + text encoder pair called the diffusers way.

    Embeddings are computed without gradients (the text encoder is frozen) and cached per prompt."""

    def __init__(self, tokenizer, text_encoder, device="cpu", max_length: Optional[int] = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.to(device).eval()
        self.device = torch.device(device)
        self.max_length = int(max_length or tokenizer.model_max_length)
        cfg = getattr(text_encoder, "config", None)
        self.use_attention_mask = bool(getattr(cfg, "use_attention_mask", False))
        self._cache: Dict[str, torch.Tensor] = {}
        self._warned = False

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """``(B, L, D)`` float32 on the CPU (``L`` = the tokenizer's ``model_max_length``)."""
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo and not self._warned:  # a text longer than the encoder takes: one line, once
            self._warned = seen_prompts(self.tokenizer, todo, self.max_length, "prompt or caption")[1] > 0
        if todo:
            enc = self.tokenizer(todo, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            # the ids go where the encoder is now: "cuda" may name another GPU by now (accelerate launch sets
            # each process's), and an encoder shared with another conditioner or Attributor may have moved
            weight = next(self.text_encoder.parameters(), None)
            dev = self.device if weight is None else weight.device
            mask = enc.attention_mask.to(dev) if self.use_attention_mask else None
            out = self.text_encoder(enc.input_ids.to(dev), attention_mask=mask)[0]
            for p, e in zip(todo, out.float().cpu()):
                self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])

    @property
    def hidden_size(self) -> int:
        return int(self.encode("").shape[-1])

    def fingerprint(self) -> str:
        from .featurize.featurizer import model_fingerprint

        return f"{_tokenizer_fingerprint(self.tokenizer)}-{model_fingerprint(self.text_encoder)}-{self.max_length}"


def caption_draws(seed: int, index: int, num_captions: int, T: int) -> torch.Tensor:
    """Which caption each of the T timesteps of example ``index`` uses (``"random"`` mode):
    a function of ``(seed, index)`` only."""
    from .featurize.featurizer import seed_for

    g = torch.Generator().manual_seed(seed_for(seed, index, 29))
    return torch.randint(0, num_captions, (T,), generator=g)


def caption_conditioning(text: TextConditioner, captions: CaptionSet, indices: Sequence[int], mode: str = "random",
                         num_timesteps: int = 1, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{"encoder_hidden_states": ...}`` for training examples with stable ``indices``.

    ``random``: ``(B, T, L, D)`` (use with ``cond_per_timestep=True``); ``mean``/``first``: ``(B, L, D)``."""
    if mode not in CAPTION_MODES:
        raise CaptionError(f"unknown caption mode {mode!r}; choose one of {', '.join(CAPTION_MODES)}")
    out = []
    for idx in indices:
        caps = captions.of(int(idx))
        if mode == "first":
            out.append(text.encode(caps[:1])[0])
        elif mode == "mean":
            out.append(text.encode(caps).mean(0))
        else:
            pick = caption_draws(seed, int(idx), len(caps), num_timesteps)
            out.append(text.encode([caps[int(j)] for j in pick]))
    return {"encoder_hidden_states": torch.stack(out)}
