"""Frozen configuration dataclasses: what the weights are (ModelConfig), how to decode
(DecodeOptions), and how to run (EngineConfig)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import OptionError

ACTIVATIONS = ("relu", "gelu", "swish")
# sinusoidal_half: Marian/XLM (sin of even frequencies, then cos of odd ones, over the full width);
# sinusoidal_fairseq: fairseq/tensor2tensor (sin | cos of half_dim frequencies exp(-ln(1e4)·i/(half_dim-1)))
# learned: a trained table per side (BART/mBART), read from the checkpoint
# sinusoidal_interleaved: Vaswani et al. as OpenNMT-py writes it (sin on even, cos on odd dimensions)
POSITION_KINDS = ("sinusoidal_half", "sinusoidal_fairseq", "sinusoidal_interleaved", "learned")
FAMILIES = ("hf", "onmt", "fairseq", "marian")  # decoding rules: HF generate, OpenNMT-py, fairseq, Marian
SEARCH_RULES = FAMILIES + ("ctranslate2",)  # the rules a caller may ask for by name (search_rules)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an encoder-decoder Transformer, read from a checkpoint's own config."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    src_vocab_size: int
    tgt_vocab_size: int
    activation: str
    pad_id: int
    eos_id: int
    decoder_start_id: int
    max_positions: int
    embed_scale: float = 1.0
    positions: str = "sinusoidal_half"  # sin in the first half, cos in the second (Marian)
    position_offset: int = 0  # added to the position index before the table lookup
    normalize_before: bool = False  # pre-norm layers
    embedding_norm: bool = False  # a layer norm on embeddings + positions (BART's layernorm_embedding)
    encoder_final_norm: bool = False
    decoder_final_norm: bool = False
    layer_norm_eps: float = 1e-5
    shared_embeddings: bool = True  # encoder and decoder read one embedding table
    tie_output: bool = True  # output projection is the decoder embedding
    final_logits_bias: bool = False
    family: str = "hf"  # whose decoding rules apply (stopping, length penalty): one of FAMILIES
    decoder_self: str = "attention"  # the decoder's first sub-layer: "attention" or "ssru" (Marian's students)
    zero_start_embedding: bool = False  # Marian: the first decoder input is a zero vector (plus position 0)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.decoder_self not in ("attention", "ssru"):
            raise ValueError(f"decoder_self {self.decoder_self!r} is not 'attention' or 'ssru'")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions {self.positions!r} is not one of {POSITION_KINDS}")
        for name in ("encoder", "decoder"):
            heads = getattr(self, f"{name}_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {name}_heads {heads}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true is not a beam size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(owner: Any, name: str, lo: int | None = None, hi: int | None = None, hi_name: str | None = None) -> None:
    """owner.<name> is an integer in [lo, hi], or an OptionError names it."""
    value = getattr(owner, name)
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" >= {lo}" if hi is None else f" from {lo} to {hi_name or hi}" + (f" ({hi})" if hi_name else "")
        raise OptionError(f"{name} must be an integer{bounds}, got {value!r}")


def real(owner: Any, name: str, lo: float | None = None, hi: float | None = None, above: bool = False) -> None:
    """owner.<name> is a finite number in [lo, hi] ((lo, hi] with `above`), or an OptionError names it."""
    value = getattr(owner, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (lo is None or (value > lo if above else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        rng = "" if lo is None else (f" > {lo}" if above else f" >= {lo}") + ("" if hi is None else f" and <= {hi}")
        raise OptionError(f"{name} must be a finite number{rng}, got {value!r}")


def flag(owner: Any, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding options, named like CTranslate2's; see README for the mapping to HF `generate`."""

    beam_size: int = 1
    num_hypotheses: int = 1  # n-best returned per input
    length_penalty: float = 1.0  # score / generated_length ** length_penalty
    max_decoding_length: int = 256  # generated tokens, EOS included (HF max_new_tokens)
    min_decoding_length: int = 0  # generated tokens, EOS included (HF min_new_tokens)
    return_scores: bool = False
    early_stopping: bool | str = False  # HF's beam stopping rule: False, True or "never"
    suppress_tokens: tuple[int, ...] = ()  # never generated (HF bad_words_ids of one token)
    suppress_sequences: tuple[tuple[int, ...], ...] = ()  # never generated as a whole (CTranslate2's; HF bad_words_ids)
    disable_unk: bool = False  # the unknown token is never generated (CTranslate2's)
    end_token: int | tuple[int, ...] | None = None  # the token id(s) that end a hypothesis instead of the model's EOS

    return_end_token: bool = False  # keep the end token at the end of the output (CTranslate2's)
    forced_eos: bool = False  # force EOS at the last allowed step (HF forced_eos_token_id)
    forced_bos_token: int | None = None  # force this first generated token, e.g. a target language (HF forced_bos_token_id)
    repetition_penalty: float = 1.0  # scores of tokens already in the target: × penalty if < 0, ÷ penalty if > 0
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of the target (0: off)
    sampling_topk: int = 1  # 1: argmax (no sampling); k > 1: sample among the k best; 0: the whole vocabulary
    sampling_topp: float = 1.0  # sample within the smallest set of tokens whose probability reaches p
    sampling_temperature: float = 1.0
    seed: int | None = None  # sampling seed: the same seed gives the same translations
    return_attention: bool = False  # each hypothesis's attention over the source tokens, one row per output token
    coverage_penalty: float = 0.0  # GNMT rescoring of the n-best: + β·Σ_source log(min(attention received, 1))
    truncate_input: bool = False  # cut over-long inputs instead of refusing them
    max_input_length: int | None = None  # source tokens, EOS included; None = model positions
    max_length_factor: float | None = None  # Marian: at most factor × the batch's source length generated
    use_shortlist: bool = True  # restrict the output layer to the model's lexical shortlist, where it has one
    prefix_bias_beta: float = 0.0  # > 0: target_prefix biases the first steps instead of being forced (CTranslate2's)
    return_alternatives: bool = False  # num_hypotheses translations parting after the target prefix (CTranslate2's)
    min_alternative_expansion_prob: float = 0.0  # alternatives less likely than this are not expanded
    search_rules: str | None = None  # None: the checkpoint family's beam rules; or one of SEARCH_RULES by name
    patience: float = 1.0  # CTranslate2's: its beam search stops after round(beam × patience) finished hypotheses
    word_penalty: float = 0.0  # Marian's --word-penalty: word_penalty × length subtracted from a finished score
    alignment_heads: int = 0  # returned attention: mean of the last layer's first n heads (0: all; 1: CT2's, Marian's)
    replace_unknowns: bool = False  # CTranslate2's: an unknown target token's text is its most attended source piece

    def __post_init__(self) -> None:
        """Every option's type, range and finiteness (a NaN or a string where a number goes is named, never
        passed on); what depends on the model (vocabulary ids, positions) is checked by Engine.options."""
        integer(self, "beam_size", 1)
        if self.return_alternatives is True:  # any number of alternatives, each continued with num_hypotheses 1
            integer(self, "num_hypotheses", 1)
        else:
            integer(self, "num_hypotheses", 1, self.beam_size, "beam_size")
        integer(self, "max_decoding_length", 1)
        integer(self, "min_decoding_length", 0, self.max_decoding_length, "max_decoding_length")
        integer(self, "no_repeat_ngram_size", 0)
        integer(self, "sampling_topk", 0)
        real(self, "length_penalty", -100, 100)  # bounded: a score divided by length ** 1e308 is not a score
        real(self, "repetition_penalty", 0, above=True)
        real(self, "sampling_topp", 0, 1, above=True)
        real(self, "sampling_temperature", 1e-4, 1e4)  # float32 logits divided outside it overflow to inf
        real(self, "coverage_penalty", -100, 100)
        real(self, "prefix_bias_beta", 0, 1)
        real(self, "min_alternative_expansion_prob", 0, 1)
        if self.prefix_bias_beta == 1:
            raise OptionError("prefix_bias_beta must be below 1 (at 1 the prefix is forced: give target_prefix alone)")
        for name in ("return_scores", "forced_eos", "return_attention", "truncate_input", "use_shortlist",
                     "disable_unk", "return_end_token", "return_alternatives", "replace_unknowns"):
            flag(self, name)
        if self.early_stopping not in (True, False, "never") or isinstance(self.early_stopping, int) and \
                not isinstance(self.early_stopping, bool):
            raise OptionError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.suppress_tokens, tuple) or not all(is_int(t) and t >= 0 for t in self.suppress_tokens):
            raise OptionError(f"suppress_tokens must be a list of token ids (integers >= 0), got {self.suppress_tokens!r}")
        if not isinstance(self.suppress_sequences, tuple) or not all(
                isinstance(q, tuple) and q and all(is_int(t) and t >= 0 for t in q) for q in self.suppress_sequences):
            raise OptionError("suppress_sequences must be a list of non-empty lists of token ids (integers >= 0), "
                              f"got {self.suppress_sequences!r}")
        if self.forced_bos_token is not None:
            integer(self, "forced_bos_token", 0)
        if isinstance(self.end_token, tuple):  # several (CTranslate2 takes a list): each an id
            if not self.end_token or not all(is_int(t) and t >= 0 for t in self.end_token):
                raise OptionError(f"end_token must be a token id or a non-empty list of them, got {self.end_token!r}")
        elif self.end_token is not None:
            integer(self, "end_token", 0)
        if self.seed is not None:
            integer(self, "seed", 0, 2 ** 63 - 1)
        if self.max_input_length is not None:
            integer(self, "max_input_length", 1)
        if self.max_length_factor is not None:
            real(self, "max_length_factor", 0, 1000, above=True)
        if self.return_alternatives and (self.prefix_bias_beta > 0 or self.needs_attention):
            raise OptionError("return_alternatives works with neither prefix_bias_beta nor attention weights")
        real(self, "patience", 0, 1000, above=True)
        real(self, "word_penalty", -1000, 1000)
        integer(self, "alignment_heads", 0)
        if self.search_rules is not None and self.search_rules not in SEARCH_RULES:
            raise OptionError(f"search_rules must be one of {', '.join(SEARCH_RULES)} (or None: the model's), got "
                              f"{self.search_rules!r}")
        if self.patience != 1 and self.search_rules != "ctranslate2":
            raise OptionError("patience is a rule of CTranslate2's beam search: give search_rules='ctranslate2' with it")

    def check_for(self, cfg: "ModelConfig", rules: str, tokenizer: Any, max_beam_size: int | None) -> None:
        """What these options need of the model (its vocabulary, positions and heads), its tokenizer and search rules
        (`rules`: the rules' name), and the engine's beam limit: each failure is an OptionError naming it."""
        from .tokenizer import PieceTokenizer  # (the tokenizers read ModelConfig from this module)
        vocab = cfg.tgt_vocab_size
        if self.end_token is not None and max(self.end_ids(0)) >= vocab:
            raise OptionError(f"end_token {self.end_token} is outside the target vocabulary of {vocab}")
        if self.replace_unknowns and not isinstance(tokenizer, PieceTokenizer):
            raise OptionError(f"replace_unknowns needs a tokenizer that maps text to pieces; this model's "
                              f"({type(tokenizer).__name__}) does not")
        if self.alignment_heads > cfg.decoder_heads:
            raise OptionError(f"alignment_heads {self.alignment_heads}: the model's decoder has {cfg.decoder_heads} "
                              "heads")
        if self.word_penalty != 0 and rules != "marian":
            raise OptionError(f"word_penalty is a rule of Marian's beam search (models trained by Marian; "
                              f"search_rules='marian'), not of {rules}'s")
        if self.sampling and self.beam_size > 1 and rules not in ("hf", "ctranslate2"):
            raise OptionError(f"sampling with beam_size > 1 follows Hugging Face's beam sampling (do_sample with "
                              f"num_beams) or CTranslate2's (search_rules='ctranslate2'), not {rules}'s rules: "
                              "search_rules='hf' or 'ctranslate2', or beam_size 1")
        if (self.end_token is not None or self.return_end_token) and rules not in ("hf", "ctranslate2"):
            raise OptionError(f"end_token and return_end_token are implemented for Hugging Face's and CTranslate2's "
                              f"search rules, not {rules}'s")
        if self.forced_bos_token is not None and not 0 <= self.forced_bos_token < vocab:
            raise OptionError(f"forced_bos_token {self.forced_bos_token} is outside the target vocabulary of {vocab}")
        outside = [t for t in self.suppress_tokens if t >= vocab]
        if outside:
            raise OptionError(f"suppress_tokens {outside} are outside the target vocabulary of {vocab}")
        outside = [list(q) for q in self.suppress_sequences if max(q) >= vocab]
        if outside:
            raise OptionError(f"suppress_sequences {outside} hold ids outside the target vocabulary of {vocab}")
        if max_beam_size is not None and self.beam_size > max_beam_size:
            raise OptionError(f"beam_size {self.beam_size} is over this engine's limit of {max_beam_size} (max_beam_size)")
        if self.max_decoding_length > cfg.max_positions:
            raise OptionError(f"max_decoding_length {self.max_decoding_length} exceeds the model's "
                              f"{cfg.max_positions} target positions")

    def end_ids(self, eos: int) -> tuple[int, ...]:
        """The ids that end a hypothesis: end_token's (one or several), else the model's `eos`."""
        if self.end_token is None:
            return (eos,)
        return self.end_token if isinstance(self.end_token, tuple) else (self.end_token,)

    def for_source(self, width: int) -> "DecodeOptions":
        """These options for a batch whose longest source has `width` tokens (max_length_factor applied)."""
        if self.max_length_factor is None:
            return self
        # Marian stops once the generated length reaches factor × width (a float32 product): at its ceiling
        bound = float(torch.tensor(self.max_length_factor, dtype=torch.float32) * width)
        limit = max(1, min(self.max_decoding_length, math.ceil(bound)))
        return dataclasses.replace(self, max_decoding_length=limit,
                                   min_decoding_length=min(self.min_decoding_length, limit))

    @property
    def needs_attention(self) -> bool:
        return self.return_attention or self.coverage_penalty != 0 or self.replace_unknowns

    @property
    def sampling(self) -> bool:
        return self.sampling_topk != 1 or self.sampling_topp < 1.0

    def replace(self, **changes: Any) -> "DecodeOptions":
        """A copy with `changes`; an unknown option name is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise OptionError(f"unknown decoding option(s) {unknown}; known options: {sorted(known)}")
        for name in ("suppress_tokens", "end_token"):  # lists (JSON) as tuples: options are hashed
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        if isinstance(changes.get("suppress_sequences"), list):  # lists of ids (JSON) as tuples: options are hashed
            changes["suppress_sequences"] = tuple(tuple(q) if isinstance(q, list) else q
                                                  for q in changes["suppress_sequences"])
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ServerConfig:
    """Limits of the HTTP front end (the running batch's budget is the engine's, in EngineConfig)."""

    max_body_bytes: int = 1 << 20  # request body
    max_texts: int = 256  # texts per request
    max_chars: int = 10_000  # characters per text
    request_timeout: float = 120.0  # seconds from arrival to answer; then 504
    max_queue: int = 4096  # sentences waiting for a batch; past it 503 with Retry-After
    retry_after: int = 2  # seconds, in the Retry-After header of a 503
    read_timeout: float = 30.0  # seconds for a request's headers, and again for its body; then 408
    api_keys: dict[str, int | None] | None = None  # key → its own requests per minute (None: req_limit); None: no keys
    req_limit: int | None = None  # requests per minute per key (per client address without keys); None: no limit
    max_file_bytes: int = 4 << 20  # /translate_file upload
    files_kept: int = 64  # translated files kept for download (the oldest is dropped)
    workers: int = 1  # worker processes, each with its own running batch and the engine's threads (serve)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: device, dtype, backend and batching budget."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    backend: str = "auto"  # "auto", "torch" or "triton"
    # "float": linear layers in `dtype`; "int8": int8 weights, dynamically quantized float32 activations;
    # "bf16": bfloat16 weights, float32 activations (CPU; Engine.load(dtype="int8" / "bfloat16") sets them)
    weights: str = "float"
    max_batch_tokens: int = 8192  # padded source tokens × beam per batch
    max_batch_size: int = 64  # sentences per batch
    # cap on a batch's decoding buffers (estimated by engine.decode_memory_bytes); a batch over it is split
    # in two and retried, as is one whose allocation fails. None: no cap
    max_memory_mb: float | None = None
    max_beam_size: int | None = None  # beam_size refused above it (a server's bound on one request's cost); None: none
    huge_pages: bool = True  # the packed weights copied onto 2 MiB pages where the kernel grants them (model/pages.py)

    def __post_init__(self) -> None:
        integer(self, "max_batch_tokens", 1)
        integer(self, "max_batch_size", 1)
        flag(self, "huge_pages")
        if self.max_beam_size is not None:
            integer(self, "max_beam_size", 1)
        if self.max_memory_mb is not None:
            real(self, "max_memory_mb", 0, above=True)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bfloat16 where the CPU has AMX-BF16: pyengine's bf16 GEMM runs 2-3x float32's there (with
        # AVX-512 alone it does two FMAs per weight: on a decoder's large batches no faster than float32)
        from .model.linear import bf16_kernels
        return torch.bfloat16 if "amx" in bf16_kernels() else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}, 'int8' or 'auto'")
    return DTYPES[dtype]


def options_key(options: dict[str, Any]) -> tuple | None:
    """A key for these options (lists as tuples, so a JSON body's options are keys too), None when a value cannot
    be one. Values keep their type in the key: 1 and 1.0 and True are different options to the checks."""
    def key(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return (type(value).__name__,) + tuple(key(v) for v in value)
        hash(value)
        return (type(value).__name__, value)

    try:
        return tuple(sorted((name, key(value)) for name, value in options.items()))
    except TypeError:  # a dict, a set, ...: resolved (and refused or not) every time
        return None
