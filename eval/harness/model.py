"""`armt`: an lm_eval model that streams every request through ARMT's segment cache.

Nothing is ever cut into windows that restart memory: a request of any length is read chunk by chunk through one
`ARMTCache` per batch, and logits are built only where a score needs them (the continuation in `loglikelihood`,
every token in `loglikelihood_rolling`, one chunk at a time, summed and discarded). Memory stays flat in the length.

Prompts may hold PIECE_BREAK ("\\x1e"): the pieces between breaks are tokenized separately and concatenated, which
is how BABILong's raw prompt (context, question, "GEN") reaches fine-tuned memory models (see eval/prompts.py).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm.auto import tqdm

from ..common import (
    EvalError,
    encode_long,
    load_model,
    load_tokenizer,
    pick_dtype,
    prefill_cache,
    resolve_model,
    segment_aligned_batch,
)
from . import PIECE_BREAK

logger = logging.getLogger(__name__)

MAX_LENGTH = sys.maxsize  # ARMT reads inputs of any length: no request is ever truncated or windowed
PREFILL_BAR_TOKENS = 4096  # prompts at least this long get a prefill progress bar


class ARMTLM(TemplateLM):
    """lm_eval model for ARMT folders (`--model armt --model_args pretrained=FOLDER[,tokenizer=...,dtype=...,
    chunk_size=...,max_gen_toks=...,threads=...]`)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # passed by lm_eval for "auto" batch sizes, which armt does not use
        device: str | None = None,
        dtype: str = "auto",
        chunk_size: int | None = None,
        max_gen_toks: int = 256,
        threads: int | None = None,
    ):
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise EvalError(f"batch_size={batch_size!r}: the armt model takes a whole number (no 'auto').") from None
        if self.batch_size < 1 or max_gen_toks < 1 or (chunk_size is not None and chunk_size < 1):
            raise EvalError("batch_size, max_gen_toks and chunk_size must be >= 1.")
        if threads:
            torch.set_num_threads(int(threads))
        self._device = pick_device_or_cpu(device)
        path = resolve_model(str(pretrained), offline=False)
        self.model = load_model(path, self._device, pick_dtype(dtype, self._device))
        if not hasattr(self.model, "new_cache"):
            raise EvalError(f"{path} is not an ARMT model (it has no new_cache()); use lm_eval's `hf` model for it.")
        self.tokenizer = load_tokenizer(tokenizer, path)
        self.pretrained = path
        self.chunk_size = int(chunk_size or self.model.config.segment_size)
        self._max_gen_toks = int(max_gen_toks)
        self.max_length = MAX_LENGTH
        self.pad_token_id = self.tokenizer.pad_token_id  # load_tokenizer falls back to EOS

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling document are conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.encode(string, add_special_tokens is not False).tolist()

    def encode(self, string: str, special_prefix: bool = True) -> np.ndarray:
        """Token ids: the tokenizer's special prefix (BOS for tokenizers that add one, as `tokenizer("")` gives),
        then each PIECE_BREAK-separated piece tokenized on its own; text of any size is tokenized in chunks."""
        prefix = self.tokenizer("", add_special_tokens=True)["input_ids"] if special_prefix else []
        pieces = [encode_long(self.tokenizer, piece) for piece in string.split(PIECE_BREAK) if piece]
        return np.concatenate([np.asarray(prefix, dtype=np.int64), *pieces])

    # -----------------------------------------------------------------------------------------------------------
    # Scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            whole = np.asarray([*context, *continuation], dtype=np.int64)
            rows.append((whole[:-1], whole[len(whole) - len(continuation) :]))
        results = self._score(rows, disable_tqdm)
        for (pair, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document given the prefix token, read in one stream (no windows)."""
        rows = []
        for request in requests:
            tokens = self.encode(request.args[0], special_prefix=False)
            rows.append((np.concatenate([[self.prefix_token_id], tokens[:-1]]).astype(np.int64), tokens))
        results = [logprob for logprob, _ in self._score(rows, disable_tqdm, greedy=False)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def _score(self, rows: list[tuple[np.ndarray, np.ndarray]], disable_tqdm: bool,
               greedy: bool = True) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of each row's targets, which the last len(targets) inputs predict
        (without `greedy`, the second item is always True). Rows are batched longest first, so padding stays small."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        with tqdm(total=sum(len(inputs) for inputs, _ in rows), desc="armt scoring", unit="tok", unit_scale=True,
                  disable=disable_tqdm) as progress:
            for first in range(0, len(order), self.batch_size):
                batch = [i for i in order[first : first + self.batch_size] if len(rows[i][1])]
                for i, result in zip(batch, self._score_batch([rows[i] for i in batch], progress, greedy)):
                    results[i] = result
        return results

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[np.ndarray, np.ndarray]], progress: tqdm,
                     greedy: bool) -> list[tuple[float, bool]]:
        """Stream one batch (laid out by `segment_aligned_batch`: one backbone call per segment) through a fresh
        cache, chunk by chunk, keeping only the logits of the scored (row, column) pairs: (log-prob, greedy) per
        row."""
        if not rows:
            return []
        input_ids, attention_mask = segment_aligned_batch(
            [torch.from_numpy(inputs) for inputs, _ in rows], self.model.config.segment_size, self.pad_token_id)
        # each row's inputs sit at its real columns, in order; the last len(targets) of them are scored
        targets = torch.full(input_ids.shape, -1, dtype=torch.long)
        for row, (_, target) in enumerate(rows):
            columns = attention_mask[row].nonzero().squeeze(1)
            targets[row, columns[len(columns) - len(target) :]] = torch.from_numpy(target)
        scored = targets >= 0
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        cache = self.model.new_cache(len(rows))
        logprob = torch.zeros(len(rows), dtype=torch.float64)
        is_greedy = torch.ones(len(rows), dtype=torch.bool)
        for start in range(0, input_ids.shape[1], self.chunk_size):
            end = min(input_ids.shape[1], start + self.chunk_size)
            keep = scored[:, start:end]
            out = self.model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], cache=cache,
                             logits_to_keep=keep.to(self._device))
            progress.update(int(attention_mask[:, start:end].sum()))
            if not keep.any():
                continue
            row_of = keep.nonzero()[:, 0]  # the pairs' rows, in the row-major order of the logits
            wanted = targets[:, start:end][keep]
            logp = out.logits.float().log_softmax(-1)  # (pairs, V): one chunk at most
            picked = logp.gather(-1, wanted.unsqueeze(-1).to(logp.device)).squeeze(-1).cpu()
            logprob.index_add_(0, row_of, picked.double())
            if greedy:
                missed = (logp.argmax(-1).cpu() != wanted).long()
                is_greedy &= torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, missed) == 0
        return list(zip(logprob.tolist(), is_greedy.tolist()))

    # -----------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context with the model's generate(), after streaming all but its last token through the
        cache with a progress bar; stop sequences (and EOS) end a row and are cut from its text."""
        results = []
        collator = Collator([request.args for request in requests], sort_fn=lambda args: (-len(args[0]), args[0]),
                            group_by="gen_kwargs", group_fn=lambda args: args[1])
        eos = self.tokenizer.decode([self.eot_token_id])
        with tqdm(total=len(requests), desc="armt generate_until", disable=disable_tqdm) as bar:
            for batch in collator.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*batch)
                kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new_tokens = kwargs.pop("max_gen_toks")
                if not kwargs.get("do_sample"):
                    kwargs.pop("temperature", None)
                for context, text in zip(contexts, self._generate(list(contexts), until, max_new_tokens, kwargs,
                                                                  disable_tqdm)):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                    bar.update(1)
        return collator.get_original(results)

    def _generate(self, contexts: list[str], until: list[str], max_new_tokens: int, kwargs: dict,
                  disable_tqdm: bool) -> list[str]:
        encoded = [torch.tensor(self.encode(context).tolist() or [self.prefix_token_id]) for context in contexts]
        # every row's segment boundaries on the same columns: one backbone call per segment, not per row and segment
        input_ids, attention_mask = segment_aligned_batch(encoded, self.model.config.segment_size, self.pad_token_id)
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        width = input_ids.shape[1]
        show = not disable_tqdm and width >= PREFILL_BAR_TOKENS
        cache = prefill_cache(self.model, input_ids, attention_mask, self.chunk_size, "armt prefill" if show else None)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=max_new_tokens,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, until, width, len(contexts)),
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eot_token_id,
            **{"do_sample": False, **kwargs},
        )
        texts = []
        for tokens in output[:, width:].tolist():
            if self.eot_token_id in tokens:
                tokens = tokens[: tokens.index(self.eot_token_id)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            texts.append(postprocess_generated_text(text, until, None))
        return texts


def pick_device_or_cpu(device: str | None) -> torch.device:
    """lm_eval's CLI passes device="cuda:0" by default: fall back to the CPU (with a warning) where CUDA is absent."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device=%s but this machine has no CUDA device: running on the CPU.", device)
        return torch.device("cpu")
    return chosen
