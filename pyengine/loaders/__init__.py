"""Checkpoint formats, one module each; `find_loader` picks the one whose `detect` accepts a path."""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownFormatError
from . import bart_hf, eole, fairseq_pt, m2m100_hf, marian_bin, marian_hf, native, opennmt_py
from .common import FormatLoader, LoadedModel

FORMATS: tuple[FormatLoader, ...] = (
    FormatLoader("pyengine", native.detect, native.load, "pyengine_config.json (written by `pyengine convert`)"),
    FormatLoader("hf-marian", marian_hf.detect, marian_hf.load,
                 "config.json with model_type 'marian' (MarianMTModel.save_pretrained)"),
    FormatLoader("hf-m2m100", m2m100_hf.detect, m2m100_hf.load,
                 "config.json with model_type 'm2m_100' (M2M100 / NLLB-200 save_pretrained)"),
    FormatLoader("hf-bart", bart_hf.detect, bart_hf.load,
                 "config.json with model_type 'bart' or 'mbart' (save_pretrained)"),
    FormatLoader("fairseq", fairseq_pt.detect, fairseq_pt.load,
                 "a .pt file with 'model' and 'cfg' or 'args' (fairseq checkpoint), dict.<lang>.txt beside it"),
    FormatLoader("opennmt-py", opennmt_py.detect, opennmt_py.load,
                 "a .pt file with 'model', 'vocab' and 'opt' (OpenNMT-py v3 checkpoint)"),
    FormatLoader("eole", eole.detect, eole.load,
                 "config.json, vocab.json and model.00.safetensors (an eole model directory)"),
    FormatLoader("marian", marian_bin.detect, marian_bin.load,
                 "a Marian model.bin / model.npz with special:model.yml (Marian, Bergamot students), "
                 "config*.yml or model.npz.decoder.yml beside it"),
)


def find_loader(path: Path) -> FormatLoader:
    """The loader for a model directory; an error listing what was looked for when none applies."""
    if not path.exists():
        raise UnknownFormatError(f"{path}: no such file or directory")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    looked = "; ".join(f"{f.name}: {f.looks_for}" for f in FORMATS)
    present = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    raise UnknownFormatError(f"{path}: no known model format. Looked for: {looked}. Found: {present}")


def load_model(path: Path) -> LoadedModel:
    """Detect the format of `path` and load it."""
    return find_loader(path).load(path)


__all__ = ["FORMATS", "LoadedModel", "find_loader", "load_model"]
