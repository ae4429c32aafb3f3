"""The built-in engine: batched sampling on transformers with a KV cache, on CPU or GPU."""
from __future__ import annotations

import inspect
import threading
from typing import Iterable, Iterator

import torch
from transformers import DynamicCache

from services.common.models import load_causal_lm
from services.common.weight_sync import ParamMeta
from services.rollout.engine import Engine, EngineInfo, Generation, Sampling


class BuiltinEngine(Engine):
    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, max_num_seqs: int = 64,
                 seed: int = 0):
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.model = load_causal_lm(model_path, dtype=dtype, device=device, seed=seed).eval()
        self.config = self.model.config
        eos = self.config.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._params = dict(self.model.named_parameters())
        # transformers renamed past_key_values to cache (5.2x); older 5.x only knows the first
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()   # generation and commit never interleave
        self._staged: dict[str, torch.Tensor] = {}
        self._staged_version: int | None = None
        self._version = 0

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, n: int) -> Iterator[Generation]:
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}].prompt_ids is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompts[{i}].prompt_ids has token ids outside [0, {vocab})")
        work = [i for i in range(len(prompts)) for _ in range(n)]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed) if sampling.seed else generator.seed()
        for start in range(0, len(work), self.max_num_seqs):
            chunk = work[start: start + self.max_num_seqs]
            with self._lock:
                yield from self._generate_batch([prompts[i] for i in chunk], chunk, sampling, generator)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], index: list[int], s: Sampling,
                        generator: torch.Generator) -> list[Generation]:
        b, width = len(prompts), max(map(len, prompts))
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding keeps every row's next token at the end
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        stop = torch.tensor(sorted(set(self.eos_ids) | set(s.stop_token_ids)) or [-1], device=self.device)
        tokens, logprobs = [], []
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(b, dtype=torch.long, device=self.device)
        for _ in range(s.max_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float() / s.temperature, dim=-1)
            tok = self._sample(logp, s, generator)
            tokens.append(tok)
            logprobs.append(logp.gather(-1, tok[:, None])[:, 0])
            lengths += (~done).long()
            done |= torch.isin(tok, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kw: cache})
        toks = torch.stack(tokens, 1).cpu()
        lps = torch.stack(logprobs, 1).cpu()
        lengths, done = lengths.cpu(), done.cpu()
        return [Generation(prompt_index=index[r], response_ids=toks[r, : lengths[r]].tolist(),
                           logprobs=lps[r, : lengths[r]].tolist(),
                           finish_reason="stop" if done[r] else "length", policy_version=self._version)
                for r in range(b)]

    @staticmethod
    def _sample(logp: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
        """Samples from softmax(logits/T) restricted by top-k and top-p."""
        scores = logp
        if s.top_k > 0 and s.top_k < scores.shape[-1]:
            kth = torch.topk(scores, s.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = torch.softmax(sorted_scores, dim=-1)
            drop = probs.cumsum(-1) - probs > s.top_p   # keeps the smallest prefix reaching top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # ---- weights ------------------------------------------------------------------------------
    def stage_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # Staged tensors may alias the transport's receive buffer (valid until its next receive),
        # so whatever was staged before is void from here on, whether or not this succeeds.
        self.abort_weights()
        staged = {}
        for name, tensor in tensors:
            param = self._params.get(name)
            if param is None:
                raise ValueError(f"weight {name!r} is not a parameter of {self.model_path}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"weight {name!r}: shape {list(tensor.shape)} != {list(param.shape)}")
            staged[name] = tensor.to(device=self.device, dtype=param.dtype)   # no copy when they already match
        missing = set(self._params) - set(staged)
        if missing:
            raise ValueError(f"weight update for version {version} lacks {len(missing)} parameters, "
                             f"e.g. {sorted(missing)[:3]}")
        self._staged, self._staged_version = staged, version

    def commit_weights(self, version: int) -> int:
        if self._staged_version != version:
            raise ValueError(f"no staged weights for version {version} (staged: {self._staged_version})")
        with self._lock:
            for name, tensor in self._staged.items():
                self._params[name].data.copy_(tensor)
            self._version = version
            self._staged, self._staged_version = {}, None
        return self._version

    def abort_weights(self) -> None:
        self._staged, self._staged_version = {}, None

    @property
    def version(self) -> int:
        return self._version

    def info(self) -> EngineInfo:
        return EngineInfo(engine="builtin", model=self.model_path, device=str(self.device), dtype=str(self.dtype),
                          vocab_size=self.config.vocab_size, eos_token_id=self.eos_ids[0] if self.eos_ids else -1,
                          params=[ParamMeta(n, p.dtype, tuple(p.shape)) for n, p in self._params.items()])
