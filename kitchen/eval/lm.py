"""lm-eval's model interface on Kitchen's sampling client, so one harness scores local and Tinker models.

``KitchenLM`` is an ``lm_eval`` ``TemplateLM`` (a subclass of ``LM``): lm-eval's own code turns
(context, continuation) text into token ids, and every score or generation then goes through the
client contract, ``compute_logprobs`` for ``loglikelihood`` / ``loglikelihood_rolling`` and ``sample``
for ``generate_until``. Each method submits all of its requests before awaiting any, which lets the
local engine batch them and Tinker run them concurrently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tinker import types

from kitchen.contract import SamplingClient

# lm-eval's default generation budget (``HFLM.max_gen_toks``) when a task names none.
DEFAULT_MAX_GEN_TOKS = 256
# A token with probability above one half is the argmax, so no greedy check is needed for it.
_SURELY_GREEDY = math.log(0.5)
# Generation settings the contract can honour; anything else is refused rather than ignored.
_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"})
_NO_OP_GEN_KWARGS = {"num_beams": 1}


class KitchenLM(TemplateLM):
    """lm-eval ``LM`` backed by a ``SamplingClient`` (local engine or Tinker).

    ``is_greedy`` (used by loglikelihood ``acc`` metrics such as LAMBADA's) is exact: a continuation
    whose every token has probability above 1/2 is greedy; otherwise a greedy ``sample`` of the same
    length decides. Tasks listed in ``skip_greedy_for`` never read it (Kitchen's held-out NLL task), so
    their requests skip that extra generation and report ``is_greedy=False``.
    """

    def __init__(
        self,
        client: SamplingClient,
        *,
        max_length: int | None = None,
        seed: int = 0,
        skip_greedy_for: Iterable[str] = (),
        label: str = "",
    ) -> None:
        super().__init__()
        self.client = client
        self.tokenizer = client.get_tokenizer()
        self._max_length = max_length or _tokenizer_window(self.tokenizer)
        self.seed = seed
        self.skip_greedy_for = frozenset(skip_greedy_for)
        self.label = label
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer names no EOS token; lm-eval needs one to end generations")
        self._special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)

    # -- what TemplateLM needs ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS if the tokenizer has one, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Tokens per scored sequence (prompt plus continuation); longer contexts are cut on the left."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Kitchen's prompts are rendered by the chat template, which writes any special tokens itself.
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected text")
        return text

    def continuation_length(self, context: str, continuation: str) -> int:
        """How many tokens lm-eval will score for ``continuation`` after ``context`` (its own split)."""
        return len(self._encode_pair(context, continuation)[1])

    # -- loglikelihood -----------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self._encode_request(*req.args) for req in requests]
        greedy = [req.task_name not in self.skip_greedy_for for req in requests]
        results = self._score(encoded, greedy)
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """lm-eval's token-level hook (used by its own helpers); always computes ``is_greedy``."""
        return self._score([(context, continuation) for _, context, continuation in requests], None)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of at most ``max_length`` tokens (as HFLM)."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, req in enumerate(requests):
            (text,) = req.args
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                # The client scores context + continuation, so a window holds at most max_length tokens.
                max_seq_len=self.max_length - 1,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        scores = self._score(windows, [False] * len(windows))
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``TemplateLM.loglikelihood``'s encoding: an empty context becomes the prefix token."""
        if context:
            context_enc, continuation_enc = self._encode_pair(context, continuation)
            return list(context_enc), list(continuation_enc)
        continuation_enc = self.tok_encode(continuation)
        if continuation_enc and continuation_enc[0] == self.prefix_token_id:
            return continuation_enc[:1], continuation_enc[1:]
        return [self.prefix_token_id], continuation_enc

    def _score(
        self, pairs: Sequence[tuple[list[int], list[int]]], need_greedy: Sequence[bool] | None
    ) -> list[tuple[float, bool]]:
        """Summed continuation logprobs and, where asked, whether greedy decoding yields the continuation."""
        sequences: list[list[int]] = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            if len(continuation) >= self.max_length:
                raise ValueError(
                    f"{len(continuation)} continuation tokens do not fit the {self.max_length}-token window"
                )
            sequences.append([*context, *continuation][-self.max_length :])
        inputs = [types.ModelInput.from_ints(seq) for seq in sequences]
        futures = [self.client.compute_logprobs(model_input) for model_input in inputs]
        logprobs: list[list[float]] = []
        for (_, continuation), future in zip(pairs, futures, strict=True):
            scored = future.result()[-len(continuation) :]
            if any(lp is None for lp in scored):
                raise ValueError("compute_logprobs returned None for a continuation token")
            logprobs.append([float(lp) for lp in scored if lp is not None])

        wanted = list(need_greedy) if need_greedy is not None else [True] * len(pairs)
        greedy = [
            w and all(lp > _SURELY_GREEDY for lp in lps) for w, lps in zip(wanted, logprobs, strict=True)
        ]
        pending = {
            i: (
                types.ModelInput.from_ints(seq[: -len(continuation)]),
                types.SamplingParams(max_tokens=len(continuation), temperature=0.0, stop=[], seed=self.seed),
            )
            for i, ((_, continuation), seq) in enumerate(zip(pairs, sequences, strict=True))
            if wanted[i] and not greedy[i]
        }
        checks = {
            i: self.client.sample(prompt, num_samples=1, sampling_params=p)
            for i, (prompt, p) in pending.items()
        }
        for i, check in checks.items():
            generated = list(check.result().sequences[0].tokens)
            greedy[i] = _matches_greedily(generated, pairs[i][1], self.eot_token_id)
        return [(math.fsum(lps), g) for lps, g in zip(logprobs, greedy, strict=True)]

    # -- generation --------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Sample every request (greedy unless the task asks ``do_sample``), cut at the first ``until``."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        prepared: list[tuple[types.ModelInput, types.SamplingParams, list[str]]] = []
        for req in requests:
            context, gen_kwargs = req.args
            params, until = self._sampling_params(dict(gen_kwargs), eos_text)
            max_tokens = params.max_tokens or DEFAULT_MAX_GEN_TOKS
            if max_tokens >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_tokens} leaves no room for a prompt in {self.max_length} tokens"
                )
            prompt = self.tok_encode(context)[-(self.max_length - max_tokens) :]
            prepared.append((types.ModelInput.from_ints(prompt), params, until))
        # Tokenise first, then submit in one tight loop, so the local engine sees them as one batch.
        futures = [
            self.client.sample(prompt, num_samples=1, sampling_params=params)
            for prompt, params, _ in prepared
        ]
        outputs = []
        for req, future, (_, _, until) in zip(requests, futures, prepared, strict=True):
            text = self._decode_until(list(future.result().sequences[0].tokens), until)
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs

    def _sampling_params(
        self, gen_kwargs: dict[str, Any], eos_text: str
    ) -> tuple[types.SamplingParams, list[str]]:
        unsupported = {
            k: v
            for k, v in gen_kwargs.items()
            if k not in _GEN_KWARGS and _NO_OP_GEN_KWARGS.get(k, object()) != v
        }
        if unsupported:
            raise ValueError(f"generation settings the sampling client cannot honour: {unsupported}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        # As HFLM: generation always ends at the end-of-sequence text too.
        stops = list(dict.fromkeys(s for s in [*until, eos_text] if s))
        do_sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if do_sample else 0.0
        params = types.SamplingParams(
            max_tokens=int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p", 1.0)) if do_sample else 1.0,
            top_k=int(gen_kwargs.get("top_k", -1)) if do_sample else -1,
            stop=stops,
            seed=self.seed,
        )
        return params, stops

    def _decode_until(self, tokens: list[int], until: Sequence[str]) -> str:
        """Text before the first special token (end of turn, or a new turn) and before any ``until``."""
        cut = next((i for i, t in enumerate(tokens) if t in self._special_ids), len(tokens))
        text = str(self.tokenizer.decode(tokens[:cut], skip_special_tokens=False))
        for stop in until:
            text = text.split(stop, 1)[0]
        return text


def _matches_greedily(generated: list[int], continuation: list[int], eos_id: int) -> bool:
    """Greedy decoding reproduced the continuation (a backend may stop early on EOS; that counts when
    the continuation's next token is that EOS)."""
    if generated[: len(continuation)] == continuation:
        return True
    n = len(generated)
    return n < len(continuation) and generated == continuation[:n] and continuation[n] == eos_id


def _tokenizer_window(tokenizer: Any) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise ValueError("the tokenizer states no usable model_max_length; pass KitchenLM(max_length=...)")
