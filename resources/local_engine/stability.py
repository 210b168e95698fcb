"""What samplers made with ``record_stability_info=True`` record, and how ``stable_reinforce`` reads it.

On Tinker such a sampler records information about every sequence it returns, named by the sequence's
``sequence_id``, and a ``stable_reinforce`` datum names the sequences behind its tokens (its provenance,
``Datum.with_provenance``). The local engine records each sequence's sampled tokens and logprobs, per
service client (Tinker's "session"), and checks a datum's provenance against them the way the service
would, so a program that forgets ``record_stability_info`` or miscounts its spans fails here, offline,
with one clear line, instead of on the service.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tinker import types

#: Sequences kept per service client; the oldest unused are forgotten first (Tinker keeps them a day).
DEFAULT_CAPACITY = 200_000


@dataclass(frozen=True)
class RecordedSequence:
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


class SequenceRecord:
    """Recorded sequences by ``sequence_id``, least recently used forgotten first, thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._sequences: OrderedDict[str, RecordedSequence] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, sequence_id: str, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        with self._lock:
            self._sequences[sequence_id] = RecordedSequence(tuple(tokens), tuple(logprobs))
            self._sequences.move_to_end(sequence_id)
            while len(self._sequences) > self._capacity:
                self._sequences.popitem(last=False)

    def get(self, sequence_id: str) -> RecordedSequence | None:
        """The sequence, its lifetime restarted (as a training request restarts Tinker's day)."""
        with self._lock:
            found = self._sequences.get(sequence_id)
            if found is not None:
                self._sequences.move_to_end(sequence_id)
            return found

    def __len__(self) -> int:
        return len(self._sequences)


_HOW = "sample with record_stability_info=True and attach Datum.with_provenance(...)"


def recorded_sampling_logprobs(
    where: str, datum: types.Datum, targets: torch.Tensor, logprobs: torch.Tensor, record: SequenceRecord
) -> torch.Tensor:
    """``logprobs`` with the positions a ``SampledProvenanceSpan`` covers replaced by what the sampler
    recorded for them, after checking every span names a recorded sequence and the sampled tokens match
    the datum's targets. ``ValueError`` names the datum and what is wrong."""
    spans = datum.loss_fn_input_spans
    if spans is None:
        raise ValueError(f"{where}: loss 'stable_reinforce' needs provenance on every datum; {_HOW}")
    sampling = logprobs.clone()
    position = 0
    for span in spans:
        recorded = record.get(span.sequence_id)
        if recorded is None:
            raise ValueError(
                f"{where}: sequence {span.sequence_id!r} was not sampled by a sampling client with "
                "record_stability_info=True on this service client; " + _HOW
            )
        end = position + span.length
        if end > targets.shape[0]:
            raise ValueError(f"{where}: provenance spans cover more positions than target_tokens has")
        if isinstance(span, types.SampledProvenanceSpan):
            stop = span.offset + span.length
            if stop > len(recorded.tokens):
                raise ValueError(
                    f"{where}: span [{span.offset}, {stop}) is past the {len(recorded.tokens)} tokens "
                    f"sampled in sequence {span.sequence_id!r}"
                )
            if [int(t) for t in targets[position:end]] != list(recorded.tokens[span.offset : stop]):
                raise ValueError(
                    f"{where}: target_tokens at positions [{position}, {end}) are not the tokens sampled in "
                    f"sequence {span.sequence_id!r} at [{span.offset}, {stop})"
                )
            sampling[position:end] = torch.tensor(recorded.logprobs[span.offset : stop], dtype=sampling.dtype)
        position = end
    if position != targets.shape[0]:
        raise ValueError(
            f"{where}: provenance spans cover {position} positions but target_tokens has {targets.shape[0]}"
        )
    return sampling
