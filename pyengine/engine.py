"""The user-facing engine: load a checkpoint, batch inputs, encode, decode, detokenize."""
from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .batching import decode_memory_bytes, is_out_of_memory, plan_batches, restore_order
from .config import DTYPES, DecodeOptions, EngineConfig, ModelConfig, options_key, resolve_dtype  # noqa: F401 (re-exported)
from .decoding import Hypothesis, RuntimeStats, decode, rules_for
from .decoding.alternatives import alternatives
from .decoding.prompt import prompt_options, prompt_prefix
from .documents import Detection, Documents
from .errors import BatchMemoryError, InputError, OptionError, PyEngineError
from .loaders import load_model
from .model import Transformer, load_weights, resolve_ops
from .results import StreamEvent, Translation, translation
from .scoring import ScoringResult, pair_ids, score

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
def resolve_model_path(path: str | Path) -> Path:
    """'default' names the model shipped with the package; anything else is a path."""
    if str(path) == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise PyEngineError(f"the default model is not installed (expected it in {DEFAULT_MODEL_DIR})")
        return DEFAULT_MODEL_DIR
    return Path(path).expanduser()


class Engine:
    """A loaded model ready to translate. Build with `Engine.load(path)`."""

    def __init__(self, model: Transformer, config: ModelConfig, defaults: DecodeOptions, tokenizer: Any,
                 engine_config: EngineConfig, source: str, tokenizer_note: str = "", shortlist=None):
        self.model, self.config, self.defaults = model, config, defaults
        self.tokenizer, self.engine_config, self.source = tokenizer, engine_config, source
        self.tokenizer_note = tokenizer_note or "no tokenizer files were found; use generate() with token ids"
        self.shortlist = shortlist  # the model's lexical shortlist (Marian students), if it has one
        self.rules = rules_for(config.family)  # the checkpoint family's search rules
        self.splits = 0  # batches halved because they did not fit in memory
        self.stats = RuntimeStats()  # what translate()'s decoder steps ran (the server's scheduler keeps its own)
        self._resolved: dict[tuple, DecodeOptions] = {}  # options → their DecodeOptions (see options)
        # every implementation choice, made once at load
        self.documents = Documents(self)  # sentence splitting, markup, language detection
        self.backends = {**model.ops.report, "encoder": model.encoder_stack.name, "decoder_step": model.step.name,
                         "output_layer": "fused-topk" if model.output.fuses_topk else "logits", "search_rules":
                         self.rules.name, "markup_alignment": self.documents.alignment_method, "weight_pages":
                         model.weight_pages.pages}

    @classmethod
    def load(cls, path: str | Path = "default", device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32, backend: str = "auto", **engine_options: Any) -> "Engine":
        """Load a model directory (format detected from its files) onto `device` in `dtype`."""
        device = torch.device(device)
        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"device", "dtype", "backend"}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise OptionError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        if isinstance(dtype, str) and dtype == "int8":  # CTranslate2's compute type: int8 GEMMs, float32 elsewhere
            dtype, engine_options = torch.float32, {**engine_options, "weights": "int8"}
        dtype = resolve_dtype(dtype)
        if dtype == torch.bfloat16 and device.type == "cpu" and backend in ("auto", "torch") and \
                engine_options.get("weights", "float") == "float":
            # on the CPU, bfloat16 is bf16 weights with float32 activations (Bf16Ops: float32's tokens, bf16 speed)
            dtype, engine_options = torch.float32, {**engine_options, "weights": "bf16"}
        engine_config = EngineConfig(device=device, dtype=dtype, backend=backend, **engine_options)
        ops = resolve_ops(backend, device, engine_config.dtype, engine_config.weights)
        loaded = load_model(resolve_model_path(path))
        with torch.device("meta"):
            model = Transformer(loaded.config, ops)
        load_weights(model, loaded.state, engine_config.dtype, device, engine_config.huge_pages)
        model.eval()
        return cls(model, loaded.config, loaded.defaults, loaded.tokenizer, engine_config, loaded.source,
                   loaded.extra.get("tokenizer_note", ""), loaded.extra.get("shortlist"))

    # -- public API ----------------------------------------------------------------------------
    def translate(self, texts: Sequence[str], format: str = "text", split_sentences: bool = False,
                  **options: Any) -> list[str]:
        """Best translation of each text.

        split_sentences: translate each sentence (and line) on its own and re-join them with the original
        whitespace and line breaks (paragraphs, documents); a sentence over the model's input limit is cut further.
        format="html": translate the text of HTML, keeping its markup (inline tags carried onto the words they
        cover); it implies split_sentences.
        """
        if format == "text" and not split_sentences:
            return [t.hypotheses[0] for t in self.translate_batch(texts, **options)]
        return self.documents.translate(texts, format, True, **options)

    def translate_file(self, source: str | Path, destination: str | Path, **options: Any) -> None:
        """Translate a .txt, .html or .docx file into `destination`, its structure kept (paragraphs, markup, runs)."""
        source = Path(source)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {source}: {exc.strerror}") from None
        Path(destination).write_bytes(self.documents.translate_file(source.name, data, **options))

    def detect(self, texts: Sequence[str], top: int = 3) -> list[list[Detection]]:
        """The most likely languages of each text (the model's source languages when it has several)."""
        self._validate_texts(texts)
        return [self.documents.detector.rank(t, top) for t in texts]

    def score_batch(self, sources: Sequence[str], targets: Sequence[str], source_lang: str | None = None,
                    target_lang: str | None = None, offset: int = 0) -> list[ScoringResult]:
        """Each target's log-probability given its source, per token (EOS included), as CTranslate2's score_batch.

        target_lang: a multilingual model's target language, whose token then starts the target (scored unless
        offset skips it). offset: target tokens at the start left unscored."""
        src, tgt = pair_ids(self, sources, targets, source_lang, target_lang, offset)
        return self._score(src, tgt, offset)

    def token_scores(self, sources: Sequence[str], translations: Sequence[Translation], k: int = 0,
                     source_lang: str | None = None) -> list[list[float]]:
        """Each translation's hypothesis k, token by token (EOS included): its log-probability given the source and
        the tokens before it, by teacher forcing on the decoded ids (no re-tokenization of the text); Marian's
        word scores."""
        self._validate_texts(sources)
        encode = self._language_encoder(source_lang, None, {})
        targets = [t.tokens[k] + [self.config.eos_id] for t in translations]
        return [r.log_probs for r in self._score([encode(s) for s in sources], targets)]

    def _score(self, sources: list[list[int]], targets: list[list[int]], offset: int = 0) -> list[ScoringResult]:
        ec = self.engine_config
        return score(self.model, sources, targets, self.config.decoder_start_id, self.config.pad_id, ec.device,
                     ec.max_batch_tokens, ec.max_batch_size, offset)

    def translate_each(self, texts: Sequence[str], **options: Any) -> list[Translation | InputError]:
        """translate_batch for a corpus: a text the engine refuses (not a string, not valid Unicode, over the length
        limit) gets its InputError in its place, and the others are translated all the same."""
        out: list[Translation | InputError | None] = [None] * len(texts)
        good = list(range(len(texts)))
        while good:
            try:
                results = self.translate_batch([texts[i] for i in good], **options)
            except InputError as exc:
                if exc.index is None:
                    raise
                bad = good.pop(exc.index)
                out[bad] = InputError(exc.message, bad)
                continue
            for i, r in zip(good, results):
                out[i] = r
            break
        return out  # type: ignore[return-value]

    def translate_iter(self, texts: Sequence[str], **options: Any) -> Iterator[StreamEvent]:
        """Stream each sentence's best hypothesis as it grows (greedy and beam search), then its final one.

        Input errors are raised before the first event; events of different sentences interleave.
        """
        events: queue.Queue = queue.Queue()
        done = object()

        def on_step(index: int, tokens: list[int], finished: bool, log_probs: list[float] | None) -> None:
            events.put(StreamEvent(index, tokens, self.tokenizer.decode(tokens), finished, log_probs))

        def run() -> None:
            try:
                self.translate_batch(texts, _on_step=on_step, **options)
            except BaseException as exc:  # handed to the consumer
                events.put(exc)
            events.put(done)

        self._validate_texts(texts)
        self.options(**{k: v for k, v in options.items() if k not in ("source_lang", "target_lang")})
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (item := events.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        worker.join()

    def prepare(self, texts: Sequence[str], source_lang: str | None = None, target_lang: str | None = None,
                **options: Any) -> tuple[list[list[int] | None], DecodeOptions]:
        """Check and tokenize `texts` (None for a blank text, which translates to "") and resolve the options.
        Every input error is raised here, before any decoding."""
        self._validate_texts(texts)
        encode = self._language_encoder(source_lang, target_lang, options)
        opts = self.options(**options)
        ids = [encode(text) if text.strip() else None for text in texts]
        return self._check_lengths(ids, opts), opts

    def _validate_texts(self, texts: Sequence[str]) -> None:
        if self.tokenizer is None:
            raise PyEngineError(f"{self.source}: {self.tokenizer_note}")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"expected str, got {type(text).__name__}", index=i)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates ("\ud800"): not text any tokenizer can read
                raise InputError(f"not valid Unicode text: {exc.reason} at character {exc.start}", index=i) from None

    def translate_batch(self, texts: Sequence[str], source_lang: str | None = None, target_lang: str | None = None,
                        target_prefix: Sequence[str | None] | None = None, _on_step=None,
                        **options: Any) -> list[Translation]:
        """n-best translations (ids, scores, text) of each text, in the caller's order.

        source_lang / target_lang: language codes of multilingual models (M2M100: "en", "de", ...).
        target_prefix: per text, the start the translation must have (None or "" for none).
        """
        ids, opts = self.prepare(texts, source_lang, target_lang, **options)
        prefixes = self.encode_prefixes(target_prefix, ids)
        positions = [i for i, x in enumerate(ids) if x is not None]
        on_step = None
        if _on_step is not None:  # report with the caller's index
            on_step = lambda k, *event: _on_step(positions[k], *event)  # noqa: E731
            for i, x in enumerate(ids):
                if x is None:
                    _on_step(i, [], True, [] if opts.beam_size == 1 else None)  # as the steps report them
        results = self._generate([x for x in ids if x is not None], opts, on_step, prefixes)
        it = iter(results)
        out = []
        for x in ids:
            out.append(Translation.blank(opts) if x is None else translation(next(it), self.tokenizer, opts, texts[len(out)]))
        return out

    def generate(self, source_ids: Sequence[Sequence[int]], target_prefix: Sequence[Sequence[int]] | None = None,
                 **options: Any) -> list[Translation]:
        """Decode from source token ids (EOS included, as the tokenizer makes them).

        target_prefix: per source, target ids the output must start with (HF's decoder prompt: in the output,
        not in the score; the decoding lengths count the tokens after it)."""
        opts = self.options(**options)
        if opts.replace_unknowns:
            raise OptionError("replace_unknowns replaces with the source text's pieces: use translate_batch")
        if isinstance(source_ids, (str, bytes)) or not isinstance(source_ids, Sequence):
            raise InputError(f"source_ids must be a list of lists of ints, got {type(source_ids).__name__}")
        checked = []
        for i, seq in enumerate(source_ids):
            if not isinstance(seq, Sequence) or isinstance(seq, (str, bytes)) or not seq:
                raise InputError("expected a non-empty list of token ids", index=i)
            if not all(isinstance(t, int) and 0 <= t < self.config.src_vocab_size for t in seq):
                raise InputError(f"token ids must be ints in [0, {self.config.src_vocab_size})", index=i)
            checked.append(list(seq))
        prefixes = None
        if target_prefix is not None:
            if len(target_prefix) != len(checked):
                raise InputError(f"target_prefix has {len(target_prefix)} items for {len(checked)} sources")
            prefixes = []
            for i, p in enumerate(target_prefix):
                if not all(isinstance(t, int) and 0 <= t < self.config.tgt_vocab_size for t in p):
                    raise InputError(f"target_prefix ids must be ints in [0, {self.config.tgt_vocab_size})", index=i)
                prefixes.append(list(p))
        results = self._generate(checked, opts, prefixes=prefixes)
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda toks: "")
        return [Translation.of(hyps, decode) for hyps in results]

    def encode_prefixes(self, target_prefix: Sequence[str | None] | None,
                        ids: list[list[int] | None]) -> list[list[int]] | None:
        """The target prefix ids of each non-blank text (None without target_prefix)."""
        if target_prefix is None:
            return None
        if isinstance(target_prefix, str) or not isinstance(target_prefix, Sequence):
            raise InputError(f"target_prefix must be a list of strings, got {type(target_prefix).__name__}")
        if len(target_prefix) != len(ids):
            raise InputError(f"target_prefix has {len(target_prefix)} items for {len(ids)} texts")
        prefixes = []
        for i, (x, p) in enumerate(zip(ids, target_prefix)):
            if p is not None and not isinstance(p, str):
                raise InputError(f"target_prefix must be a str or None, got {type(p).__name__}", index=i)
            if x is not None:
                prefixes.append(self.tokenizer.encode_target(p) if p else [])
        return prefixes

    def _language_encoder(self, source_lang: str | None, target_lang: str | None, options: dict):
        """The source encoder for these languages; the target language becomes the forced first token."""
        if source_lang is None and target_lang is None:
            return self.tokenizer.encode
        if not hasattr(self.tokenizer, "lang_id"):
            raise OptionError(f"{self.source}: source_lang/target_lang apply to multilingual models only")
        try:
            if target_lang is not None:
                options["forced_bos_token"] = self.tokenizer.lang_id(target_lang)
            if source_lang is not None:
                self.tokenizer.lang_id(source_lang)
        except KeyError as exc:
            raise OptionError(str(exc.args[0])) from None
        return lambda text: self.tokenizer.encode(text, source_lang=source_lang)

    def options(self, **options: Any) -> DecodeOptions:
        """The model's default decoding options with `options` applied (unknown names are an error).

        Sampling options without an explicit beam_size mean beam 1; with beam_size > 1 they sample beams (HF's, or
        CTranslate2's under its rules). A server sees the same few option sets again and again: each is resolved and
        checked once (~40 µs) and kept (frozen), a bounded number of them; a refused one is refused every time."""
        key = options_key(options)
        opts = None if key is None else self._resolved.get(key)
        if opts is None:
            opts = self._resolve(options)
            if key is not None:
                if len(self._resolved) >= 256:
                    self._resolved.clear()
                self._resolved[key] = opts
        return opts

    def _resolve(self, options: dict[str, Any]) -> DecodeOptions:
        if any(k.startswith("sampling_") for k in options) and "beam_size" not in options:
            options = dict(options, beam_size=1)
        opts = self.defaults.replace(**options)
        if "beam_size" in options and "num_hypotheses" not in options:
            opts = opts.replace(num_hypotheses=min(opts.num_hypotheses, opts.beam_size))
        if opts.disable_unk:  # CTranslate2's option, as one more suppressed token
            unk = getattr(self.tokenizer, "target_unk_id", None)  # every tokenizer class names it; None: ids only
            if unk is None:
                raise OptionError("disable_unk needs the model's tokenizer to know its unknown token; this model has "
                                  "none (suppress_tokens=[the unknown token's id] does the same)")
            opts = opts.replace(suppress_tokens=tuple(dict.fromkeys(opts.suppress_tokens + (unk,))), disable_unk=False)
        opts.check_for(self.config, opts.search_rules or self.rules.name, self.tokenizer, self.engine_config.max_beam_size)
        return opts

    # -- internals -----------------------------------------------------------------------------
    def _check_lengths(self, ids: list[list[int] | None], opts: DecodeOptions) -> list[list[int] | None]:
        limit = min(opts.max_input_length or self.config.max_positions, self.config.max_positions)
        out = []
        for i, seq in enumerate(ids):
            if seq is not None and len(seq) > limit:
                if not opts.truncate_input:
                    raise InputError(f"{len(seq)} tokens exceed the limit of {limit} "
                                     "(pass truncate_input=True to cut it)", index=i)
                seq = seq[: limit - 1] + [seq[-1]]  # keep the closing EOS
            out.append(seq)
        return out

    @torch.inference_mode()
    def _generate(self, ids: list[list[int]], opts: DecodeOptions, on_step=None,
                  prefixes: list[list[int]] | None = None) -> list[list[Hypothesis]]:
        if not ids:
            return []
        ids = self._check_lengths(ids, opts)
        if opts.return_alternatives:
            return alternatives(self, ids, opts, prefixes)
        if prefixes is None or not any(prefixes):
            return self._generate_group(ids, opts, on_step, None)
        # one decoder prompt length per batch: group the sentences by prefix length
        results: list = [None] * len(ids)
        for length in sorted({len(p) for p in prefixes}):
            members = [i for i, p in enumerate(prefixes) if len(p) == length]
            group_opts = prompt_options(opts, length)
            group_prefix = [prompt_prefix(opts, prefixes[i]) for i in members]
            cb = None if on_step is None else (lambda k, *event, members=members: on_step(members[k], *event))
            for i, out in zip(members, self._generate_group([ids[i] for i in members], group_opts, cb, group_prefix)):
                results[i] = out
        return results

    def _generate_group(self, ids: list[list[int]], opts: DecodeOptions, on_step,
                        prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        ec = self.engine_config
        batches = plan_batches([len(x) for x in ids], ec.max_batch_tokens, ec.max_batch_size, opts.beam_size)
        generator = None
        if opts.sampling:  # one stream for the whole call: batches must not repeat each other's draws
            generator = torch.Generator(device=ec.device)
            generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
        outputs = [self._run_fitting(batch, ids, opts, on_step, generator, prefixes) for batch in batches]
        return restore_order(batches, outputs, len(ids))

    def _run_fitting(self, batch: list[int], ids: list[list[int]], opts: DecodeOptions, on_step,
                     generator: torch.Generator | None, prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        """Decode the sentences `batch` indexes; a batch that does not fit in memory is halved and retried."""
        step_cb = None if on_step is None else (lambda k, *event: on_step(batch[k], *event))
        prefix = None if not prefixes or not prefixes[0] else \
            torch.tensor([prefixes[i] for i in batch], device=self.engine_config.device)
        try:
            self.check_memory(len(batch), max(len(ids[i]) for i in batch), opts,
                              0 if prefix is None else prefix.shape[1])
            return self._run_batch([ids[i] for i in batch], opts, step_cb, generator, prefix)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if len(batch) == 1:
                raise BatchMemoryError(f"one sentence of {len(ids[batch[0]])} tokens does not fit: {exc}") from None
            self.splits += 1
            half = len(batch) // 2
            return (self._run_fitting(batch[:half], ids, opts, on_step, generator, prefixes)
                    + self._run_fitting(batch[half:], ids, opts, on_step, generator, prefixes))

    def check_memory(self, sentences: int, src_len: int, opts: DecodeOptions, prefix_len: int = 0) -> None:
        """Raise BatchMemoryError when such a batch would reserve more than the engine's memory cap."""
        cap = self.engine_config.max_memory_mb
        if cap is None:
            return
        need = decode_memory_bytes(self.config, sentences, src_len, opts.beam_size,
                                   prefix_len + opts.max_decoding_length, self.engine_config.dtype,
                                   self.model.ops.cache_dtype)
        if need > cap * 2 ** 20:
            raise BatchMemoryError(f"a batch of {sentences} sentences of up to {src_len} tokens needs "
                                   f"{need / 2 ** 20:.1f} MB, over the cap of {cap} MB (max_memory_mb)")

    def _run_batch(self, ids: list[list[int]], opts: DecodeOptions, on_step=None,
                   generator: torch.Generator | None = None, prefix: torch.Tensor | None = None) -> list[list[Hypothesis]]:
        cfg = self.config
        return decode(self.model, self.rules, ids, opts, self.engine_config.device, cfg.decoder_start_id, cfg.eos_id,
                      self.shortlist, on_step, generator, prefix, self.stats)
