"""lm-evaluation-harness model `seekformer`: loglikelihood, loglikelihood_rolling and generate_until.

lm-eval (0.4.x) finds models only in its own registry and has no plugin entry point. Installing seekformer
puts `seekformer_lm_eval.pth` in site-packages, which adds a lazy `seekformer` entry to that registry
whenever lm-eval loads its models (src/_seekformer_lm_eval.py; SEEKFORMER_NO_LM_EVAL_HOOK=1 turns it
off). Importing this module registers it too. Ways to run it:

    lm_eval --model seekformer --model_args pretrained=DIR --tasks hellaswag
    seekformer lm-eval --model seekformer --model_args pretrained=DIR --tasks hellaswag
    python -m seekformer.evaluation.lm_eval_adapter --model seekformer --model_args pretrained=DIR --tasks ...
    lm_eval.simple_evaluate(model="seekformer", ...)

(the command lines are lm-eval's own with every option it has: --include_path, --limit,
--output_path, ...). Without seekformer in the loop, lm-eval can also evaluate a checkpoint as a plain
Hugging Face model (`--model hf --model_args pretrained=DIR`: the directory is a transformers
DeepseekV3 checkpoint) or through `seekformer serve` (`--model local-completions --model_args
model=NAME,base_url=http://127.0.0.1:8000/v1/completions`; the server's /tokenize endpoints stand in
for the tokenizer).

model_args: pretrained (model directory, required), device (cpu), dtype (float32 | bfloat16),
batch_size (sequences per forward, 8), max_length (default: the model context), max_gen_toks (256),
add_bos_token (False; the scoring prefix is the BOS token, as lm-eval's `hf` model uses for this
tokenizer).
"""

from __future__ import annotations

import sys
from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..inference.generate import generate
from ..inference.scoring import loglikelihood as _loglikelihood

MODEL_NAME = "seekformer"
MODEL_TARGET = "seekformer.evaluation.lm_eval_adapter:SeekformerLM"


def register() -> None:
    """Make `--model seekformer` known to lm-eval (idempotent; done on import). A lazy "module:Class"
    entry, so running this file as __main__ still resolves to the one importable class."""
    model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class SeekformerLM(TemplateLM):
    """A seekformer model directory as an lm-eval language model."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 **kwargs) -> None:
        super().__init__()
        import torch

        from ..models.causal_lm import SeekForCausalLM
        from ..tokenizer import SeekTokenizer

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's default is cuda:0; like its `hf` model, run where we can
        dtypes = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
        self.model = SeekForCausalLM.from_pretrained(pretrained, device=device, dtype=dtypes[dtype]).eval()
        self.tok = SeekTokenizer.load(pretrained)
        self.path = str(pretrained)
        self._device = device
        ctx = self.model.config.max_position_embeddings
        self._max_length = min(int(max_length), ctx) if max_length else ctx
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("1", "true", "yes") if isinstance(add_bos_token, str) \
            else bool(add_bos_token)

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens and self.add_bos_token)
        return self.tok.encode(string, add_bos=add)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) | None, context_ids, continuation_ids)]."""
        from tqdm import tqdm

        results: list[tuple[float, bool]] = []
        chunk = 256
        with tqdm(total=len(requests), desc="seekformer loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(requests), chunk):
                part = requests[start:start + chunk]
                results += _loglikelihood(self.model, [(ctx, cont) for _, ctx, cont in part], self.batch_size)
                bar.update(len(part))
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: disjoint windows of `max_length` tokens, each scored once."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, _loglikelihood(self.model, windows, self.batch_size)):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context until a stop string, EOS or `max_gen_toks`; batches share generation kwargs."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for n, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(n)
        eos = self.tok.decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", kwargs.pop("max_tokens", None))
                              or self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            options = {"do_sample": do_sample and temperature > 0, "temperature": temperature or 1.0}
            for k in ("top_p", "top_k", "seed", "repetition_penalty"):
                if k in kwargs:
                    options[k] = kwargs[k]
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(f"max_gen_toks ({max_new}) must be below the model context ({self.max_length})")
            stops = [s for s in until if s and s != eos]
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[n].args[0])[-keep:] or [self.prefix_token_id] for n in batch]
                res = generate(self.model, prompts, tokenizer=self.tok, return_dict=True, max_new_tokens=max_new,
                               stop=stops or None, **options)
                for n, text in zip(batch, res.texts):
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out  # type: ignore[return-value]


register()


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line with the `seekformer` model registered (argv: lm-eval's arguments)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":  # python -m seekformer.evaluation.lm_eval_adapter --model seekformer ...
    main()
