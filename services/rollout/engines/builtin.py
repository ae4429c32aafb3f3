"""The built-in engine: batched sampling on transformers with a fixed-shape KV cache, on CPU or GPU.

On a GPU each decode step (forward, sampling, bookkeeping) is captured once as a CUDA graph per
(rows, attended length, sampling shape) and replayed per token, which takes Python and kernel
launches out of the loop; on CPU, or with enforce_eager, the same step runs eagerly.
"""
from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from services.common.memory import StorageSwap, free_cached, owned
from services.common.models import load_causal_lm
from services.common.weight_sync import ParamMeta, gpu_uuids
from services.rollout.engine import WAKE_TAGS, Engine, EngineInfo, Generation, Sampling, prompt_seeds
from services.rollout.engines.static_kv import StaticKVCache, use_grouped_decode_attention

log = logging.getLogger("rollout")

KV_STEP = 128        # a graph attends over the cache in multiples of this many positions
GRAPH_CHECK = 8      # with graphs, look for finished rows every this many tokens (each look waits for the GPU)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _SampleNoise:
    """The exponential noise of one batch's samples, drawn so that a sample's noise is its own: each
    prompt has a generator seeded with its prompt seed that draws a row for each of its n samples
    per step, and sample j takes row j. What other prompts share the batch, the call or the replica,
    and where a batch boundary splits a prompt's samples, changes nothing (as vLLM's per-request
    generators do). One draw per prompt per step, then one gather into the slot rows."""

    def __init__(self, seeds: list[int], samples: list[tuple[int, int]], n: int, vocab: int, device: torch.device):
        prompts = sorted({i for i, _ in samples})
        at = {i: k for k, i in enumerate(prompts)}
        self.generators = [torch.Generator(device=device).manual_seed(seeds[i]) for i in prompts]
        self.rows = torch.empty(len(prompts), n, vocab, device=device)
        self.source = [at[i] * n + j for i, j in samples]   # batch sample -> row of self.rows
        self._gather: tuple[list[int], torch.Tensor] | None = None

    def draw(self, out: torch.Tensor, row_of: list[int]) -> None:
        """Fills out (slot rows) for the next step; row_of maps slot rows to batch samples (-1: padding)."""
        for rows, generator in zip(self.rows, self.generators):
            rows.exponential_(generator=generator)
        if self._gather is None or self._gather[0] is not row_of:   # the slots changed: a new map
            index = [self.source[k] if k >= 0 else 0 for k in row_of]
            self._gather = row_of, torch.tensor(index, device=out.device)
        torch.index_select(self.rows.view(-1, self.rows.shape[-1]), 0, self._gather[1], out=out)


@dataclass
class _Slots:
    """Everything a decode step reads or writes, allocated once for up to `capacity` rows and
    positions, so that captured graphs stay valid. Steps use the first `rows` rows."""
    cache: StaticKVCache
    tok: torch.Tensor          # [R] the last sampled token
    pos: torch.Tensor          # [R] its position id
    valid: torch.Tensor        # [R, L] cache positions a row attends to
    done: torch.Tensor         # [R] stopped (or a padding row)
    lengths: torch.Tensor      # [R] tokens generated up to and including the stop token
    noise: torch.Tensor        # [R, V] exponential noise for the next sample
    out_tok: torch.Tensor      # [R, L] sampled tokens, by step
    out_lp: torch.Tensor       # [R, L] their log-probabilities
    write_pos: torch.Tensor    # [1] cache position of the token the next step feeds
    col: torch.Tensor          # [1] step the next sample is recorded at
    temperature: torch.Tensor  # []
    top_p: torch.Tensor        # []
    is_stop: torch.Tensor      # [V]
    capacity: tuple[int, int]
    rows: int = 0

    @classmethod
    def allocate(cls, rows: int, length: int, vocab: int, device: torch.device) -> "_Slots":
        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(cache=StaticKVCache(rows, length), tok=z(rows), pos=z(rows), valid=z(rows, length, dtype=torch.bool),
                   done=z(rows, dtype=torch.bool), lengths=z(rows), noise=torch.ones(rows, vocab, device=device),
                   out_tok=z(rows, length), out_lp=z(rows, length, dtype=torch.float32), write_pos=z(1), col=z(1),
                   temperature=z(dtype=torch.float32), top_p=z(dtype=torch.float32),
                   is_stop=z(vocab, dtype=torch.bool), capacity=(rows, length))


class BuiltinEngine(Engine):
    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, max_num_seqs: int = 64,
                 seed: int = 0, enforce_eager: bool = False):
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.model = load_causal_lm(model_path, dtype=dtype, device=device, seed=seed).eval()
        use_grouped_decode_attention(self.model)
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
        # Fixed decode shapes (rows padded to a few sizes, attention over whole KV_STEP blocks) are
        # what CUDA graphs need; without graphs, exact shapes do less work. models.policy.enforce_eager
        # turns graphs off. Tests set fixed_shapes on CPU to check everything but the capture.
        self.fixed_shapes = device.type == "cuda" and not enforce_eager
        self._capture = device.type == "cuda"   # off after a capture fails
        self._slots: _Slots | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._mask_values = (torch.zeros((), dtype=dtype, device=device),
                             torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))
        self._swap: StorageSwap | None = None   # the weights' memory, released by sleep

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, n: int,
                 keys: Sequence[str] | None = None) -> Iterator[Generation]:
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}].prompt_ids is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompts[{i}].prompt_ids has token ids outside [0, {vocab})")
        self.check_serving()
        seeds = prompt_seeds(sampling.seed, len(prompts), keys)
        work = [(i, j) for i in range(len(prompts)) for j in range(n)]
        for start in range(0, len(work), self.max_num_seqs):
            chunk = work[start: start + self.max_num_seqs]
            noise = None if sampling.temperature == 0 else _SampleNoise(seeds, chunk, n, vocab, self.device)
            with self._lock:
                self.check_serving()   # a Sleep may have come between two batches
                yield from self._generate_batch([prompts[i] for i, _ in chunk], [i for i, _ in chunk], sampling,
                                                noise)

    def _generate_batch(self, prompts: list[list[int]], index: list[int], s: Sampling,
                        noise: _SampleNoise | None) -> list[Generation]:
        if self.device.type != "cuda":
            return self._decode_batch(prompts, index, s, noise)
        with torch.cuda.device(self.device):   # graphs capture and replay on the current device's streams
            return self._decode_batch(prompts, index, s, noise)

    @torch.no_grad()
    def _decode_batch(self, prompts: list[list[int]], index: list[int], s: Sampling,
                      noise: _SampleNoise | None) -> list[Generation]:
        width = max(map(len, prompts))
        st = self._prepare(prompts, width + s.max_tokens, s)
        top_k = s.top_k if 0 < s.top_k < self.config.vocab_size else 0
        top_p = s.top_p < 1.0
        row_of = list(range(len(prompts))) + [-1] * (st.rows - len(prompts))   # slot row -> prompt row; -1 padding
        results: dict[int, Generation] = {}
        check = GRAPH_CHECK if self.fixed_shapes else 1

        def draw():   # greedy (temperature 0): argmax, no noise (scores - log 1)
            st.noise[: st.rows].fill_(1.0) if noise is None else noise.draw(st.noise[: st.rows], row_of)

        draw()
        self._record(st, self._prefill(st, prompts, width), top_k, top_p)
        steps = 1
        while steps < s.max_tokens:
            if steps % check == 0:
                live = (~st.done[: st.rows]).nonzero()[:, 0]
                if len(live) == 0:
                    break
                row_of = self._drop_finished(st, live, row_of, steps, width + steps - 1, results, index)
            draw()
            self._step(st, width + steps - 1, top_k, top_p)
            steps += 1
        self._harvest(st, range(st.rows), row_of, steps, results, index)
        return [results[r] for r in range(len(prompts))]

    def _prepare(self, prompts: list[list[int]], length: int, s: Sampling) -> _Slots:
        """Slots for this batch (grown if needed, which drops the graphs), with per-batch state set."""
        rows = self._rows_for(len(prompts))
        st = self._slots
        if st is None or rows > st.capacity[0] or length > st.capacity[1]:
            cap_rows = max(rows, st.capacity[0] if st else 0)
            cap_len = _round_up(max(length, st.capacity[1] if st else 0), KV_STEP)
            self._slots = st = None
            self._graphs, self._pool = {}, None
            st = self._slots = _Slots.allocate(cap_rows, cap_len, self.config.vocab_size, self.device)
        st.rows = rows
        st.temperature.fill_(s.temperature or 1.0)   # greedy (0) reports logprobs of softmax(logits)
        st.top_p.fill_(s.top_p)
        st.is_stop.zero_()
        stop = [t for t in set(self.eos_ids) | set(s.stop_token_ids) if 0 <= t < self.config.vocab_size]
        if stop:
            st.is_stop[torch.tensor(stop, device=self.device)] = True
        st.done[:rows] = torch.arange(rows, device=self.device) >= len(prompts)   # padding rows count as done
        st.lengths.zero_()
        st.col.zero_()
        return st

    def _rows_for(self, n: int) -> int:
        """Rows to decode n sequences with: with fixed shapes, the next of 1, 2, 4, 8, 16, 24, ..."""
        if not self.fixed_shapes:
            return n
        return min(r for r in {1, 2, 4, self.max_num_seqs, *range(8, self.max_num_seqs, 8)} if r >= n)

    def _prefill(self, st: _Slots, prompts: list[list[int]], width: int) -> torch.Tensor:
        rows = st.rows
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((rows, width), dtype=torch.bool)
        for r, p in enumerate(prompts):  # left padding: every row's next token goes to the same position
            ids[r, width - len(p):] = torch.tensor(p)
            valid[r, width - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        st.valid[:rows].zero_()
        st.valid[:rows, :width] = valid
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        # each position also attends to itself, so padding stays finite (its keys are never attended)
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
        st.cache.rows, st.cache.kv_len = rows, width
        st.cache.write_pos = torch.arange(width, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: st.cache})
        st.pos[:rows] = valid.sum(-1)
        st.write_pos.fill_(width)
        return out.logits[:, -1]

    def _step(self, st: _Slots, write: int, top_k: int, top_p: bool) -> None:
        """One token for every row: the last one goes in at cache position `write`."""
        if not self.fixed_shapes:
            return self._decode(st, write + 1, top_k, top_p)
        key = (st.rows, min(_round_up(write + 1, KV_STEP), st.capacity[1]), top_k, top_p)
        if not self._capture:
            return self._decode(st, *key[1:])
        graph = self._graphs.get(key)
        if graph is not None:
            return graph.replay()
        # First time for this shape: run it eagerly (on a side stream, as capture wants, which also
        # warms up what capture cannot initialise), then capture it: capturing runs nothing.
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._decode(st, *key[1:])
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._decode(st, *key[1:])
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed, decoding eagerly from now on (models.policy.enforce_eager=True "
                        "skips the attempt): %s", exc)
            self._capture, self._graphs, self._pool = False, {}, None
            return
        self._graphs[key] = graph

    def _decode(self, st: _Slots, kv_len: int, top_k: int, top_p: bool) -> None:
        """The step a graph captures: feed the last tokens, sample the next. No host syncs, fixed shapes."""
        rows = st.rows
        st.valid[:rows].index_fill_(1, st.write_pos, True)
        mask = torch.where(st.valid[:rows, None, None, :kv_len], *self._mask_values)
        st.cache.rows, st.cache.kv_len, st.cache.write_pos = rows, kv_len, st.write_pos
        out = self.model(input_ids=st.tok[:rows, None], attention_mask=mask, position_ids=st.pos[:rows, None],
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: st.cache})
        st.pos[:rows] += 1
        st.write_pos += 1
        self._record(st, out.logits[:, -1], top_k, top_p)

    def _record(self, st: _Slots, logits: torch.Tensor, top_k: int, top_p: bool) -> None:
        rows = st.rows
        logp = torch.log_softmax(logits.float() / st.temperature, dim=-1)
        tok = self._sample(logp, st.noise[:rows], top_k, st.top_p if top_p else None)
        st.out_tok[:rows].index_copy_(1, st.col, tok[:, None])
        st.out_lp[:rows].index_copy_(1, st.col, logp.gather(-1, tok[:, None]))
        st.col += 1
        st.lengths[:rows] += (~st.done[:rows]).long()
        st.done[:rows] |= st.is_stop[tok]
        st.tok[:rows] = tok

    @staticmethod
    def _sample(logp: torch.Tensor, noise: torch.Tensor, top_k: int, top_p: torch.Tensor | None) -> torch.Tensor:
        """Samples from softmax(logp) restricted by top-k and top-p: argmax of p / noise with
        exponential noise picks token i with probability p_i (what torch.multinomial does for one
        sample), with the noise drawn outside so a graph needs no random state."""
        scores = logp
        if top_k:
            kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = torch.softmax(sorted_scores, dim=-1)
            drop = probs.cumsum(-1) - probs > top_p   # keeps the smallest prefix reaching top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        return (scores - noise.clamp(min=torch.finfo(noise.dtype).tiny).log()).argmax(-1)

    def _drop_finished(self, st: _Slots, live: torch.Tensor, row_of: list[int], steps: int, written: int,
                       results: dict[int, Generation], index: list[int]) -> list[int]:
        """Moves the live rows to the front and decodes fewer rows from here on, once that saves
        enough (with fixed shapes: once they fit fewer rows). Returns the new slot -> prompt row map."""
        n = len(live)
        rows = self._rows_for(n)
        if rows >= st.rows or (not self.fixed_shapes and n > st.rows * 3 // 4):
            return row_of
        live_set = set(live.tolist())
        self._harvest(st, [r for r in range(st.rows) if r not in live_set], row_of, steps, results, index)
        # padding up to `rows` repeats a finished row; it stays done and is never harvested
        finished = next((r for r in range(st.rows) if r not in live_set), 0)
        keep = torch.cat([live, live.new_full((rows - n,), finished)])
        for t in (st.tok, st.pos, st.done, st.lengths):
            t[:rows] = t[: st.rows].index_select(0, keep)
        st.valid[:rows, :written] = st.valid[: st.rows, :written].index_select(0, keep)
        for t in (st.out_tok, st.out_lp):
            t[:rows, :steps] = t[: st.rows, :steps].index_select(0, keep)
        st.cache.rows, st.cache.kv_len = st.rows, written
        st.cache.keep_rows(keep)
        new_row_of = [row_of[r] for r in live.tolist()] + [-1] * (rows - n)
        st.rows = rows
        return new_row_of

    def _harvest(self, st: _Slots, slot_rows, row_of: list[int], steps: int, results: dict[int, Generation],
                 index: list[int]) -> None:
        slot_rows = [r for r in slot_rows if row_of[r] >= 0 and row_of[r] not in results]
        if not slot_rows:
            return
        sel = torch.tensor(slot_rows, device=self.device)
        toks = st.out_tok[:, :steps].index_select(0, sel).cpu()
        lps = st.out_lp[:, :steps].index_select(0, sel).cpu()
        lengths, done = st.lengths.index_select(0, sel).cpu(), st.done.index_select(0, sel).cpu()
        for k, r in enumerate(slot_rows):
            row = row_of[r]
            results[row] = Generation(prompt_index=index[row], response_ids=toks[k, : lengths[k]].tolist(),
                                      logprobs=lps[k, : lengths[k]].tolist(),
                                      finish_reason="stop" if done[k] else "length", policy_version=self._version)

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
        with self._lock:
            self.check_awake("CommitWeights")
            if self._staged_version != version:
                raise ValueError(f"no staged weights for version {version} (staged: {self._staged_version})")
            # in place: captured CUDA graphs read the parameters' storage, so they see the new weights
            for name, tensor in self._staged.items():
                self._params[name].data.copy_(tensor)
            self._version, self.weights_valid = version, True
            self._staged, self._staged_version = {}, None
        return self._version

    def abort_weights(self) -> None:
        self._staged, self._staged_version = {}, None

    # ---- memory -------------------------------------------------------------------------------
    # Sleep drops the KV cache and the CUDA graphs rather than keeping them: graphs address the cache and
    # the weights, whose memory is released, so they are captured again at the next Generate
    # (bench/gpu_colocated.py measures what that costs against the memory it frees).
    def sleep(self, level: int) -> None:
        with self._lock:   # never under a decode batch or a commit
            if level <= self.sleep_level:
                return
            self.abort_weights()   # staged tensors alias the transport's buffers, released here
            if self._transport is not None:
                self._transport.release()
            self._slots, self._graphs, self._pool = None, {}, None
            if self._swap is None:
                owned(self._params.values())
                self._swap = StorageSwap(self._params.values(), self.device)
            if level == 2:
                self._swap.release(keep=False)
                self.weights_valid = False
            elif self.device.type == "cuda":   # level 1 keeps the weights in host memory (on the CPU they are)
                self._swap.release(keep=True)
            self.sleep_level, self.asleep = level, frozenset(WAKE_TAGS)
            free_cached(self.device)

    def wake_up(self, tags: Sequence[str] = ()) -> None:
        with self._lock:
            woken = self._woken(tags)
            if "weights" in woken and self._swap is not None:
                self._swap.restore()
            self._after_wake(woken)   # the KV cache (and graphs) come back at the next Generate

    @property
    def version(self) -> int:
        return self._version

    def info(self) -> EngineInfo:
        return EngineInfo(engine="builtin", model=self.model_path, device=str(self.device), dtype=str(self.dtype),
                          vocab_size=self.config.vocab_size, eos_token_id=self.eos_ids[0] if self.eos_ids else -1,
                          params=[ParamMeta(n, p.dtype, tuple(p.shape)) for n, p in self._params.items()],
                          gpu_uuids=gpu_uuids(self.device),
                          context_length=getattr(self.config, "max_position_embeddings", 0) or 0)
