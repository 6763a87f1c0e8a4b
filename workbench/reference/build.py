"""`workbench build-reference`: train the tokenizer and the `tiny` Llama model from the stdlib docs."""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workbench.events import OnEvent, StageEvent, TrainEvent, never_stop, no_event
from workbench.measure.accuracy import evaluate, make_windows, unigram_perplexity
from workbench.options import check_fields, option
from workbench.reference.corpus import EOS, join_documents, load_corpus
from workbench.textio import CALIBRATION_FILE, HELDOUT_FILE, write_gz

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the reference model is built; every number here is part of its recipe."""

    vocab_size: int = option(4096, "Byte-level BPE vocabulary size.", minimum=260, maximum=65536)
    hidden_size: int = option(256, "Model width.", minimum=16)
    num_layers: int = option(6, "Transformer blocks.", minimum=1)
    num_heads: int = option(8, "Attention heads (no grouped KV: one KV head per query head).", minimum=1)
    intermediate_size: int = option(768, "SwiGLU MLP width.", minimum=16)
    max_position_embeddings: int = option(1024, "Longest context the RoPE tables cover.", minimum=16)
    seq_len: int = option(256, "Training window in tokens.", minimum=8)
    batch_size: int = option(16, "Windows per step.", minimum=1)
    steps: int = option(1600, "Optimizer steps.", minimum=1)
    lr: float = option(2e-3, "Peak AdamW learning rate.", minimum=0.0)
    min_lr_ratio: float = option(0.1, "Cosine decay ends at lr * this.", minimum=0.0, maximum=1.0)
    warmup_steps: int = option(100, "Linear warm-up steps.", minimum=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).", minimum=0.0)
    heldout_percent: int = option(5, "Share of documents held out (by a hash of their id).",
                                  minimum=1, maximum=50)
    eval_every: int = option(200, "Steps between held-out checks (logging only).", minimum=1)
    seed: int = option(0, "Seed for initialisation and batch sampling.", minimum=0)
    save_dtype: str = option("fp16", "Dtype of the shipped safetensors.", choices=("fp16", "fp32"))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")


def train_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained with `tokenizers`, wrapped for `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1024, clean_up_tokenization_spaces=False)


def make_model(recipe: Recipe, eos_id: int):  # -> LlamaForCausalLM
    """A freshly initialised Llama of the recipe's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
                         intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
                         num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
                         max_position_embeddings=recipe.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, rms_norm_eps=1e-5)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_at(step: int, recipe: Recipe) -> float:
    """The recipe's learning rate at `step`."""
    return lr_at(step, recipe.steps, recipe.lr, recipe.warmup_steps, recipe.min_lr_ratio)


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of seq_len + 1 tokens from a 1-D token stream: (B, T+1)."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases), betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train(model: torch.nn.Module, train_ids: torch.Tensor, heldout_ids: list[int], recipe: Recipe,
          on_event: OnEvent = no_event, should_stop=never_stop) -> list[dict]:
    """Train on random windows of the token stream; returns the logged curve."""
    opt = adamw(model, recipe.lr, recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    probe = make_windows(heldout_ids, recipe.seq_len, 8192)
    curve, t0, tokens = [], time.perf_counter(), 0
    for step in range(recipe.steps):
        batch = sample_batch(train_ids, recipe.batch_size, recipe.seq_len, gen)  # (B, T+1)
        lr = _lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[:, :-1].numel()
        held = None
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            model.eval()
            held = math.log(evaluate(model, probe, torch.device("cpu")).perplexity)
        event = TrainEvent(step + 1, recipe.steps, loss.item(), held, tokens / (time.perf_counter() - t0), lr)
        on_event(event)
        if held is not None:
            logger.info("step %d/%d loss %.3f held-out %.3f (%.0f tok/s)", step + 1, recipe.steps,
                        event.loss, held, event.tokens_per_s)
            curve.append(asdict(event))
        if should_stop():
            break
    model.eval()
    return curve


def _tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a long text (no special tokens added)."""
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _model_card(report: dict) -> str:
    """The README that ships beside the weights."""
    r, m = report["recipe"], report["metrics"]
    return f"""# `tiny`: the workbench's reference model

A {m['params'] / 1e6:.2f} M-parameter Llama ({r['num_layers']} layers, hidden {r['hidden_size']},
{r['num_heads']} heads, SwiGLU MLP {r['intermediate_size']}, tied embeddings) with a
{r['vocab_size']}-token byte-level BPE tokenizer, trained from scratch by `workbench build-reference`
on the Python {report['python']} standard library's documentation (`pydoc_data.topics` and the
docstrings of its modules), {report['corpus']['train_tokens']} training tokens. Weights stored as
{r['save_dtype']}.

| held-out ({report['corpus']['heldout_tokens']} tokens, windows of {r['seq_len']}) | value |
| --- | --- |
| perplexity | {m['heldout_perplexity']:.2f} |
| unigram perplexity (add-one, fitted on train) | {m['unigram_perplexity']:.2f} |
| next-token accuracy | {m['heldout_next_token_accuracy']:.3f} |

Greedy continuation of `{report['sample']['prompt']}`:

> {report['sample']['text']!s}

Training: {r['steps']} AdamW steps of {r['batch_size']} x {r['seq_len']} tokens, peak lr {r['lr']},
{report["train_seconds"]:.0f} s wall time on {report["machine"]}. `recipe.json` holds every setting and the
held-out curve; `heldout.txt.gz` is the held-out split, `calibration.txt.gz` a slice of the training split.
"""


def build_reference(out_dir: Path, recipe: Recipe = Recipe(), on_event: OnEvent = no_event,
                    should_stop=never_stop) -> dict:
    """Build the reference model into `out_dir` and return its report (also written as recipe.json)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_event(StageEvent("corpus", "start", "extracting the standard library's documentation"))
    train_docs, heldout_docs = load_corpus(recipe.heldout_percent)
    train_text, heldout_text = join_documents(train_docs), join_documents(heldout_docs)
    on_event(StageEvent("tokenizer", "start", f"training a {recipe.vocab_size}-token byte-level BPE"))
    tokenizer = train_tokenizer([d.text for d in train_docs], recipe.vocab_size)
    train_ids, heldout_ids = _tokenize(tokenizer, train_text), _tokenize(tokenizer, heldout_text)
    model = make_model(recipe, tokenizer.eos_token_id)
    params = sum(p.numel() for p in model.parameters())
    on_event(StageEvent("train", "start", f"{params / 1e6:.2f} M parameters, {len(train_ids)} tokens"))
    t0 = time.perf_counter()
    curve = train(model, torch.tensor(train_ids), heldout_ids, recipe, on_event, should_stop)
    train_seconds = time.perf_counter() - t0
    save_dtype = {"fp16": torch.float16, "fp32": torch.float32}[recipe.save_dtype]
    model.to(save_dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_gz(out_dir / HELDOUT_FILE, heldout_text)
    write_gz(out_dir / CALIBRATION_FILE, train_text[:65536])
    on_event(StageEvent("evaluate", "start", "scoring the held-out split"))
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    acc = evaluate(reloaded, make_windows(heldout_ids, recipe.seq_len, len(heldout_ids)), torch.device("cpu"))
    prompt = "The for statement is used to"
    ids = tokenizer(prompt, return_tensors="pt")
    out = reloaded.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    report = {
        "recipe": asdict(recipe), "python": platform.python_version(), "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "train_seconds": train_seconds, "curve": curve,
        "corpus": {"train_docs": len(train_docs), "heldout_docs": len(heldout_docs),
                   "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids)},
        "metrics": {"params": params, "heldout_perplexity": acc.perplexity,
                    "heldout_next_token_accuracy": acc.next_token_accuracy,
                    "heldout_scored_tokens": acc.eval_tokens,
                    "unigram_perplexity": unigram_perplexity(train_ids, heldout_ids, recipe.vocab_size),
                    "definition": acc.definition},
        "sample": {"prompt": prompt, "text": tokenizer.decode(out[0, ids["input_ids"].shape[1]:])},
    }
    (out_dir / "recipe.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out_dir / "README.md").write_text(_model_card(report), encoding="utf-8")
    logger.info("reference model: held-out perplexity %.2f (unigram %.2f)", acc.perplexity,
                report["metrics"]["unigram_perplexity"])
    return report
